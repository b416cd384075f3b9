"""Optimiser parameter groups and the learning-rate schedule.

Recipe (official SpectralGPT ``main_pretrain.py`` / MAE ``util/lr_sched.py``): AdamW with
betas (0.9, 0.95) and weight decay 0.05, absolute LR = blr x effective batch / 256, linear
warm-up then half-cycle cosine to ``min_lr``, updated every optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

# Parameters that are not weight matrices: norms, biases, position tables, mask token.
NO_DECAY_TABLES = ("pos_embed_spatial", "pos_embed_temporal", "decoder_pos_embed_spatial",
                   "decoder_pos_embed_temporal", "mask_token",
                   "pos_embed_date", "decoder_pos_embed_date")  # learned date tables, when present


def param_groups(model: nn.Module, weight_decay: float,
                 decay_pos_embed: bool = False) -> list[dict[str, object]]:
    """Two AdamW groups: decayed weights, and 1-D parameters / biases / tables without decay.

    ``decay_pos_embed=True`` reproduces timm 0.4.12's ``add_weight_decay`` used by the
    official code, which decays the (3-D) position tables and the mask token too.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias")
        if not decay_pos_embed and name in NO_DECAY_TABLES:
            skip = True
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class Schedule:
    """Per-step LR of one stage: linear warm-up to ``peak_lr``, then cosine to ``min_lr``."""

    peak_lr: float
    """blr x effective batch / 256."""
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        """LR for optimizer step ``step`` (0-based) of the stage.

        Warm-up uses (step + 1) / warmup so the first step already moves the weights (MAE
        starts at exactly 0, which wastes a step).
        """
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
