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

Time stacks (``[B, T, 12, H, W]``, T dates, ``model.num_dates``): every date is tokenised
alone, giving 4D tokens over (date, group, row, column), N = T*G*L, ordered date-major; a
date encoding (sin-cos of the acquisition date, or a learned table over the date index) is
added to every token of its date. With T = 1 and the GSD encoding off the model is the
official one, number for number.

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


class PatchLinear3d(nn.Conv3d):
    """A ``Conv3d`` with kernel = stride and no padding, computed as patchify + one ``F.linear``.

    Same parameters, names and shapes as the ``nn.Conv3d`` it replaces (``weight``
    ``[D, C_in, kt, kh, kw]``, ``bias`` ``[D]``), and the same output layout
    ``[B, D, T // kt, H // kh, W // kw]`` (a view of a channels-last result), so official
    checkpoints load unchanged and a caller of ``proj(x)`` sees a convolution.

    Why not ``F.conv3d``: a non-overlapping 3D convolution with one input channel is a plain
    matrix product over patches, but cuDNN runs it in bf16 through a slow generic path
    (issue #20 reports 11-18x slower than patchify + Linear); the linear form is one GEMM
    ``[B*G*h*w, C_in*kt*kh*kw] x [C_in*kt*kh*kw, D]`` (cuBLAS, tensor cores in bf16).

    Why a ``Conv3d`` subclass rather than ``F.linear`` on ``proj.weight`` in the parent: the
    keys stay ``patch_embed.proj.weight`` / ``.bias`` with the conv's 5D shapes, and the
    parameters are used inside their own module's ``forward``, where DeepSpeed ZeRO-3 gathers
    partitioned parameters with its ordinary per-module hooks (a parent reaching into a
    child's parameter relies on ZeRO-3's on-access fallback, ``ZeROOrderedDict``, instead).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int]) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C_in, T, H, W] -> [B, D, G, h, w]``, G = T // kt, h = H // kh, w = W // kw.

        Trailing planes/rows/columns that do not fill a kernel are dropped, as the strided
        convolution drops them.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, T, H, W], got {list(x.shape)}")
        kt, kh, kw = self.kernel_size
        b, c, t, hh, ww = x.shape
        g, h, w = t // kt, hh // kh, ww // kw
        x = x[:, :, : g * kt, : h * kh, : w * kw]  # a view; a no-op for the model's sizes
        x = x.reshape(b, c, g, kt, h, kh, w, kw)
        # [B, G, h, w, C_in, kt, kh, kw]: the value order of weight.flatten(1), i.e. the
        # conv's (C_in, kt, kh, kw) = (1, u, p, p); this reshape is the one copy
        patches = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, g, h, w, c * kt * kh * kw)
        out = F.linear(patches, self.weight.flatten(1), self.bias)  # [B, G, h, w, D]
        return out.permute(0, 4, 1, 2, 3)  # [B, D, G, h, w] (a view)


class PatchEmbed3D(nn.Module):
    """Tokeniser: a (u bands, p, p) kernel = stride 3D convolution over a 1-channel volume,
    computed as patchify + one matrix product (:class:`PatchLinear3d`).

    ``[B, 1, T, H, W] -> [B, G, L, D]`` (official ``video_vit.PatchEmbed``, L15-75; there a
    ``Conv3d``). The parameters are ``proj.weight [D, 1, u, p, p]`` and ``proj.bias [D]`` as in
    the official checkpoints.
    """

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__()
        kernel = (cfg.band_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = PatchLinear3d(1, embed_dim, kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, D, G, h, w], a permuted view of a [B, G, h, w, D] tensor
        # flatten (h, w) is a view, and the permute gives back the contiguous [B, G, h*w, D]
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


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth on a residual branch ``[B, ...]``: each sample's branch is zeroed with
    probability ``rate`` and kept ones are scaled by ``1 / (1 - rate)`` so the expectation is
    unchanged (timm ``drop_path``, which the official ``util/video_vit.py`` L9/L220 imports).
    The identity in eval mode or at rate 0 (no random numbers are drawn then)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) < keep
    return x * mask.to(x.dtype) / keep


class Block(nn.Module):
    """Pre-norm transformer block (official ``video_vit.Block``).

    ``drop_path`` is the stochastic-depth rate of both residual branches (independent draws,
    official ``video_vit.py`` L231-232); 0 in pretraining (the official MAE builds no
    ``DropPath`` there) and by default. A plain float, not a module: the state-dict keys are
    the official ones whatever the rate. Set the per-depth rates of a built model with
    :func:`set_drop_path`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = float(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path:g}" if self.drop_path else ""


