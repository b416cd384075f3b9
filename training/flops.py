"""Model FLOPs of a pretraining step and model FLOPs utilisation (MFU).

MFU = model FLOPs a step needs / (step time x peak FLOP/s of the devices), as defined by
PaLM (Chowdhery et al. 2022, Appendix B): the FLOPs are those of the model's arithmetic, not
what the hardware executed (no activation recomputation, no padding), so the figure compares
runs, codes and machines fairly.

What is counted, per sample, for the model and masking actually trained
(:class:`training.models.spectral_mae.SpectralMAE`, ``random_masking``):

* every matrix product as ``2 m n k`` FLOPs (one multiply and one add per term);
* the tokeniser on all ``N = T*G*L`` tokens: ``[N, K] x [K, D]`` (``K = u*p*p``), a Linear
  over patches in the model (:class:`~training.models.spectral_mae.PatchLinear3d`);
* the encoder on the ``n_e`` kept tokens only: ``int(N * (1 - mask_ratio))`` for random
  masking, ``T * int(M * (1 - mask_ratio))`` for tube masking of T dates of M tokens each
  (the model's counts, :meth:`SpectralMAE.random_masking`); per block the q, k, v and output
  projections ``4 x 2 n D^2``, the MLP ``2 x 2 n D H`` (H = int(D * mlp_ratio)), and attention
  ``2 x 2 n^2 D`` (scores q k^T and the weighted sum of v, over all heads together);
* ``decoder_embed`` ``[n_e, D] x [D, Dd]``; the decoder blocks as the encoder's on all N
  tokens at width Dd; ``decoder_pred`` ``[N, Dd] x [Dd, K]``;
* a training step = 3 x forward (the backward pass computes gradients with respect to the
  inputs and the weights of every product, two products of the same size; PaLM App. B,
  Kaplan et al. 2020 Sec. 2.1). The tokeniser's input (the image) needs no gradient, so
  its forward + backward is really 2 x forward: the convention over-counts one forward of
  a layer that is ~10 % of the tiny model's forward FLOPs at 96 px, ~0.6 % of the base
  model's at 128 px (kept, so the figure is the standard one).

Not counted (small next to the matrix products, and by convention left out): LayerNorms,
softmax, GELU, residual adds, position tables, biases, the gathers of masking, the loss,
the optimizer step, the reconstruction images some steps draw, and any recomputation.

Peak FLOP/s are the vendor's dense (no 2:4 sparsity) bf16 tensor-core figures, looked up by
the exact name CUDA reports (``torch.cuda.get_device_name()``); an unknown name gives an
unknown MFU, never a guess. ``SPECTRALGPT_PEAK_TFLOPS`` (TFLOP/s per device) overrides the
table, for a GPU that is not in it or for an fp32 run.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from training.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "PEAK_BF16_FLOPS",
    "PEAK_ENV",
    "ForwardFlops",
    "achieved_flops",
    "device_name",
    "encoder_tokens",
    "forward_flops",
    "mfu",
    "peak_flops",
    "train_flops_per_sample",
]

#: Environment variable overriding the peak: TFLOP/s of one device (e.g. ``989``).
PEAK_ENV = "SPECTRALGPT_PEAK_TFLOPS"

#: Dense bf16 tensor-core peak FLOP/s of one device, keyed by the EXACT name
#: ``torch.cuda.get_device_name()`` returns (the CUDA device-properties name, as nvidia-smi
#: prints it). NVIDIA's datasheets print the 2:4-sparse figure with an asterisk; the dense
#: one is half of it. Figures in TFLOP/s; the datasheet pages named below, cross-checked
#: against the third-party copies named with them:
#:
#: * H100 SXM5 989 (datasheet "BF16 Tensor Core 1,979*", * = with sparsity), H100 PCIe 756
#:   (1,513*): NVIDIA H100 Tensor Core GPU datasheet
#:   (https://www.nvidia.com/en-us/data-center/h100/; cross-checked:
#:   https://glennklockwood.com/garden/processors/h100 "BF16 matrix 989.4, sparse 1978.9";
#:   https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html, SXM 1,979* / PCIe
#:   1,513*, "1/2 lower without sparsity"). Names: "NVIDIA H100 80GB HBM3" is the SXM5
#:   part (karpathy/llm.c ``llmc/mfu.h`` keys it so: "HBM3 = SXM5"), "NVIDIA H100 PCIe"
#:   the PCIe one (HBM2e, 114 SMs).
#: * H200 989: the same GH100 compute as H100 SXM (NVIDIA H200 datasheet, "BF16 Tensor Core
#:   1,979*"; https://www.nvidia.com/en-us/data-center/h200/; cross-checked:
#:   https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html "BF16 (dense)
#:   ~989"). Caveat: one public source says
#:   the H200 NVL (PCIe card, 1,671* = 836 dense) reports the same name "NVIDIA H200"; there
#:   the MFU would read low by 836 / 989, i.e. err on the cautious side. Set the override.
#: * A100 312 for all four boards, SXM4 and PCIe, 40 and 80 GB (NVIDIA A100 datasheet
#:   "BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS*";
#:   https://www.nvidia.com/en-us/data-center/a100/; cross-checked:
#:   https://glennklockwood.com/garden/processors/A100, 40G and 80G parts "Its FLOPS were
#:   the same"; the PCIe boards have the same boost clock, 1410 MHz, as llm.c's table).
#: * L40S 362 (NVIDIA L40S datasheet "BF16 Tensor Core 362.05 | 733*";
#:   https://www.nvidia.com/en-us/data-center/l40s/; cross-checked: the datasheet table
#:   reproduced at https://www.mullet.se/product.html?product_id=355414).
#:
#: Other cards (H100 NVL, H800, GH200, B200, consumer cards) are deliberately absent: their
#: reported names or figures were not checked here; use the override.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
}


@dataclass(frozen=True)
class ForwardFlops:
    """Matrix-product FLOPs of one sample's forward pass, by part (see the module docstring)."""

    patch_embed: int
    """Tokeniser on all N tokens: ``2 N K D``."""
    encoder: int
    """All encoder blocks on the kept tokens."""
    decoder_embed: int
    """``2 n_e D Dd``."""
    decoder: int
    """All decoder blocks on all N tokens."""
    decoder_pred: int
    """``2 N Dd K``."""

    @property
    def total(self) -> int:
        """FLOPs of the whole forward pass of one sample."""
        return self.patch_embed + self.encoder + self.decoder_embed + self.decoder + self.decoder_pred


