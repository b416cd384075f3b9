"""Official fine-tuned classifiers (``models_vit_tensor.py``) load strictly and give the
official outputs.

CI has no copy of the official code, so the state dicts are written here with the official
key names (tiny sizes, seeded random weights) and the logits are checked against a forward
pass written out by hand below with plain tensor ops, following the official forward
(``../shared/research/spectralgpt.md`` section 5.1; ``models_vit_tensor.py`` L141-198):
tokenise (Conv3d, kernel = stride = (u, p, p)) -> + position table -> pre-norm blocks ->
mean over tokens[1:] -> LayerNorm ``norm`` -> ``head``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from training.evaluation import checkpoints
from training.evaluation.errors import EvaluationError
from training.evaluation.official import OfficialClassifier, classifier_spec, official_layout
from training.models.spectral_mae import build_model

# Tiny sizes: 12 bands in groups of 3 -> G = 4; 16 px in 8 px patches -> L = 4; N = 16 tokens.
D, DEPTH, HEADS, IMG, P, U, BANDS, CLASSES = 32, 2, 2, 16, 8, 3, 12, 5
G, L = BANDS // U, (IMG // P) ** 2
EPS = 1e-6  # every official builder: partial(nn.LayerNorm, eps=1e-6)


def official_state(*, sep: bool = False, cls: bool = False, qkv_bias: bool = True,
                   width: int = D, depth: int = DEPTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fine-tuned classifier state dict with the official key names and random weights."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    s: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": rnd(width, 1, U, P, P, scale=0.05),
        "patch_embed.proj.bias": rnd(width),
    }
    if cls:
        s["cls_token"] = rnd(1, 1, width)
    if sep:
        s["pos_embed_spatial"] = rnd(1, L, width)
        s["pos_embed_temporal"] = rnd(1, G, width)
        if cls:
            s["pos_embed_class"] = rnd(1, 1, width)
    else:
        s["pos_embed"] = rnd(1, G * L + int(cls), width)
    for i in range(depth):
        b = f"blocks.{i}."
        s[b + "norm1.weight"] = 1 + rnd(width, scale=0.1)
        s[b + "norm1.bias"] = rnd(width, scale=0.1)
        for name in ("q", "k", "v"):
            s[b + f"attn.{name}.weight"] = rnd(width, width)
            if qkv_bias:
                s[b + f"attn.{name}.bias"] = rnd(width, scale=0.1)
        s[b + "attn.proj.weight"] = rnd(width, width)
        s[b + "attn.proj.bias"] = rnd(width, scale=0.1)
        s[b + "norm2.weight"] = 1 + rnd(width, scale=0.1)
        s[b + "norm2.bias"] = rnd(width, scale=0.1)
        s[b + "mlp.fc1.weight"] = rnd(4 * width, width)
        s[b + "mlp.fc1.bias"] = rnd(4 * width, scale=0.1)
        s[b + "mlp.fc2.weight"] = rnd(width, 4 * width)
        s[b + "mlp.fc2.bias"] = rnd(width, scale=0.1)
    s["norm.weight"] = 1 + rnd(width, scale=0.1)
    s["norm.bias"] = rnd(width, scale=0.1)
    s["head.weight"] = rnd(CLASSES, width)
    s["head.bias"] = rnd(CLASSES, scale=0.1)
    return s


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    return (x - mean) / torch.sqrt(var + EPS) * w + b


def _linear(x: torch.Tensor, s: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ s[name + ".weight"].T
    return out + s[name + ".bias"] if name + ".bias" in s else out


def reference_logits(state: dict[str, torch.Tensor], x: torch.Tensor,
                     heads: int = HEADS) -> torch.Tensor:
    """The official classifier's forward written out by hand, in float64: ``[B, 12, H, W]``
    model input -> ``[B, C]`` logits."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    b, t, h, w = x.shape
    width = s["head.weight"].shape[1]
    gh, gw = h // P, w // P
    # Tokeniser: each token is the dot product of its (u, p, p) block with the kernel, ordered
    # group-major then row-major (Conv3d with kernel = stride, einsum "ncts->ntsc").
    blocks = x.reshape(b, t // U, U, gh, P, gw, P).permute(0, 1, 3, 5, 2, 4, 6)
    blocks = blocks.reshape(b, (t // U) * gh * gw, U * P * P)
    tok = blocks @ s["patch_embed.proj.weight"].reshape(width, -1).T + s["patch_embed.proj.bias"]
    if "cls_token" in s:
        tok = torch.cat([s["cls_token"].expand(b, -1, -1), tok], dim=1)
    if "pos_embed" in s:
        pos = s["pos_embed"]
    else:  # token g*L + l gets spatial[l] + spectral[g]
        rows = [s["pos_embed_spatial"][0, l] + s["pos_embed_temporal"][0, g]
                for g in range(t // U) for l in range(gh * gw)]
        pos = torch.stack(rows)[None]
        if "cls_token" in s:
            pos = torch.cat([s["pos_embed_class"], pos], dim=1)
    tok = tok + pos
    n, dh = tok.shape[1], width // heads
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        pre = f"blocks.{i}."
        y = _layer_norm(tok, s[pre + "norm1.weight"], s[pre + "norm1.bias"])
        q, k, v = (_linear(y, s, pre + f"attn.{m}").reshape(b, n, heads, dh).transpose(1, 2)
                   for m in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)
        tok = tok + _linear((att @ v).transpose(1, 2).reshape(b, n, width), s, pre + "attn.proj")
        y = _layer_norm(tok, s[pre + "norm2.weight"], s[pre + "norm2.bias"])
        hidden = _linear(y, s, pre + "mlp.fc1")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU (timm Mlp)
        tok = tok + _linear(hidden, s, pre + "mlp.fc2")
    pooled = tok[:, 1:, :].mean(dim=1)  # official L194: the first token is dropped
    return _linear(_layer_norm(pooled, s["norm.weight"], s["norm.bias"]), s, "head")


def _input(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, BANDS, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sep, cls, qkv_bias", [
    (False, False, True),  # the official EuroSAT / BigEarthNet classifier as run
    (True, False, True),  # sep_pos_embed=True
    (False, True, True),
    (True, True, False),
])
def test_logits_match_the_official_forward_by_hand(sep: bool, cls: bool, qkv_bias: bool) -> None:
    state = official_state(sep=sep, cls=cls, qkv_bias=qkv_bias)
    model = OfficialClassifier.from_state_dict(state, num_heads=HEADS)
    spec = model.spec
    assert (spec.img_size, spec.num_bands, spec.patch_size, spec.band_patch_size) == (IMG, BANDS, P, U)
    assert (spec.embed_dim, spec.depth, spec.num_classes, spec.mlp_ratio) == (D, DEPTH, CLASSES, 4.0)
    assert (spec.sep_pos_embed, spec.cls_embed, spec.qkv_bias) == (sep, cls, qkv_bias)
    assert not model.training
    x = _input()
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got.double(), reference_logits(state, x), rtol=0, atol=1e-5)
    # the official 5-D input [B, 1, 12, H, W] is the same
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, None]), got)