def set_drop_path(blocks: nn.ModuleList | list[Block], rate: float) -> list[float]:
    """Give ``blocks`` the stochastic-depth rates ``linspace(0, rate, depth)`` (the first block
    0, the last ``rate``; MAE/timm ``drop_path_rate``, official ``models_vit_tensor.py`` L84-86)
    and return them. ``rate`` 0 turns drop-path off everywhere."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop-path rate {rate} is outside [0, 1)")
    rates = torch.linspace(0.0, rate, len(blocks)).tolist()
    for blk, r in zip(blocks, rates):
        blk.drop_path = float(r)
    return rates


def sincos(pos: Tensor, dim: int) -> Tensor:
    """1D sin-cos encoding ``[...] -> [..., dim]`` (MAE's ``get_1d_sincos_pos_embed_from_grid``):
    ``sin(pos * w_i)`` then ``cos(pos * w_i)``, ``w_i = 10000 ** (-i / (dim / 2))``, i < dim / 2.
    Computed in float64 (positions such as a year are large), returned as float32."""
    half = dim // 2
    omega = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angle = pos.to(torch.float64)[..., None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def date_encoding(dates: Tensor, dim: int) -> Tensor:
    """``[B, T, 2]`` (year, day of year) -> ``[B, T, dim]``: sin-cos of the year in the first
    half, of the day of year in the second (SatMAE's and Prithvi-EO-2.0's temporal encoding).
    The day of year carries the season; the year separates stacks of different years."""
    return torch.cat([sincos(dates[..., 0], dim // 2), sincos(dates[..., 1], dim // 2)], dim=-1)


def gsd_grid_encoding(grid: int, gsd_ratio: Tensor, dim: int) -> Tensor:
    """Scale-MAE's ground-distance encoding: ``[B]`` ratios gsd / reference -> ``[B, L, dim]``.

    Token (row, col) of the ``grid x grid`` token grid sits at (row, col) x ratio: 2D sin-cos
    with the row in the first half of the dimensions and the column in the second, so a chip
    at 20 m sees its tokens twice as far apart as one at 10 m."""
    rows, cols = torch.meshgrid(torch.arange(grid, device=gsd_ratio.device),
                                torch.arange(grid, device=gsd_ratio.device), indexing="ij")
    r = gsd_ratio.to(torch.float64)[:, None]  # [B, 1]
    return torch.cat([sincos(rows.reshape(1, -1) * r, dim // 2),
                      sincos(cols.reshape(1, -1) * r, dim // 2)], dim=-1)


class MAEOutput(NamedTuple):
    """What :meth:`SpectralMAE.forward` returns."""

    loss: Tensor
    """Scalar: token_loss_weight x loss_token + spectral_loss_weight x loss_spectral."""
    loss_token: Tensor
    """Scalar: MSE over masked tokens ("token-to-token")."""
    loss_spectral: Tensor
    """Scalar: MSE of the spectral-group sums over all positions ("spectral-to-spectral")."""
    pred: Tensor
    """``[B, N, K]`` predicted values of every token (visible ones included), N = T*G*L."""
    mask: Tensor
    """``[B, N]`` 1 where the token was removed, 0 where the encoder saw it."""


# --------------------------------------------------------------------------- the model


def pos_table(spatial: Tensor, spectral: Tensor) -> Tensor:
    """Separable position table ``[1, G*L, D]``: spatial[l] + spectral[g] for token g*L + l."""
    g, n_l = spectral.shape[1], spatial.shape[1]
    return spatial.repeat(1, g, 1) + spectral.repeat_interleave(n_l, dim=1)


def positions(c: ModelConfig, spatial: Tensor, spectral: Tensor, date_table: Tensor | None, t: int,
              dates: Tensor | None, gsd: Tensor | None) -> Tensor:
    """Everything added to the tokens of one side (encoder or decoder): ``[1 or B, N, D]``.

    The official separable table, plus (option) the GSD encoding of every spatial
    position, repeated over the groups, plus (T > 1) each date's encoding on every token
    of that date. Single dates with the GSD encoding off get the official table alone.
    Shared by pretraining and the unmasked encoder of evaluation and embedding.
    """
    pos = pos_table(spatial, spectral)  # [1, G*L, D]
    dim = pos.shape[-1]
    if c.gsd_encoding:
        ratio = (gsd.to(pos.device) if gsd is not None else torch.full((1,), c.reference_gsd, device=pos.device))
        enc = gsd_grid_encoding(c.grid_size, ratio / c.reference_gsd, dim)  # [B or 1, L, D]
        pos = pos + c.encoding_scale * enc.to(pos.dtype).repeat(1, c.num_groups, 1)
    if t == 1:
        return pos
    if c.date_encoding == "sincos":
        if dates is None:
            raise ValueError("a time stack needs its acquisition dates ([B, T, 2] year and day of "
                             "year) for model.date_encoding 'sincos'")
        per_date = c.encoding_scale * date_encoding(dates.to(pos.device), dim).to(pos.dtype)  # [B, T, D]
    elif c.date_encoding == "learned":
        assert date_table is not None
        per_date = date_table[:, :t]  # [1, T, D]
    else:
        per_date = pos.new_zeros(1, t, dim)
    out = pos[:, None] + per_date[:, :, None]  # [B or 1, T, G*L, D]
    return out.reshape(out.shape[0], -1, dim)  # token t*G*L + g*L + l


class SpectralMAE(nn.Module):
    """SpectralGPT masked autoencoder. Input ``[B, 12, H, W]`` (one date; the official
    ``[B, 1, 12, H, W]`` too) or ``[B, T, 12, H, W]`` (T = ``cfg.num_dates`` dates), float."""

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

        # Learned date tables exist only when asked for, so the default state dict is the
        # official one (official weights load strictly; see load_official_state_dict).
        if cfg.date_encoding == "learned":
            self.pos_embed_date = nn.Parameter(torch.zeros(1, cfg.max_dates, d))
            self.decoder_pos_embed_date = nn.Parameter(torch.zeros(1, cfg.max_dates, dd))

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init (``models_mae_spectral.py`` L161-195)."""
        for table in (self.pos_embed_spatial, self.pos_embed_temporal,
                      self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal):
            nn.init.trunc_normal_(table, std=0.02)
        for name in DATE_TABLES:  # drawn after the official tables: their draws are unchanged
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02)
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
        """``[B, 12, H, W] -> [B, G*L, K]``, or ``[B, T, 12, H, W] -> [B, T*G*L, K]``: tokens
        ordered (date, group, row, col), values (band-in-group, y, x) (official ``patchify``,
        L197-213, per date)."""
        c = self.cfg
        b = imgs.shape[0]
        t = imgs.shape[1] if imgs.dim() == 5 else 1
        u, p, g, h = c.band_patch_size, c.patch_size, c.num_groups, c.grid_size
        x = imgs.reshape(b * t, g, u, h, p, h, p)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)  # [B*T, G, h, w, u, p, p]
        return x.reshape(b, t * g * h * h, u * p * p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`patchify`: ``[B, N, K] -> [B, 12, H, W]`` for one date's tokens,
        ``[B, T, 12, H, W]`` for T dates' (N = T*G*L)."""
        c = self.cfg
        b = x.shape[0]
        u, p, g, h = c.band_patch_size, c.patch_size, c.num_groups, c.grid_size
        t = x.shape[1] // c.tokens_per_date
        x = x.reshape(b * t, g, h, h, u, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # [B*T, G, u, h, p, w, p]
        x = x.reshape(b, t, g * u, h * p, h * p)
        return x[:, 0] if t == 1 else x

    def _positions(self, spatial: Tensor, spectral: Tensor, date_table: Tensor | None, t: int,
                   dates: Tensor | None, gsd: Tensor | None) -> Tensor:
        """:func:`positions` with this model's config."""
        return positions(self.cfg, spatial, spectral, date_table, t, dates, gsd)

    # ------------------------------------------------------------------ masking

    @staticmethod
    def random_masking(
        x: Tensor, mask_ratio: float, generator: torch.Generator | None = None, *, tubes: int = 1,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a uniformly random subset of tokens per sample (MAE ``random_masking``).

        Args:
            x: ``[B, N, D]`` tokens.
            mask_ratio: fraction removed; ``int(N * (1 - ratio))`` tokens are kept.
            generator: optional RNG for reproducible masks (tests, reconstruction images).
            tubes: T > 1 for tube masking of T dates (tokens date-major, N = T*M): one noise
                value per (group, row, col) shared by its T dates, so the same M-positions are
                kept at every date: ``T * int(M * (1 - ratio))`` tokens in all.

        Returns:
            ``x_kept [B, n_keep, D]``, ``mask [B, N]`` (1 = removed), ``ids_restore [B, N]``.
        """
        b, n, d = x.shape
        if tubes > 1:
            per = n // tubes
            n_keep = tubes * int(per * (1 - mask_ratio))
            # the T copies of a noise value are equal, so a stable sort keeps them adjacent
            # and the kept prefix is made of whole tubes
            noise = torch.rand(b, per, device=x.device, generator=generator).repeat(1, tubes)
            ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        else:
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
        self, imgs: Tensor, mask_ratio: float, generator: torch.Generator | None = None, *,
        dates: Tensor | None = None, gsd: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, T, 12, H, W]`` (T dates; the official ``[B, 1, 12, H, W]`` is T = 1) -> latent
        ``[B, n_keep, D]``, mask ``[B, N]``, ids_restore ``[B, N]``.

        ``dates`` ``[B, T, 2]`` (year, day of year) and ``gsd`` ``[B]`` (m/px) feed the date
        and GSD encodings when the config uses them."""
        b, t = imgs.shape[:2]
        x = self.patch_embed(imgs.reshape(b * t, 1, *imgs.shape[2:]))  # [B*T, G, L, D]
        x = x.reshape(b, -1, x.shape[-1])  # [B, N, D], token = (date * G + group) * L + spatial
        # Adding positions before masking equals the official gather-after-masking (L277-290).
        x = x + self._positions(self.pos_embed_spatial, self.pos_embed_temporal,
                                getattr(self, "pos_embed_date", None), t, dates, gsd)
        tubes = t if self.cfg.masking == "tube" else 1
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator, tubes=tubes)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, *, dates: Tensor | None = None,
                        gsd: Tensor | None = None) -> Tensor:
        """latent ``[B, n_keep, D]`` -> predictions ``[B, N, K]`` for every token."""
        x = self.decoder_embed(latent)  # [B, n_keep, Dd]
        b, n_keep, dd = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - n_keep, dd)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
        x = x + self._positions(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal,
                                getattr(self, "decoder_pos_embed_date", None),
                                n // self.cfg.tokens_per_date, dates, gsd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # ------------------------------------------------------------------ loss

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor,
                     valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Multi-target loss (official ``forward_loss``, L413-465), computed in float32.

        * token term: mean over the K values of (pred - target)^2, averaged over masked tokens;
        * spectral term: sum prediction and target over the G spectral groups at every
          date, spatial position and value offset (``[B, T, L, K]``), then MSE over all of
          them (visible included, as in the official code, which uses an all-ones mask there).

        Args:
            imgs: ``[B, 12, H, W]`` or ``[B, T, 12, H, W]`` normalised input.
            pred: ``[B, N, K]``; mask: ``[B, N]`` (1 = removed).
            valid: ``[B, T]`` 1 for dates with data, 0 for a missing date (all nodata) of a
                stack, which is left out of both terms; None: every date counts.

        Returns:
            total, token term, spectral term (scalars).
        """
        c = self.cfg
        target = self.patchify(imgs).float()  # [B, N, K]
        pred = pred.float()
        mask = mask.float()
        b, n, k = target.shape
        t = n // c.tokens_per_date
        group_sum = (target.view(b, t, c.num_groups, c.num_spatial, k).sum(2),  # [B, T, L, K]
                     pred.view(b, t, c.num_groups, c.num_spatial, k).sum(2))
        if c.norm_pix_loss:  # official: normalises only the token term's target (L448-451)
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss_token = ((pred - target) ** 2).mean(-1)  # [B, N]
        spectral = (group_sum[1] - group_sum[0]) ** 2  # [B, T, L, K]
        if valid is None:
            loss_token = (loss_token * mask).sum() / mask.sum()
            loss_spectral = spectral.mean()
        else:
            per_date = valid.float().to(mask.device)  # [B, T]
            weight = mask * per_date.repeat_interleave(c.tokens_per_date, dim=1)
            loss_token = (loss_token * weight).sum() / weight.sum().clamp_min(1.0)
            loss_spectral = (spectral.mean(dim=(2, 3)) * per_date).sum() / per_date.sum().clamp_min(1.0)
        loss = c.token_loss_weight * loss_token + c.spectral_loss_weight * loss_spectral
        return loss, loss_token, loss_spectral

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        *,
        dates: Tensor | None = None,
        gsd: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode and score a batch.

        Args:
            imgs: ``[B, 12, H, W]`` (one date; also the official ``[B, 1, 12, H, W]``) or
                ``[B, T, 12, H, W]`` with T = ``cfg.num_dates``.
            mask_ratio: override of ``cfg.mask_ratio``.
            generator: RNG for the mask (tests, reconstruction images).
            dates: ``[B, T, 2]`` (year, day of year) of every date; needed for T > 1 with
                the ``sincos`` date encoding.
            gsd: ``[B]`` ground distance in m/px (the sample JSON ``gsd``), for the GSD
                encoding; None: ``cfg.reference_gsd``.
            valid: ``[B, T]`` dates with data (see :meth:`forward_loss`).
        """
        if imgs.dim() == 4:
            imgs = imgs.unsqueeze(1)
        c = self.cfg
        expected = (c.num_dates, c.num_bands, c.img_size, c.img_size)
        if imgs.dim() != 5 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], "
                             f"got {list(imgs.shape)}")
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator, dates=dates, gsd=gsd)
        pred = self.forward_decoder(latent, ids_restore, dates=dates, gsd=gsd)
        loss, loss_token, loss_spectral = self.forward_loss(
            imgs[:, 0] if c.num_dates == 1 else imgs, pred, mask, valid)
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
#: learned date tables (``model.date_encoding: learned``): not in official or single-date files
DATE_TABLES = ("pos_embed_date", "decoder_pos_embed_date")


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
    # A model with learned date tables starts them fresh (trunc-normal 0.02, as drawn at
    # construction) from a file that has none: official weights, single-date runs.
    state.update({k: own[k] for k in DATE_TABLES if k in own and k not in state})
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

