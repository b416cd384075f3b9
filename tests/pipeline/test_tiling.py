"""Tiling arithmetic, quality fractions, resizing and the spatial split (pure functions)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig
from pipeline.tiling import (
    block_split,
    box_fractions,
    chip_split,
    coarsen,
    positions,
    quality_masks,
    resize_bilinear,
    small_scene_shape,
)


@given(n=st.integers(0, 3000), size=st.sampled_from([8, 32, 96, 128]), overlap=st.integers(0, 7))
@settings(max_examples=200, deadline=None)
def test_positions_cover_only_whole_chips(n: int, size: int, overlap: int) -> None:
    stride = size - overlap
    p = positions(n, size, stride)
    assert all(p + size <= n)
    if n >= size:
        assert p[0] == 0 and (np.diff(p) == stride).all()
        assert p[-1] + stride + size > n  # no further whole chip fits
    else:
        assert len(p) == 0


def test_small_scene_rule_shapes() -> None:
    assert small_scene_shape(120, 120, 128, "resize") == (128, 128)
    assert small_scene_shape(120, 300, 128, "pad") == (128, 300)
    assert small_scene_shape(120, 120, 128, "skip") is None
    assert small_scene_shape(120, 120, 96, "resize") is None


def test_box_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((16, 100)) < 0.3
    col0 = np.array([0, 10, 50, 84])
    got = box_fractions(m, col0, 16)
    want = [m[:, c : c + 16].mean() for c in col0]
    np.testing.assert_allclose(got, want)


def test_quality_masks_use_scl_groups_and_nodata() -> None:
    dn = np.full((12, 2, 4), 500, dtype=np.uint16)
    dn[3, 0, 0] = 0  # one band nodata -> pixel invalid
    scl = np.array([[4, 8, 3, 11], [10, 1, 4, 4]], dtype=np.uint8)
    m = quality_masks(dn, scl)
    assert m["nodata"].sum() == 1
    assert m["cloud"].sum() == 3  # 8, 3, 10
    assert m["shadow"].sum() == 1 and m["cirrus"].sum() == 1 and m["snow"].sum() == 1
    assert m["invalid"].sum() == 2  # nodata pixel + SCL 1
    no_scl = quality_masks(dn, np.full((2, 4), 255, np.uint8))
    assert set(no_scl) == {"nodata", "invalid"}


def test_coarsen_ignores_nodata() -> None:
    a = np.array([[[10, 20], [0, 30]]], dtype=np.uint16)
    assert coarsen(a, 2)[0, 0, 0] == 20  # mean of 10, 20, 30
    assert coarsen(np.zeros((1, 2, 2), np.uint16), 2)[0, 0, 0] == 0


def test_resize_bilinear_constant_and_nodata() -> None:
    a = np.full((2, 120, 120), 1234, dtype=np.uint16)
    out = resize_bilinear(a, 128, 128)
    assert out.shape == (2, 128, 128) and (out == 1234).all()
    a[:, :60] = 0
    out = resize_bilinear(a, 128, 128)
    assert (out[:, :60] == 0).all() and (out[:, 70:] == 1234).all()  # no dark bleed from nodata


def test_split_is_deterministic_and_blockwise() -> None:
    cfg = SplitConfig(val_fraction=0.3, block_m=10_000, seed=1)
    splits = [block_split(32629, bx, 500, cfg) for bx in range(400)]
    assert splits == [block_split(32629, bx, 500, cfg) for bx in range(400)]
    frac = splits.count("val") / len(splits)
    assert 0.2 < frac < 0.4
    # two chips in the same block share the split; a chip over a boundary of differing splits is dropped
    bx = next(i for i in range(399) if splits[i] != splits[i + 1])
    x = bx * 10_000.0
    assert chip_split(32629, x + 100, 5_000_000 + 100, x + 1060, 5_000_000 + 1060, cfg) == splits[bx]
    assert chip_split(32629, x + 9_500, 5_000_000 + 100, x + 10_460, 5_000_000 + 1060, cfg) is None
