"""The tokeniser computed as patchify + one Linear equals the official strided Conv3d.

``PatchEmbed3D`` runs ``F.linear`` over non-overlapping (u, p, p) patches with the conv's own
``proj.weight [D, 1, u, p, p]`` (issue #20: cuDNN's bf16 Conv3d path is 11-18x slower). The
reference here is ``F.conv3d`` with the same weights, kernel = stride (the official
``video_vit.PatchEmbed``), on random weights, in fp32: outputs and gradients (input, weight,
bias) must agree to 1e-5. State-dict keys and shapes stay the official ones. The CPU timing
of both forms is printed as information only (``pytest -s``), never asserted.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.spectral_mae import PatchEmbed3D, PatchLinear3d, build_model

TOL = 1e-5


def _conv_tokens(embed: PatchEmbed3D, x: Tensor) -> Tensor:
    """The official tokeniser: ``Conv3d`` kernel = stride, then ``[B, D, G, h, w] -> [B, G, L, D]``."""
    proj = embed.proj
    out = F.conv3d(x, proj.weight, proj.bias, stride=proj.kernel_size)
    return out.flatten(3).permute(0, 2, 3, 1)


def _random_embed(preset: str, img_size: int, seed: int) -> PatchEmbed3D:
    """The tokeniser of a real model, with random (not initialised) weights and bias."""
    embed = build_model(preset, img_size=img_size).patch_embed
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.randn(embed.proj.weight.shape, generator=gen) * 0.05)
        embed.proj.bias.copy_(torch.randn(embed.proj.bias.shape, generator=gen))
    return embed


CASES = [
    # (preset, img_size, leading batch): one date each, and a 3-date stack of 2 samples fed
    # as the model feeds it, [B*T, 1, 12, H, W]
    pytest.param("tiny", 96, 3, id="tiny-96px"),
    pytest.param("base", 128, 2, id="base-128px"),
    pytest.param("tiny", 64, 2 * 3, id="tiny-time-stack-BxT"),
]


@pytest.mark.parametrize(("preset", "img_size", "batch"), CASES)
def test_linear_tokeniser_equals_the_conv3d(preset: str, img_size: int, batch: int) -> None:
    embed = _random_embed(preset, img_size, seed=1)
    cfg = build_model(preset, img_size=img_size).cfg
    x = torch.randn(batch, 1, 12, img_size, img_size, generator=torch.Generator().manual_seed(2))

    out = embed(x)
    ref = _conv_tokens(embed, x)
    assert out.shape == (batch, cfg.num_groups, cfg.num_spatial, cfg.embed_dim)
    assert out.is_contiguous()
    diff = (out - ref).abs().max().item()
    print(f"\n{preset} {img_size}px [{batch}, 1, 12, {img_size}, {img_size}]: forward max |diff| {diff:.3g} "
          f"(max |out| {ref.abs().max().item():.3g})")
    assert diff <= TOL

    # the module alone is a drop-in Conv3d: same output layout [B, D, G, h, w]
    conv = F.conv3d(x, embed.proj.weight, embed.proj.bias, stride=embed.proj.kernel_size)
    assert (embed.proj(x) - conv).abs().max().item() <= TOL


@pytest.mark.parametrize(("preset", "img_size", "batch"), CASES)
def test_linear_tokeniser_gradients_equal_the_conv3d(preset: str, img_size: int, batch: int) -> None:
    """Backward through both forms with the same upstream gradient: equal gradients of the
    input, the weight and the bias (the weight and bias sums run over B*G*L tokens, so they
    are compared relative to their size)."""
    embed = _random_embed(preset, img_size, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 1, 12, img_size, img_size, generator=gen)
    upstream = torch.randn(_conv_tokens(embed, x).shape, generator=gen)

    grads = []
    for forward in (embed, lambda t: _conv_tokens(embed, t)):
        embed.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        (forward(xi) * upstream).sum().backward()
        grads.append((xi.grad, embed.proj.weight.grad.clone(), embed.proj.bias.grad.clone()))

    for name, lin, conv in zip(("input", "weight", "bias"), *grads):
        diff = (lin - conv).abs().max().item()
        scale = max(1.0, conv.abs().max().item())
        print(f"\n{preset} {img_size}px grad {name}: max |diff| {diff:.3g} (max |grad| {scale:.3g})")
        assert diff <= TOL * scale, name


def test_non_divisible_input_is_cropped_like_the_strided_conv() -> None:
    """The strided conv drops trailing pixels that do not fill a kernel; so does the linear form."""
    proj = PatchLinear3d(1, 16, (3, 8, 8))
    x = torch.randn(2, 1, 13, 35, 42)
    ref = F.conv3d(x, proj.weight, proj.bias, stride=(3, 8, 8))
    out = proj(x)
    assert out.shape == ref.shape == (2, 16, 4, 4, 5)
    assert (out - ref).abs().max().item() <= TOL


def test_wrong_channel_count_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expected input \[B, 1, T, H, W\]"):
        PatchLinear3d(1, 16, (3, 8, 8))(torch.randn(2, 3, 12, 16, 16))


def test_state_dict_keys_and_shapes_are_the_official_ones() -> None:
    """``patch_embed.proj.weight [D, 1, u, p, p]`` and ``.bias [D]``, nothing else under
    ``patch_embed``; the module is still a ``Conv3d`` (kernel = stride, no padding)."""
    model = build_model("base", img_size=128)
    state = model.state_dict()
    assert sorted(k for k in state if k.startswith("patch_embed")) == [
        "patch_embed.proj.bias", "patch_embed.proj.weight"]
    assert tuple(state["patch_embed.proj.weight"].shape) == (768, 1, 3, 8, 8)
    assert tuple(state["patch_embed.proj.bias"].shape) == (768,)
    proj = model.patch_embed.proj
    assert isinstance(proj, nn.Conv3d)
    assert proj.kernel_size == proj.stride == (3, 8, 8) and proj.padding == (0, 0, 0)

    # a state dict saved from a plain Conv3d tokeniser loads strictly and gives the same tokens
    plain = nn.Conv3d(1, 768, kernel_size=(3, 8, 8), stride=(3, 8, 8))
    model.patch_embed.load_state_dict({f"proj.{k}": v for k, v in plain.state_dict().items()}, strict=True)
    x = torch.randn(1, 1, 12, 128, 128)
    ref = plain(x).flatten(3).permute(0, 2, 3, 1)
    assert (model.patch_embed(x) - ref).abs().max().item() <= TOL


def _time(fn: object, x: Tensor, repeats: int) -> float:
    """Median seconds of forward + backward (the weight gradient, as in training)."""
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        fn(x).sum().backward()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def test_cpu_timing_of_conv_and_linear_is_reported() -> None:
    """Information only (``pytest -s`` prints it): fp32 forward + backward on this CPU of the
    base tokeniser at 128 px, batch 8. The GPU bf16 difference that motivated the change
    (issue #20) does not show on a CPU, where both run one GEMM; nothing is asserted."""
    embed = _random_embed("base", 128, seed=5)
    x = torch.randn(8, 1, 12, 128, 128)
    t_conv = _time(lambda t: _conv_tokens(embed, t), x, repeats=3)
    t_lin = _time(embed, x, repeats=3)
    print(f"\nCPU fp32 base tokeniser fwd+bwd, [8, 1, 12, 128, 128], {torch.get_num_threads()} threads: "
          f"conv3d {t_conv * 1e3:.1f} ms, patchify+linear {t_lin * 1e3:.1f} ms "
          f"(conv / linear {t_conv / t_lin:.2f}x)")