def test_strict_load_with_official_key_names() -> None:
    state = official_state()
    model = OfficialClassifier(classifier_spec(state, num_heads=HEADS))
    assert set(model.state_dict()) == set(state)  # exactly the official keys, no more
    model.load_state_dict(state, strict=True)
    extra = {**state, "fc_norm.weight": torch.ones(D)}
    with pytest.raises(EvaluationError, match="fc_norm"):
        OfficialClassifier.from_state_dict(extra, num_heads=HEADS)


def test_pooling_drops_only_the_first_token() -> None:
    """The official quirk kept: with no cls token, token 0 (group 0, top-left patch) is
    left out of the mean but still attends in the blocks."""
    state = official_state()
    model = OfficialClassifier.from_state_dict(state, num_heads=HEADS)
    x = _input(2)
    with torch.no_grad():
        tokens = model.tokens(x)
        assert tokens.shape == (2, G * L, D)
        torch.testing.assert_close(model.features(x), model.norm(tokens[:, 1:].mean(1)))
        assert not torch.allclose(model.features(x), model.norm(tokens.mean(1)))


@pytest.mark.parametrize("wrap", ["bare", "model", "module", "model+module"])
def test_checkpoint_files_with_wrappers(tmp_path: Path, wrap: str) -> None:
    state = official_state()
    saved = {f"module.{k}": v for k, v in state.items()} if "module" in wrap else dict(state)
    if wrap.startswith("model"):  # official util/misc.py save_model
        saved = {"model": saved, "optimizer": {"state": {}, "param_groups": []}, "epoch": 149,
                 "scaler": {"scale": 65536.0}, "args": argparse.Namespace(nb_classes=CLASSES)}
    path = tmp_path / "checkpoint-149.pth"
    torch.save(saved, path)
    ckpt = checkpoints.load_checkpoint(path, num_heads=HEADS)
    assert ckpt.kind == "official_classifier" and ckpt.classifier is not None
    assert ckpt.classifier.num_classes == CLASSES and ckpt.config.img_size == IMG
    model = OfficialClassifier(ckpt.classifier)
    model.load_state_dict(ckpt.state, strict=True)
    x = _input(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), reference_logits(state, x), rtol=0, atol=1e-5)
    with pytest.raises(EvaluationError, match="training.predict"):
        checkpoints.build_mae(ckpt, IMG)  # no decoder: refused in one line, not a key error


