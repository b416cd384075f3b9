"""The encoder without masking, and the task heads put on it.

:class:`Encoder` runs the pretrained tokeniser, the separable position tables, the blocks
and the final norm on *every* token (no masking: ``SpectralMAE.forward_encoder`` always
shuffles tokens through ``random_masking``, so it is not used here). Parameter names stay
those of the official model, which the layer-wise LR decay relies on.

Heads (official counterparts in ``../shared/research/spectralgpt.md`` section 5.1):

* classification: mean over all 3D tokens (the official code drops one token with
  ``x[:, 1:]``; we do not) -> linear layer. For the linear probe the frozen features are
  first standardised with the training split's per-dimension mean and std (what MAE
  ``main_linprobe.py`` does with an affine-free BatchNorm, computed once here), since
  frozen MAE features are badly scaled;
* :class:`DenseHead`: fuse the spectral groups (learned ``Linear(G -> 1)``, started at the
  mean), reshape to the ``H/p x W/p`` map, then a light decoder of 3x3 conv + BN + ReLU
  and x2 bilinear upsampling until full resolution, and a 1x1 conv to the classes.
  Deliberately lighter than the official UPerNet; the same head serves change detection
  on the difference of the fused features of the two dates (official: siamese encoder,
  ``Linear(4 -> 1)``, difference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from training.models.spectral_mae import SpectralMAE

__all__ = ["POOLS", "ChangeModel", "Classifier", "DenseHead", "Embedder", "Encoder",
           "SegmentationModel", "param_groups_lrd", "pool"]


class Encoder(nn.Module):
    """``[B, 12, H, W]`` normalised image -> tokens ``[B, G, L, D]`` (all tokens, no mask);
    a time stack ``[B, T, 12, H, W]`` -> ``[B, T, G, L, D]``.

    A stack's dates are encoded jointly, as in pretraining: all T x G x L tokens attend to
    each other, each date's tokens carrying its date encoding (``dates`` ``[B, T, 2]``, year
    and day of year, for the ``sincos`` encoding; the learned table needs none). Without
    ``dates`` a ``sincos`` model encodes each date alone (no date term), so stacks of any
    length and any dates still give features. ``gsd`` ``[B]`` (m/px, the sample JSON
    ``gsd``) feeds a model trained with the GSD encoding, as in pretraining (None: its
    ``reference_gsd``). Positions come from ``spectral_mae.positions``, as in pretraining.
    """

    def __init__(self, mae: SpectralMAE) -> None:
        super().__init__()
        self.cfg = mae.cfg
        self.patch_embed = mae.patch_embed
        self.pos_embed_spatial = mae.pos_embed_spatial
        self.pos_embed_temporal = mae.pos_embed_temporal
        if hasattr(mae, "pos_embed_date"):
            self.pos_embed_date = mae.pos_embed_date
        self.blocks = mae.blocks
        self.norm = mae.norm

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, x: Tensor, dates: Tensor | None = None, gsd: Tensor | None = None) -> Tensor:
        from training.models.spectral_mae import positions

        single = x.dim() == 4
        stack = x.unsqueeze(1) if single else x  # [B, T, 12, H, W]
        b, t = stack.shape[:2]
        if t > 1 and self.cfg.date_encoding == "sincos" and dates is None:  # each date on its own
            per = None if gsd is None else gsd.repeat_interleave(t)
            return self.forward(stack.reshape(b * t, *stack.shape[2:]), gsd=per).unflatten(0, (b, t))
        tokens = self.patch_embed(stack.reshape(b * t, 1, *stack.shape[2:]))  # [B*T, G, L, D]
        _, g, n_l, d = tokens.shape
        # token = (date * G + group) * L + spatial, with the positions pretraining adds
        # (separable tables, the GSD encoding, the date encoding): one function for both
        tokens = tokens.reshape(b, t * g * n_l, d) + positions(
            self.cfg, self.pos_embed_spatial, self.pos_embed_temporal,
            getattr(self, "pos_embed_date", None), t, dates, gsd)
        for blk in self.blocks:
            tokens = blk(tokens)
        out = self.norm(tokens).reshape(b, t, g, n_l, d)
        return out[:, 0] if single else out


def pool(tokens: Tensor) -> Tensor:
    """Mean over every token: ``[B, G, L, D]`` or ``[B, T, G, L, D]`` (dates too) -> ``[B, D]``."""
    return tokens.mean(dim=tuple(range(1, tokens.dim() - 1)))


#: Embedding poolings: ``mean`` over every token -> ``[B, D]``; ``groups``: mean per spectral
#: group (over positions and dates) -> ``[B, G, D]``; ``none``: the tokens themselves.
POOLS = ("mean", "groups", "none")


class Embedder(nn.Module):
    """Normalised image ``[B, 12, H, W]`` (or stack ``[B, T, 12, H, W]`` with ``dates``) ->
    embedding: ``[B, D]`` (``pool="mean"``), ``[B, G, D]`` (``"groups"``) or the encoder's
    tokens ``[B, G, L, D]`` / ``[B, T, G, L, D]`` (``"none"``). What ``training.embed`` runs
    and what ``training.export`` exports."""

    def __init__(self, encoder: Encoder, pool: str = "mean") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: use one of {', '.join(POOLS)}")
        self.encoder = encoder
        self.pool = pool

    def forward(self, x: Tensor, dates: Tensor | None = None, gsd: Tensor | None = None) -> Tensor:
        tokens = self.encoder(x, dates, gsd)
        if self.pool == "none":
            return tokens
        if self.pool == "groups":  # [.., G, L, D]: mean over L (and T) per group
            per_group = tokens.mean(dim=-2)
            return per_group.mean(dim=1) if per_group.dim() == 4 else per_group
        return pool(tokens)


class Classifier(nn.Module):
    """Encoder -> mean over tokens (and dates) -> head. ``head`` maps ``[B, D] -> [B, C]``."""

    def __init__(self, encoder: Encoder, num_classes: int, *, probe: bool) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        self.head = nn.Linear(d, num_classes)
        # Fine-tuning head init trunc-normal(2e-5) as the official code (main_finetune.py L314).
        nn.init.trunc_normal_(self.head.weight, std=0.01 if probe else 2e-5)
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor) -> Tensor:
        return pool(self.encoder(x))  # [B, D]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DenseHead(nn.Module):
    """Fused token map ``[B, D, h, w]`` -> per-pixel logits ``[B, C, h*p, w*p]``."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int, width: int = 128) -> None:
        super().__init__()
        steps = int(math.log2(patch_size))
        if 2**steps != patch_size:
            raise ValueError(f"patch size {patch_size} is not a power of two")
        layers: list[nn.Module] = []
        c = in_dim
        for i in range(steps):
            out = max(width // 2**i, 16)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.Upsample(scale_factor=2, mode="bilinear",
                                                          align_corners=False)]
            c = out
        layers.append(nn.Conv2d(c, num_classes, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(x)


class GroupFusion(nn.Module):
    """``[B, G, L, D]`` -> ``[B, D, h, w]`` with a learned weight per spectral group."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.fuse = nn.Linear(groups, 1)
        nn.init.constant_(self.fuse.weight, 1.0 / groups)
        nn.init.zeros_(self.fuse.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        b, g, n_l, d = tokens.shape
        h = math.isqrt(n_l)
        x = self.fuse(tokens.permute(0, 2, 3, 1)).squeeze(-1)  # [B, L, D]
        return x.transpose(1, 2).reshape(b, d, h, h)


class SegmentationModel(nn.Module):
    """Encoder -> group fusion -> :class:`DenseHead`; ``[B, T, H, W] -> [B, C, H, W]``."""

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.fusion = GroupFusion(encoder.cfg.num_groups)
        self.head = DenseHead(encoder.embed_dim, num_classes, encoder.cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fusion(self.encoder(x)))


class ChangeModel(nn.Module):
    """Siamese encoder; fused features of date 1 minus date 2 -> :class:`DenseHead` (2 classes)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.fusion = GroupFusion(encoder.cfg.num_groups)
        self.head = DenseHead(encoder.embed_dim, 2, encoder.cfg.patch_size)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        tokens = self.encoder(torch.cat([a, b]))  # one pass, shared weights
        fa, fb = self.fusion(tokens).chunk(2)
        return self.head(fa - fb)


#: Where the layer-wise LR decay puts the encoder's position tables (``pos_embed_*``):
#: ``official`` - at full LR, as the official ``util/lr_decay.py`` ``get_layer_id_for_vit``
#: (L60-72) does with these names: it sends only ``cls_token``, ``pos_embed`` (L65-66) and
#: ``patch_embed*`` (L67-68) to layer 0, so the separable ``pos_embed_spatial`` /
#: ``pos_embed_temporal`` fall through to ``num_layers`` (L71-72), scale ``0.75 ** 0 = 1``;
#: ``decayed`` - at layer 0 with the tokeniser (BEiT/MAE intent; scale ``0.75 ** (depth + 1)``).
POS_LR = ("official", "decayed")


def param_groups_lrd(model: nn.Module, lr: float, weight_decay: float,
                     layer_decay: float, pos_lr: str = "official") -> list[dict[str, object]]:
    """AdamW parameter groups with layer-wise LR decay (BEiT; official ``util/lr_decay.py``).

    Layer 0 = tokeniser, layer i + 1 = ``encoder.blocks.i``, and the final norm plus every
    head parameter = layer depth + 1 (scale 1). The LR of layer i is
    ``lr * layer_decay ** (depth + 1 - i)`` (official L19-21). The position tables go to
    layer depth + 1 (``pos_lr="official"``, what the official code does with the separable
    tables' names) or to layer 0 (``"decayed"``); see :data:`POS_LR`. No weight decay on
    biases, norms (1-D tensors) and position tables (official ``p.ndim == 1`` plus the
    model's ``no_weight_decay()`` names, ``models_vit_tensor.py`` L132-139).
    """
    if pos_lr not in POS_LR:
        raise ValueError(f"pos_lr {pos_lr!r}: use one of {', '.join(POS_LR)}")
    encoder = next((m for m in model.modules() if isinstance(m, Encoder)), None)
    depth = len(encoder.blocks) if encoder is not None else 0
    groups: dict[tuple[int, bool], dict[str, object]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.removeprefix("encoder.")
        in_encoder = name.startswith("encoder.")
        if in_encoder and short.startswith("pos_embed"):
            layer = 0 if pos_lr == "decayed" else depth + 1
        elif in_encoder and short.startswith("patch_embed"):
            layer = 0
        elif short.startswith("blocks.") and in_encoder:
            layer = int(short.split(".")[1]) + 1
        else:
            layer = depth + 1
        no_decay = p.ndim == 1 or name.endswith(".bias") or "pos_embed" in name
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)  # type: ignore[union-attr]
    return list(groups.values())
