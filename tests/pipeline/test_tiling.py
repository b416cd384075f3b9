"""Tiling arithmetic, quality fractions, resizing and the spatial split (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig, load_config
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


def test_resize_120_to_128_is_pixel_centre_aligned_by_value() -> None:
    """A ramp 100 + 10 x resized 120 -> 128 px: output column o samples the input at
    (o + 0.5) x 120 / 128 - 0.5 (pixel centres, clamped at the edges), not o x 119 / 127
    (align-corners); and random data agree with torch's bilinear (align_corners=False)."""
    ramp = np.broadcast_to(100 + 10 * np.arange(120, dtype=np.uint16), (3, 120, 120)).copy()
    out = resize_bilinear(ramp, 128, 128)
    pos = np.clip((np.arange(128) + 0.5) * 120 / 128 - 0.5, 0, 119)
    want = np.rint(100 + 10 * pos).astype(np.uint16)
    assert (out == want[None, None, :]).all()
    # by hand: column 64 samples 64.5 x 0.9375 - 0.5 = 59.97, column 127 samples 119.03 -> 119 (clamped)
    assert out[0, 0, 64] == 700 and out[0, 0, 0] == 100 and out[0, 0, 127] == 1290
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    a = rng.integers(1, 10000, (2, 120, 120)).astype(np.uint16)
    ref = F.interpolate(torch.from_numpy(a.astype(np.float64))[None], size=(128, 128), mode="bilinear",
                        align_corners=False)[0].numpy()
    assert np.abs(resize_bilinear(a, 128, 128).astype(np.float64) - ref).max() <= 0.5 + 1e-3


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


def test_a_chip_over_a_horizontal_block_boundary_is_dropped() -> None:
    """The y extent counts as the x extent does: a chip whose rows cross from a train block
    into a val block (same column of blocks) would put val pixels in train."""
    cfg = SplitConfig(val_fraction=0.3, block_m=10_000, seed=1)
    bx = 57
    column = [block_split(32629, bx, by, cfg) for by in range(400, 800)]
    i = next(k for k in range(len(column) - 1) if column[k] != column[k + 1])
    by = 400 + i
    x0, y_edge = bx * 10_000.0 + 2_000, (by + 1) * 10_000.0  # the boundary between by and by + 1
    assert chip_split(32629, x0, y_edge - 960, x0 + 960, y_edge, cfg) == column[i]  # just below it
    assert chip_split(32629, x0, y_edge, x0 + 960, y_edge + 960, cfg) == column[i + 1]  # just above
    assert chip_split(32629, x0, y_edge - 480, x0 + 960, y_edge + 480, cfg) is None  # across it
    # blocks of one split on both sides: kept, whichever way it crosses
    j = next(k for k in range(len(column) - 1) if column[k] == column[k + 1])
    y_same = (400 + j + 1) * 10_000.0
    assert chip_split(32629, x0, y_same - 480, x0 + 960, y_same + 480, cfg) == column[j]