def test_head_count_from_the_preset_of_same_width_and_depth() -> None:
    state = official_state(width=96, depth=2)  # the "tiny" preset's width and depth: 4 heads
    assert classifier_spec(state).num_heads == 4
    assert classifier_spec(state, preset="base").num_heads == 12
    with pytest.raises(EvaluationError, match="--num-heads"):
        classifier_spec(official_state())  # width 32: no preset


def test_joint_table_band_count_decides_the_groups() -> None:
    state = official_state()
    assert classifier_spec(state, num_heads=HEADS).num_groups == G
    with pytest.raises(EvaluationError, match="spectral groups"):
        classifier_spec(state, num_heads=HEADS, num_bands=15)  # 5 groups do not divide 16 rows


def _dense_state() -> dict[str, torch.Tensor]:
    """Keys of the official SegMunich / OSCD models (models_vit_tensor_CD*.py): encoder with
    separable tables, group fusion fc, pyramid convs, UPerNet FPN head, cls_seg."""
    s = {k: v for k, v in official_state(sep=True).items() if not k.startswith("head.")}
    s.update({"fc.0.weight": torch.zeros(1, 4), "fc.0.bias": torch.zeros(1),
              "conv0.0.weight": torch.zeros(8, D, 1, 1),
              "decoder.PPMHead.psp_modules.0.1.weight": torch.zeros(8, 8, 1, 1),
              "decoder.fuse_all.0.weight": torch.zeros(8, 32, 1, 1),
              "cls_seg.0.weight": torch.zeros(13, 8, 3, 3), "cls_seg.0.bias": torch.zeros(13)})
    return s


def test_dense_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "segmunich.pth"
    torch.save({"model": _dense_state()}, path)
    assert official_layout(_dense_state()) == "dense"
    with pytest.raises(EvaluationError) as info:
        checkpoints.load_checkpoint(path)
    message = str(info.value)
    assert "official dense (UPerNet) checkpoints are not supported yet" in message
    assert len(message.splitlines()) == 1


def test_other_layouts(tmp_path: Path) -> None:
    mae = build_model("tiny", img_size=16)
    assert official_layout(mae.state_dict()) == "mae"
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, path)
    assert checkpoints.load_checkpoint(path).kind == "official"  # pretrained MAE unchanged
    with pytest.raises(EvaluationError, match="SpectralGPT key layout"):
        official_layout({"foo": torch.zeros(2)})
    with pytest.raises(EvaluationError, match="pretrained MAE"):
        OfficialClassifier.from_state_dict(mae.state_dict())
