"""The official SpectralGPT fine-tuned classifier, rebuilt from its state dict.

The official EuroSAT and BigEarthNet fine-tuning (``main_finetune.py`` L272-274 with
``--model_type tensor``) builds ``models_vit_tensor.VisionTransformer`` (builder
``vit_base_patch8_128``, L264-278) and saves ``{"model": model.state_dict(), "optimizer": ...,
"epoch": ..., "scaler": ..., "args": ...}`` (``util/misc.py`` ``save_model``). This module
reads such a state dict and reproduces that model's forward pass exactly
(``../shared/research/spectralgpt.md`` section 5.1; facts checked against
danfenghong/IEEE_TPAMI_SpectralGPT ``56d2c4d``). Written from those facts, not copied.

Official forward (``models_vit_tensor.py`` L141-198), input ``[B, T=12, H, W]``:

1. insert a channel axis -> ``[B, 1, T, H, W]`` (L146) and tokenise with one Conv3d,
   kernel = stride = ``(u, p, p)`` -> ``[B, G, L, D]`` (``util/video_vit.py`` L64-75), flattened
   group-major to ``[B, G*L, D]`` (L148-150);
2. (``cls_embed=True`` only, never used by the builders) prepend ``cls_token`` (L153-156);
3. add the position table: a **joint** learned ``pos_embed`` ``[1, G*L, D]`` for the default
   ``sep_pos_embed=False`` (L44, L80-82, L175) - the table the fine-tuned classifiers carry -
   or ``pos_embed_spatial[l] + pos_embed_temporal[g]`` for ``sep_pos_embed=True`` (L158-165);
4. the pre-norm blocks (separate q/k/v projections, GELU MLP; L187-188);
5. pool ``x[:, 1:, :].mean(dim=1)`` (L194): the first token is dropped even though there is
   no cls token, so one patch token (group 0, top-left) never reaches the head;
6. the final LayerNorm named ``norm`` (L195; ``fc_norm`` is commented out, L196, and
   ``global_pool`` is not passed for the tensor model, ``main_finetune.py`` L273), dropout
   (p = 0 by default, L43, L197; identity at inference) and the Linear ``head`` (L198).

Key names are the official ones (``patch_embed.proj``, ``pos_embed`` or
``pos_embed_spatial``/``pos_embed_temporal``, ``blocks.i.{norm1,attn.{q,k,v,proj},norm2,
mlp.{fc1,fc2}}``, ``norm``, ``head``; ``cls_token``/``pos_embed_class`` when present), so
``load_state_dict(strict=True)`` of an official fine-tuned state dict works.

What shapes cannot tell, and what is assumed:

* head counts: from the preset with the same width and depth (as
  ``checkpoints.infer_config``), or ``preset`` / ``num_heads``;
* LayerNorm eps 1e-6: every official builder passes ``partial(nn.LayerNorm, eps=1e-6)``;
* with a joint table the band count (the official ``num_frames``) is not in the shapes:
  ``num_bands`` (default 12, every builder but ``vit_base_patch8_channel10``) fixes the
  number of groups G = num_bands / u, hence L = table length / G.

Other official layouts are recognised by :func:`official_layout` so the loaders can name
them: the pretrained MAE (``decoder_embed.weight``) and the dense UPerNet models of
SegMunich (``models_vit_tensor_CD_2.py``) and OSCD (``models_vit_tensor_CD.py``), which carry
``cls_seg.*``, ``decoder.PPMHead.*`` / ``decoder.Conv_fuse*`` (the FPN head), ``conv0..3.*``
and ``fc.0.*`` (the ``Linear(4 -> 1)`` group fusion). Dense models are not supported yet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.evaluation.errors import EvaluationError
from training.models.spectral_mae import LN_EPS, PRESETS, Block, pos_table

__all__ = ["ClassifierSpec", "Layout", "OfficialClassifier", "classifier_spec",
           "official_layout", "state_dict_of"]

Layout = Literal["mae", "classifier", "dense"]

#: Key prefixes only the official dense models have (SegMunich ``models_vit_tensor_CD_2.py``
#: L174-219, OSCD ``models_vit_tensor_CD.py`` L179-250): the segmentation conv, the UPerNet
#: FPN head (``decoder = FPNHEAD()``; ours is ``decoder_*`` with an underscore) and the
#: pyramid convolutions.
DENSE_PREFIXES = ("cls_seg.", "decoder.PPMHead.", "decoder.Conv_fuse", "decoder.fuse_all.",
                  "decoder.conv_x1.", "conv0.0.", "conv3.0.")

#: Bands the official builders take (``num_frames=12``); see the module doc.
DEFAULT_NUM_BANDS = 12


def state_dict_of(obj: Any) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: ``{"model": state}`` (the official ``save_model``
    wrapper) or a bare state dict, ``module.`` prefixes (DDP-wrapped saves) removed.

    Raises:
        EvaluationError: ``obj`` holds no state dict.
    """
    if not isinstance(obj, Mapping):
        raise EvaluationError(f"a checkpoint must hold a state dict, not a {type(obj).__name__}")
    state = obj.get("model", obj)
    if not isinstance(state, Mapping):
        raise EvaluationError("the checkpoint's 'model' entry is not a state dict")
    return {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def official_layout(state: Mapping[str, Tensor]) -> Layout:
    """Which official model a state dict (prefixes already removed) belongs to.

    ``mae``: the pretraining MAE (``SpectralGPT.pth``); ``classifier``: a fine-tuned
    ``models_vit_tensor`` classifier (``head.weight``, no decoder); ``dense``: a SegMunich or
    OSCD UPerNet model.

    Raises:
        EvaluationError: none of these; the message names the keys looked for.
    """
    if any(k.startswith(DENSE_PREFIXES) for k in state):
        return "dense"
    if "decoder_embed.weight" in state:
        return "mae"
    if "head.weight" in state:
        return "classifier"
    sample = ", ".join(sorted(state)[:4]) or "none"
    raise EvaluationError(f"not the SpectralGPT key layout: no decoder_embed.weight (pretrained "
                          f"MAE) and no head.weight (fine-tuned classifier); keys: {sample}, ...")


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture of an official fine-tuned classifier (the builder's arguments)."""

    img_size: int
    """Square input side in px (``img_size``)."""
    num_bands: int
    """Bands of the input, the official ``num_frames``."""
    patch_size: int
    """Token side in px (8 in every released builder)."""
    band_patch_size: int
    """Bands per token u (the official ``t_patch_size``, 3)."""
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int
    sep_pos_embed: bool
    """True: ``pos_embed_spatial`` + ``pos_embed_temporal``; False: one joint ``pos_embed``."""
    cls_embed: bool = False
    """A ``cls_token`` is prepended (``cls_embed=True``; not used by the official builders)."""
    qkv_bias: bool = True
    """q/k/v projections with bias (official ``no_qkv_bias=False``)."""

    @property
    def num_groups(self) -> int:
        """Spectral groups G = num_bands / u."""
        return self.num_bands // self.band_patch_size

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_spatial(self) -> int:
        """Spatial positions L = (img_size / p)^2."""
        return self.grid_size**2


def count_layers(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of ``<prefix>.<i>.`` layers in a state dict (``blocks``, ``decoder_blocks``)."""
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _heads(width: int, depth: int, preset: str | None, num_heads: int | None) -> int:
    """Head count: ``num_heads``, else ``preset``'s, else the preset of this width and depth."""
    if num_heads is not None:
        if num_heads < 1 or width % num_heads:
            raise EvaluationError(f"--num-heads {num_heads} does not divide the width {width}")
        return num_heads
    if preset is not None:
        if preset not in PRESETS:
            raise EvaluationError(f"unknown --preset '{preset}' (known: {', '.join(PRESETS)})")
        return PRESETS[preset]().num_heads
    for factory in PRESETS.values():
        ref = factory()
        if ref.embed_dim == width and ref.depth == depth:
            return ref.num_heads
    raise EvaluationError(f"no preset has width {width} and depth {depth}: pass --preset or "
                          f"--num-heads to say how many attention heads the checkpoint has")


def classifier_spec(state: Mapping[str, Tensor], *, preset: str | None = None,
                    num_heads: int | None = None,
                    num_bands: int = DEFAULT_NUM_BANDS) -> ClassifierSpec:
    """The :class:`ClassifierSpec` of an official fine-tuned classifier state dict.

    Args:
        state: official key names (no ``module.`` prefix).
        preset, num_heads: where the head count comes from (module doc).
        num_bands: input bands, needed only to split a joint table into G x L.

    Raises:
        EvaluationError: keys missing or shapes inconsistent, with the reason.
    """
    try:
        w = state["patch_embed.proj.weight"]  # [D, 1, u, p, p]
        head = state["head.weight"]  # [C, D]
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise EvaluationError(f"checkpoint lacks {exc}: not the SpectralGPT classifier key "
                              f"layout") from None
    if w.dim() != 5 or w.shape[1] != 1 or w.shape[3] != w.shape[4]:
        raise EvaluationError(f"patch_embed.proj.weight has shape {list(w.shape)}, not the "
                              f"SpectralGPT 3D tokeniser [D, 1, u, p, p]")
    d, u, p = int(w.shape[0]), int(w.shape[2]), int(w.shape[3])
    cls_embed = "cls_token" in state
    sep = "pos_embed_spatial" in state
    if sep:
        if "pos_embed_temporal" not in state:
            raise EvaluationError("checkpoint has pos_embed_spatial but no pos_embed_temporal")
        n_l = int(state["pos_embed_spatial"].shape[1])
        groups = int(state["pos_embed_temporal"].shape[1])
        num_bands = groups * u
    elif "pos_embed" in state:
        n = int(state["pos_embed"].shape[1]) - int(cls_embed)  # the cls row comes first (L76)
        if num_bands % u:
            raise EvaluationError(f"{num_bands} bands do not split into groups of {u}")
        groups = num_bands // u
        if n % groups:
            raise EvaluationError(f"pos_embed has {n} token rows, not a multiple of the {groups} "
                                  f"spectral groups of {num_bands} bands")
        n_l = n // groups
    else:
        raise EvaluationError("checkpoint has neither pos_embed (joint table) nor "
                              "pos_embed_spatial/pos_embed_temporal: not the SpectralGPT layout")
    grid = math.isqrt(n_l)
    if grid * grid != n_l:
        raise EvaluationError(f"{n_l} spatial positions are not a square grid")
    depth = count_layers(state, "blocks")
    return ClassifierSpec(
        img_size=grid * p, num_bands=num_bands, patch_size=p, band_patch_size=u, embed_dim=d,
        depth=depth, num_heads=_heads(d, depth, preset, num_heads), mlp_ratio=hidden / d,
        num_classes=int(head.shape[0]), sep_pos_embed=sep, cls_embed=cls_embed,
        qkv_bias="blocks.0.attn.q.bias" in state)


class _PatchEmbed(nn.Module):
    """Holds the tokeniser Conv3d under the official name ``patch_embed.proj``."""

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        kernel = (spec.band_patch_size, spec.patch_size, spec.patch_size)
        self.proj = nn.Conv3d(1, spec.embed_dim, kernel_size=kernel, stride=kernel)


class OfficialClassifier(nn.Module):
    """Official fine-tuned classifier: ``[B, 12, H, W]`` model input -> logits ``[B, C]``.

    The input is what the official model was fed (already normalised; ``[B, 1, 12, H, W]``
    is accepted too); H = W = ``spec.img_size`` (the official ``PatchEmbed`` asserts it,
    ``video_vit.py`` L68-72). Parameters are zeros until a state dict is loaded
    (:meth:`from_state_dict`).
    """

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        self.patch_embed = _PatchEmbed(spec)
        if spec.cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if spec.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, spec.num_spatial, d))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, spec.num_groups, d))
            if spec.cls_embed:
                self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, d))
        else:
            rows = spec.num_groups * spec.num_spatial + int(spec.cls_embed)
            self.pos_embed = nn.Parameter(torch.zeros(1, rows, d))
        # The project's Block has the official names and arithmetic (pre-norm, separate
        # q/k/v, GELU MLP, LayerNorm eps 1e-6; drop-path is inactive at inference).
        self.blocks = nn.ModuleList(Block(d, spec.num_heads, spec.mlp_ratio)
                                    for _ in range(spec.depth))
        if not spec.qkv_bias:  # official no_qkv_bias=True: q/k/v without bias
            for blk in self.blocks:
                for name in ("q", "k", "v"):
                    setattr(blk.attn, name, nn.Linear(d, d, bias=False))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.dropout = nn.Dropout(0.0)  # official default dropout=0 (L43); no parameters
        self.head = nn.Linear(d, spec.num_classes)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, preset: str | None = None,
                        num_heads: int | None = None,
                        num_bands: int = DEFAULT_NUM_BANDS) -> OfficialClassifier:
        """Build from the shapes of ``state`` (``{"model": ...}`` and ``module.`` allowed)
        and load it with ``strict=True``; returned in eval mode.

        Raises:
            EvaluationError: not an official classifier state dict, or keys left over.
        """
        tensors = state_dict_of(state)
        layout = official_layout(tensors)
        if layout != "classifier":
            raise EvaluationError(f"not a fine-tuned classifier: the state dict has the official "
                                  f"{'pretrained MAE' if layout == 'mae' else 'dense (UPerNet)'} "
                                  f"layout")
        model = cls(classifier_spec(tensors, preset=preset, num_heads=num_heads,
                                    num_bands=num_bands))
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise EvaluationError(f"state dict does not fit the official classifier: {first}") from None
        return model.eval()

    def position_table(self) -> Tensor:
        """``[1, (1 +) G*L, D]``: the table added to the tokens (cls row first if any)."""
        if not self.spec.sep_pos_embed:
            return self.pos_embed
        table = pos_table(self.pos_embed_spatial, self.pos_embed_temporal)  # spatial[l] + spectral[g]
        if self.spec.cls_embed:
            table = torch.cat([self.pos_embed_class, table], dim=1)
        return table

    def tokens(self, x: Tensor) -> Tensor:
        """Model input ``[B, 12, H, W]`` -> tokens after the last block ``[B, (1 +) G*L, D]``."""
        s = self.spec
        if x.dim() == 5 and x.shape[1] == 1:
            x = x[:, 0]
        expected = (s.num_bands, s.img_size, s.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")
        t = self.patch_embed.proj(x.unsqueeze(1))  # [B, D, G, h, w]
        b, d = t.shape[:2]
        t = t.flatten(3).permute(0, 2, 3, 1).reshape(b, -1, d)  # token g*L + l (L148-150)
        if s.cls_embed:
            t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        t = t + self.position_table()
        for blk in self.blocks:
            t = blk(t)
        return t

    def features(self, x: Tensor) -> Tensor:
        """``[B, 12, H, W]`` -> the normalised pooled feature ``[B, D]`` the head sees."""
        # x[:, 1:] as the official L194: drops the cls token, or (no cls token, the
        # builders' default) the first patch token - kept to give the official outputs.
        return self.norm(self.tokens(x)[:, 1:, :].mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 12, H, W]`` -> logits ``[B, num_classes]`` (no softmax / sigmoid)."""
        return self.head(self.dropout(self.features(x)))
