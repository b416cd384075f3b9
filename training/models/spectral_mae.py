"""SpectralGPT: a masked autoencoder over 3D spatial-spectral tokens, in algorithm order.

Hong et al., "SpectralGPT: Spectral Remote Sensing Foundation Model", IEEE TPAMI 2024.
Reference code: danfenghong/IEEE_TPAMI_SpectralGPT ``models_mae_spectral.py`` and
``util/video_vit.py`` (itself facebookresearch/mae_st with the time axis used as the
spectral axis). Parameter names are identical to the official ones so ``SpectralGPT.pth``
and ``SpectralGPT+.pth`` load with ``strict=True`` (see :func:`load_official_state_dict`).

Shapes used throughout (official base model at 128 px in brackets)::

    B  batch                     T  bands (num_bands)            [12]
    u  bands per token [3]       G  spectral groups = T / u      [4]
    p  patch side in px [8]      h = w = img_size / p            [16]
    L  spatial positions h*w     [256]    N = G*L 3D tokens      [1024]
    K  values per token u*p*p    [192]    D / Dd  encoder / decoder width [768 / 512]

Pipeline: patchify with a Conv3d -> add separable position tables (spatial + spectral) ->
keep a random 10% of the 3D tokens -> ViT encoder -> linear to the decoder width -> put
mask tokens back in place -> add decoder position tables -> ViT decoder -> linear to K
values per token -> token MSE on masked tokens + MSE of the spectral-group sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import ModelConfig

__all__ = [
    "PRESETS",
    "MAEOutput",
    "SpectralMAE",
    "adapt_state_dict",
    "build_model",
    "interpolate_spatial_table",
    "load_official_state_dict",
]

# The official builders pass norm_layer=partial(nn.LayerNorm, eps=1e-6) everywhere.
LN_EPS = 1e-6


# --------------------------------------------------------------------------- building blocks


class PatchEmbed3D(nn.Module):
    """Tokeniser: one Conv3d with kernel = stride = (u bands, p, p) over a 1-channel volume.

    ``[B, 1, T, H, W] -> [B, G, L, D]`` (official ``video_vit.PatchEmbed``, L15-75).
    """

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__()
        kernel = (cfg.band_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, D, G, h, w]
        return x.flatten(3).permute(0, 2, 3, 1)  # [B, G, L, D], L row-major over (h, w)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (official names, issue #17).

    Uses ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels where available);
    mathematically identical to the explicit softmax(q k^T / sqrt(d)) v of the official code.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape  # [B, n, D]

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP (timm ``Mlp``, names ``fc1``/``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (official ``video_vit.Block``; drop-path is 0 in pretraining)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAEOutput(NamedTuple):
    """What :meth:`SpectralMAE.forward` returns."""

    loss: Tensor
    """Scalar: token_loss_weight x loss_token + spectral_loss_weight x loss_spectral."""
    loss_token: Tensor
    """Scalar: MSE over masked tokens ("token-to-token")."""
    loss_spectral: Tensor
    """Scalar: MSE of the spectral-group sums over all positions ("spectral-to-spectral")."""
    pred: Tensor
    """``[B, N, K]`` predicted values of every token (visible ones included)."""
    mask: Tensor
    """``[B, N]`` 1 where the token was removed, 0 where the encoder saw it."""


# --------------------------------------------------------------------------- the model


class SpectralMAE(nn.Module):
    """SpectralGPT masked autoencoder. Input ``[B, T, H, W]`` or ``[B, 1, T, H, W]`` float."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim

        # Encoder: tokeniser, separable learned positions (no cls token), blocks, final norm.
        self.patch_embed = PatchEmbed3D(cfg, d)
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, cfg.num_spatial, d))
        # "temporal" is the official name of the spectral table (the code is a video MAE).
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, cfg.num_groups, d))
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)

        # Decoder: projection, mask token, its own position tables, blocks, norm, prediction.
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, cfg.num_spatial, dd))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, cfg.num_groups, dd))
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=LN_EPS)
        self.decoder_pred = nn.Linear(dd, cfg.patch_dim)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init (``models_mae_spectral.py`` L161-195)."""
        for table in (self.pos_embed_spatial, self.pos_embed_temporal,
                      self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal):
            nn.init.trunc_normal_(table, std=0.02)
        # Conv3d initialised like a Linear on its flattened kernel (as MAE does for Conv2d).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens <-> pixels

    def patchify(self, imgs: Tensor) -> Tensor:
        """``[B, T, H, W] -> [B, N, K]``: tokens ordered (group, row, col), values (band-in-group,
        y, x) (official ``patchify``, L197-213)."""
        c = self.cfg
        b = imgs.shape[0]
        u, p, g, h = c.band_patch_size, c.patch_size, c.num_groups, c.grid_size
        x = imgs.reshape(b, g, u, h, p, h, p)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)  # [B, G, h, w, u, p, p]
        return x.reshape(b, g * h * h, u * p * p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`patchify`: ``[B, N, K] -> [B, T, H, W]``."""
        c = self.cfg
        b = x.shape[0]
        u, p, g, h = c.band_patch_size, c.patch_size, c.num_groups, c.grid_size
        x = x.reshape(b, g, h, h, u, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # [B, G, u, h, p, w, p]
        return x.reshape(b, g * u, h * p, h * p)

    def _pos_table(self, spatial: Tensor, spectral: Tensor) -> Tensor:
        """Separable position table ``[1, N, D]``: spatial[l] + spectral[g] for token g*L + l."""
        g, n_l = spectral.shape[1], spatial.shape[1]
        return spatial.repeat(1, g, 1) + spectral.repeat_interleave(n_l, dim=1)

    # ------------------------------------------------------------------ masking

    @staticmethod
    def random_masking(
        x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a uniformly random subset of tokens per sample (MAE ``random_masking``).

        Args:
            x: ``[B, N, D]`` tokens.
            mask_ratio: fraction removed; ``int(N * (1 - ratio))`` tokens are kept.
            generator: optional RNG for reproducible masks (tests, reconstruction images).

        Returns:
            ``x_kept [B, n_keep, D]``, ``mask [B, N]`` (1 = removed), ``ids_restore [B, N]``.
        """
        b, n, d = x.shape
        n_keep = int(n * (1 - mask_ratio))
        noise = torch.rand(b, n, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the lowest noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    # ------------------------------------------------------------------ encoder / decoder

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, 1, T, H, W]`` -> latent ``[B, n_keep, D]``, mask ``[B, N]``, ids_restore ``[B, N]``."""
        x = self.patch_embed(imgs)  # [B, G, L, D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, D], token = group * L + spatial
        # Adding positions before masking equals the official gather-after-masking (L277-290).
        x = x + self._pos_table(self.pos_embed_spatial, self.pos_embed_temporal)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent ``[B, n_keep, D]`` -> predictions ``[B, N, K]`` for every token."""
        x = self.decoder_embed(latent)  # [B, n_keep, Dd]
        b, n_keep, dd = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - n_keep, dd)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
        x = x + self._pos_table(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # ------------------------------------------------------------------ loss

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Multi-target loss (official ``forward_loss``, L413-465), computed in float32.

        * token term: mean over the K values of (pred - target)^2, averaged over masked tokens;
        * spectral term: sum prediction and target over the G spectral groups at every
          spatial position and value offset (``[B, L, K]``), then MSE over all positions
          (visible included, as in the official code, which uses an all-ones mask there).

        Args:
            imgs: ``[B, T, H, W]`` normalised input.
            pred: ``[B, N, K]``; mask: ``[B, N]`` (1 = removed).

        Returns:
            total, token term, spectral term (scalars).
        """
        c = self.cfg
        target = self.patchify(imgs).float()  # [B, N, K]
        pred = pred.float()
        mask = mask.float()
        b = target.shape[0]
        group_sum = (target.view(b, c.num_groups, c.num_spatial, -1).sum(1),  # [B, L, K]
                     pred.view(b, c.num_groups, c.num_spatial, -1).sum(1))
        if c.norm_pix_loss:  # official: normalises only the token term's target (L448-451)
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss_token = ((pred - target) ** 2).mean(-1)  # [B, N]
        loss_token = (loss_token * mask).sum() / mask.sum()
        loss_spectral = ((group_sum[1] - group_sum[0]) ** 2).mean()
        loss = c.token_loss_weight * loss_token + c.spectral_loss_weight * loss_spectral
        return loss, loss_token, loss_spectral

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode and score a batch ``[B, T, H, W]`` (or ``[B, 1, T, H, W]``)."""
        if imgs.dim() == 4:
            imgs = imgs.unsqueeze(1)
        c = self.cfg
        expected = (1, c.num_bands, c.img_size, c.img_size)
        if tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], "
                             f"got {list(imgs.shape)}")
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss, loss_token, loss_spectral = self.forward_loss(imgs[:, 0], pred, mask)
        return MAEOutput(loss, loss_token, loss_spectral, pred, mask)

    # ------------------------------------------------------------------ bookkeeping

    def encoder_parameters(self) -> int:
        """Parameters of the encoder (tokeniser, positions, blocks, final norm)."""
        return sum(p.numel() for n, p in self.named_parameters() if not _is_decoder(n))

    def decoder_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if _is_decoder(n))


def _is_decoder(name: str) -> bool:
    return name.startswith("decoder") or name == "mask_token"


# --------------------------------------------------------------------------- weight transfer

SPATIAL_TABLES = ("pos_embed_spatial", "decoder_pos_embed_spatial")


def interpolate_spatial_table(table: Tensor, grid: int) -> Tensor:
    """Resize a spatial position table ``[1, h*h, D] -> [1, grid*grid, D]`` (bicubic).

    The same resampling DeiT/MAE's ``interpolate_pos_embed`` use; the official SpectralGPT
    code has that call commented out and re-initialises instead (``main_pretrain.py`` L214).
    """
    _, n, d = table.shape
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"spatial table with {n} positions is not a square grid")
    if old == grid:
        return table
    x = table.reshape(1, old, old, d).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(table.dtype)


def adapt_state_dict(
    state: Mapping[str, Tensor],
    model: SpectralMAE,
    spatial_pos: Literal["interpolate", "reinit"] = "interpolate",
) -> dict[str, Tensor]:
    """Make a state dict from a model at another image size fit ``model``.

    Spatial position tables whose length differs are bicubically interpolated, or replaced
    by freshly drawn trunc-normal(0.02) tables for ``reinit`` (the official behaviour).
    Everything else must already have the target shape.
    """
    own = model.state_dict()
    out = dict(state)
    for name in SPATIAL_TABLES:
        if name in out and name in own and out[name].shape != own[name].shape:
            if spatial_pos == "interpolate":
                out[name] = interpolate_spatial_table(out[name], model.cfg.grid_size)
            else:  # fresh trunc-normal(0.02), as the model's own initialisation
                out[name] = nn.init.trunc_normal_(torch.empty_like(own[name]), std=0.02)
    return out


def load_official_state_dict(
    model: SpectralMAE,
    checkpoint: Mapping[str, object],
    spatial_pos: Literal["interpolate", "reinit"] = "interpolate",
) -> None:
    """Load ``SpectralGPT.pth`` / ``SpectralGPT+.pth`` (``{"model": state_dict}`` or a bare
    state dict with the official key layout) strictly into ``model``.

    Raises:
        ValueError: a key is missing or unexpected, or a shape cannot be adapted.
    """
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint['model'] is not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved files
    state = adapt_state_dict(state, model, spatial_pos)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} keys)")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"shape mismatch (name, file, model): {wrong[:5]}")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- presets

def tiny_config(**overrides: object) -> ModelConfig:
    """A few-hundred-thousand-parameter model for tests and the CPU default run."""
    return ModelConfig(**{**dict(embed_dim=96, depth=2, num_heads=4, decoder_embed_dim=64,
                                 decoder_depth=1, decoder_num_heads=4), **overrides})


def base_config(**overrides: object) -> ModelConfig:
    """ViT-B encoder (~85.4 M at 128 px), the released SpectralGPT / SpectralGPT+ size."""
    return ModelConfig(**{**dict(embed_dim=768, depth=12, num_heads=12), **overrides})


def large_config(**overrides: object) -> ModelConfig:
    """ViT-L encoder (~302.8 M at 128 px); no official weights were released."""
    return ModelConfig(**{**dict(embed_dim=1024, depth=24, num_heads=16), **overrides})


def huge_config(**overrides: object) -> ModelConfig:
    """ViT-H encoder (~630.3 M at 128 px), the paper's "over 600 million" model."""
    return ModelConfig(**{**dict(embed_dim=1280, depth=32, num_heads=16), **overrides})


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": tiny_config,
    "base": base_config,
    "large": large_config,
    "huge": huge_config,
}


def build_model(preset: str | ModelConfig, **overrides: object) -> SpectralMAE:
    """``build_model("base", img_size=96)`` or ``build_model(config)``."""
    cfg = preset if isinstance(preset, ModelConfig) else PRESETS[preset](**overrides)
    return SpectralMAE(cfg)


def config_dict(model: SpectralMAE) -> dict[str, object]:
    """The model's config as plain data (stored next to exported weights)."""
    return asdict(model.cfg)