def encoder_tokens(cfg: ModelConfig) -> int:
    """Tokens the encoder sees per sample, as :meth:`SpectralMAE.random_masking` keeps them.

    Random masking: ``int(N * (1 - mask_ratio))`` of the N = T*G*L tokens; tube masking of
    a T-date stack: ``T * int(M * (1 - mask_ratio))``, M = G*L tokens per date.
    """
    if cfg.masking == "tube" and cfg.num_dates > 1:
        return cfg.num_dates * int(cfg.tokens_per_date * (1 - cfg.mask_ratio))
    return int(cfg.num_tokens * (1 - cfg.mask_ratio))


def _block_flops(n: int, dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block on ``n`` tokens of width ``dim``: q, k, v and output
    projections ``4 * 2 n dim^2``, MLP ``2 * 2 n dim hidden``, attention scores and weighted
    sum ``2 * 2 n^2 dim`` (all heads together: heads x n^2 x dim/heads)."""
    hidden = int(dim * mlp_ratio)  # as the model's Mlp
    return 4 * 2 * n * dim * dim + 2 * 2 * n * dim * hidden + 2 * 2 * n * n * dim


def forward_flops(cfg: ModelConfig) -> ForwardFlops:
    """Forward-pass FLOPs of one sample of ``cfg`` (image size, dates and masking included)."""
    n = cfg.num_tokens
    n_enc = encoder_tokens(cfg)
    k, d, dd = cfg.patch_dim, cfg.embed_dim, cfg.decoder_embed_dim
    return ForwardFlops(
        patch_embed=2 * n * k * d,
        encoder=cfg.depth * _block_flops(n_enc, d, cfg.mlp_ratio),
        decoder_embed=2 * n_enc * d * dd,
        decoder=cfg.decoder_depth * _block_flops(n, dd, cfg.mlp_ratio),
        decoder_pred=2 * n * dd * k,
    )


def train_flops_per_sample(cfg: ModelConfig) -> int:
    """FLOPs of one sample in a training step: forward + backward = 3 x forward."""
    return 3 * forward_flops(cfg).total


def achieved_flops(step_seconds: float, samples_per_step: int, model_cfg: ModelConfig, *,
                   devices: int = 1) -> float:
    """Model FLOP/s of one device: ``samples_per_step`` samples (all devices together) took
    ``step_seconds`` seconds on ``devices`` devices."""
    if step_seconds <= 0:
        raise ValueError(f"step time must be > 0 s, got {step_seconds}")
    return train_flops_per_sample(model_cfg) * samples_per_step / step_seconds / devices


def mfu(step_seconds: float, samples_per_step: int, model_cfg: ModelConfig, peak: float | None,
        *, devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s per device over ``peak``
    (FLOP/s of one device, :func:`peak_flops`). None when the peak is unknown."""
    if peak is None:
        return None
    return achieved_flops(step_seconds, samples_per_step, model_cfg, devices=devices) / peak


def device_name(device: torch.device | str | None = None) -> str | None:
    """``torch.cuda.get_device_name`` of a CUDA device; None for a CPU (or no CUDA)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(dev)


def _parse_tflops(value: str | float, source: str) -> float:
    try:
        tflops = float(value)
    except ValueError:
        raise ValueError(f"{source} must be a number of TFLOP/s, got {value!r}") from None
    if not math.isfinite(tflops) or tflops <= 0:
        raise ValueError(f"{source} must be a positive number of TFLOP/s, got {value!r}")
    return tflops * 1e12


def peak_flops(name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device called ``name`` (exact :data:`PEAK_BF16_FLOPS` key).

    Precedence: ``override_tflops`` (TFLOP/s), then the ``SPECTRALGPT_PEAK_TFLOPS``
    environment variable, then the table. None when none applies: an unknown device or a CPU
    (``name`` None). No substring or family matching: "NVIDIA H100 PCIe" must not get the SXM
    figure, and a name not checked against a datasheet gets no figure.

    Raises:
        ValueError: the override is not a positive finite number.
    """
    if override_tflops is not None:
        return _parse_tflops(override_tflops, "the peak override")
    env = os.environ.get(PEAK_ENV, "").strip()
    if env:
        return _parse_tflops(env, PEAK_ENV)
    if name is None:
        return None
    return PEAK_BF16_FLOPS.get(name)
