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