@pytest.mark.parametrize("max_cloud", [0.19, 0.2, 0.21])
def test_chips_above_max_cloud_are_dropped_and_only_those(tmp_path: Path, max_cloud: float) -> None:
    """Per chip and date, the cloud fraction (SCL 3, 8, 9, 10) counted here from the cube's
    SCL decides: above quality.max_cloud dropped with that reason, else kept."""
    import xarray as xr

    from pipeline.tiling import Chip, iter_chips

    store = _cube_store(tmp_path / "c.zarr")
    cfg = load_config(None, {"tiling": [{"size": 32}], "quality": {"max_cloud": max_cloud, "max_invalid": 1.0},
                             "split": {"val_fraction": 0.0}})
    cube = xr.open_zarr(store, consolidated=False)
    scl = cube["scl"].values
    cloudy = 0
    for t in range(2):
        for r in range(384 // 32):
            for c in range(200 // 32):
                win = scl[t, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
                cloudy += np.isin(win, [3, 8, 9, 10]).mean() > max_cloud
    out = list(iter_chips(cube, cfg.tiling[0], cfg))
    reasons = [o.reason for o in out if not isinstance(o, Chip)]
    assert len(out) == 2 * 12 * 6
    assert reasons.count("cloud fraction above quality.max_cloud") == cloudy
    assert 0 < cloudy < len(out)  # the threshold splits this cube's chips
    kept = [o for o in out if isinstance(o, Chip)]
    assert len(kept) + len(reasons) == len(out) and all(o.meta["quality"]["cloud"] <= max_cloud for o in kept)


def _cube_store(path: Path, rows: int = 384, cols: int = 200, ych: int = 96) -> Path:
    """A two-date cube store as `pipeline.cube` writes it (attrs, zarr chunk rows of `ych`)."""
    import xarray as xr

    rng = np.random.default_rng(7)
    dn = rng.integers(1, 10000, (2, 12, rows, cols), dtype=np.uint16)
    dn[0, :, :40, :50] = 0  # a nodata corner
    scl = rng.choice(np.array([4, 5, 8, 9], np.uint8), (2, rows, cols), p=[0.6, 0.2, 0.1, 0.1])
    ds = xr.Dataset({"dn": (("time", "band", "y", "x"), dn), "scl": (("time", "y", "x"), scl)})
    ds.attrs.update({
        "unit": "t", "tile": "32TMT", "epsg": 32632, "grid_transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0],
        "scene_ids": ["a", "b"], "datetimes": ["2024-06-01T10:00:00Z", "2024-06-11T10:00:00Z"],
        "harmonisation": [{"scene_id": "a"}, {"scene_id": "b"}], "has_scl": [True, True],
        "resampling": {"20m": "bilinear", "60m": "bilinear", "scl": "nearest"},
    })
    ds.to_zarr(path, encoding={"dn": {"chunks": (1, 12, ych, cols)}, "scl": {"chunks": (1, ych, cols)}},
               consolidated=False, zarr_format=3)
    return path


def test_concurrent_datasets_share_decoded_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chip sizes tiled at once from one cube: the same chips as one at a time, and each
    chunk row decoded once (the blocks are shared between the threads)."""
    import threading

    import xarray as xr

    import pipeline.tiling as tiling

    store = _cube_store(tmp_path / "c.zarr")
    cfg = load_config(None, {"tiling": [{"size": 32}, {"size": 48}], "quality": {"max_cloud": 0.5}})

    def chips(spec: Any) -> list[tuple[str, str, str, bytes]]:
        cube = xr.open_zarr(store, consolidated=False)
        out = []
        for item in tiling.iter_chips(cube, spec, cfg):
            if isinstance(item, tiling.Chip):
                out.append((item.key, item.split, json.dumps(item.meta, sort_keys=True), item.data.tobytes()))
            else:
                out.append(("dropped", item.reason, "", b""))
        return out

    alone = {spec.name: chips(spec) for spec in cfg.tiling}
    loads: list[int] = []
    real = tiling.RowBlocks._load
    monkeypatch.setattr(tiling.RowBlocks, "_load", lambda self, t, b0, b1, w: loads.append(b0) or real(self, t, b0, b1, w))
    together: dict[str, list[Any]] = {}
    threads = [threading.Thread(target=lambda s=spec: together.__setitem__(s.name, chips(s))) for spec in cfg.tiling]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert together == alone
    assert sum(c[0] != "dropped" for c in alone["s32_g10m"]) > 50
    assert sorted(set(loads)) == [0, 96, 192, 288]  # every chunk row, none twice per dataset
    assert len(loads) <= 2 * 4 * 2
    # interleaved (deterministic), with room for every block: 4 chunk rows x 2 dates, each
    # decoded once (keeping 3, a dataset more than 3 blocks ahead makes the other re-read)
    monkeypatch.setattr(tiling._SHARED.blocks, "capacity", 8)
    loads.clear()
    cubes = [xr.open_zarr(store, consolidated=False) for _ in cfg.tiling]
    its = [tiling.iter_chips(c, spec, cfg) for c, spec in zip(cubes, cfg.tiling)]
    while its:
        its = [it for it in its if next(it, None) is not None]
    assert len(loads) == 4 * 2
    assert not len(tiling._SHARED.blocks) and not tiling._SHARED._users  # released with the last user
