"""The aligned-grid fast path (`pipeline.native_read`) against independent references:
a plain gather implementation of the same upsampling, odc-stac's warped load of the same
real items, and the xarray form of the offset removal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import from_origin

from pipeline import cube as cube_mod
from pipeline.config import load_config
from pipeline.cube import GDAL_CLOUD_ENV, group_grids, load_grid
from pipeline.harmonise import apply_offsets, remove_offset
from pipeline.native_read import read_block
from pipeline.search import open_catalog, search
from tests.helpers import stac_fixtures as fx
from tests.helpers.paths import BIGEARTHNET

ENV = dict(GDAL_CLOUD_ENV)


def _reference(src: np.ndarray, y0: int, y1: int, x0: int, x1: int, k: int) -> np.ndarray:
    """The textbook form: per-pixel source coordinate u = (o + 0.5) / k - 0.5 (GDAL's
    pixel-centre convention), edge clamped, values and validity interpolated separately,
    rows then columns, outputs with less than half valid support are nodata."""
    def axis(o0: int, o1: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = (np.arange(o0, o1) + 0.5) / k - 0.5
        i = np.floor(u).astype(int)
        return np.clip(i, 0, n - 1), np.clip(i + 1, 0, n - 1), (u - i)

    iy0, iy1, wy = axis(y0, y1, src.shape[0])
    ix0, ix1, wx = axis(x0, x1, src.shape[1])
    v, m = src.astype(np.float64), (src > 0).astype(np.float64)

    def interp(a: np.ndarray) -> np.ndarray:
        rows = a[iy0] * (1 - wy)[:, None] + a[iy1] * wy[:, None]
        return rows[:, ix0] * (1 - wx) + rows[:, ix1] * wx

    num, den = interp(v * m), interp(m)
    return np.where(den >= 0.5, np.rint(num / np.maximum(den, 1e-9)), 0).astype(np.uint16)


@pytest.fixture(scope="module")
def band_20m(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A real 20 m band (B05 of a BigEarthNet patch, tiled 3 x 3 with flips to 180 px) with
    nodata holes: a block, a stripe and scattered pixels, written as a tiled GeoTIFF."""
    b05 = fx.read_patch_bands(sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir())[0])["B05"]
    row = np.concatenate([b05, b05[:, ::-1], b05], axis=1)
    a = np.concatenate([row, row[::-1], row], axis=0)
    a[10:25, 40:70] = 0
    a[:, 101] = 0
    rng = np.random.default_rng(3)
    a[rng.random(a.shape) < 0.02] = 0
    path = tmp_path_factory.mktemp("native") / "b05.tif"
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="uint16",
                       nodata=0, crs="EPSG:32632", transform=from_origin(0, 0, 20, 20), tiled=True,
                       blockxsize=64, blockysize=64, compress="deflate") as dst:
        dst.write(a, 1)
    return path, a


@pytest.mark.parametrize("k", [2, 6])
def test_bilinear_blocks_match_the_textbook_formula(band_20m: tuple[Path, np.ndarray], k: int) -> None:
    path, a = band_20m
    src = a if k == 2 else a[:60, :60]
    if k == 6:  # a 60 m band of 60 px, written on its own (same code path, another factor)
        path = path.with_name("b01.tif")
        with rasterio.open(path, "w", driver="GTiff", width=60, height=60, count=1, dtype="uint16", nodata=0,
                           crs="EPSG:32632", transform=from_origin(0, 0, 60, 60)) as dst:
            dst.write(src, 1)
    grid = (src.shape[0] * k, src.shape[1] * k)
    # blocks at the grid's edges and inside, with origins that are not multiples of k
    windows = [(0, grid[0], 0, grid[1]), (0, 97, 0, 131), (5, 77, 13, 200), (grid[0] - 101, grid[0], grid[1] - 37, grid[1]),
               (1, 2, 1, 2)]
    for y0, y1, x0, x1 in windows:
        got = read_block(str(path), k, "bilinear", y0, y1, x0, x1, src.shape, ENV)
        want = _reference(src, y0, y1, x0, x1, k)
        assert got.shape == want.shape == (y1 - y0, x1 - x0)
        diff = np.abs(got.astype(int) - want)
        if k == 2:  # quarter weights: exact in float64 in any order, so bit-identical
            assert diff.max() == 0, (y0, x0)
        else:  # twelfths round in another order than the reference: rarely 1 DN apart at a .5 tie
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (y0, x0, diff.max(), (diff > 0).mean())
        assert ((got == 0) == (want == 0)).all()  # nodata decided identically
    assert (read_block(str(path), k, "bilinear", 0, grid[0], 0, grid[1], src.shape, ENV) == 0).sum() > 0


@pytest.mark.parametrize(("k", "method"), [(2, "bilinear"), (2, "nearest"), (1, "nearest")])
def test_offset_removed_while_reading_equals_removing_it_after(band_20m: tuple[Path, np.ndarray], k: int, method: str) -> None:
    """The offset fused into the read (`read_block(offset=...)`, into a caller's buffer or
    not) is the offset rule applied to the plain read: nodata stays 0, low values clamp to 1."""
    path, a = band_20m
    plain = read_block(str(path), k, method, 3, 151, 5, 170, a.shape, ENV)
    want = remove_offset(plain, 1000)
    assert (plain == 0).any() and ((plain > 0) & (plain <= 1000)).any()  # both edge cases occur
    np.testing.assert_array_equal(read_block(str(path), k, method, 3, 151, 5, 170, a.shape, ENV, offset=1000), want)
    buf = np.full((148, 165), 7, np.uint16)
    got = read_block(str(path), k, method, 3, 151, 5, 170, a.shape, ENV, offset=1000, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)
    assert (want[plain == 0] == 0).all() and (want[(plain > 0) & (plain <= 1001)] == 1).all()


def test_each_cog_tile_is_decoded_once_across_blocks(band_20m: tuple[Path, np.ndarray]) -> None:
    """Cube chunks that straddle the COG's tiles (64 px here) share the decoded tiles: reading
    the whole 10 m grid in 50 x 70 px chunks decodes each tile once, and the values are the
    plain full read's."""
    from pipeline import native_read

    path, a = band_20m
    native_read.close_all()
    before = native_read._tiles.computed
    grid = (a.shape[0] * 2, a.shape[1] * 2)
    full = read_block(str(path), 2, "bilinear", 0, grid[0], 0, grid[1], a.shape, ENV)
    assert native_read._tiles.computed - before == 9  # 180 px at 20 m = 3 x 3 tiles of 64
    for y0 in range(0, grid[0], 50):
        for x0 in range(0, grid[1], 70):
            y1, x1 = min(y0 + 50, grid[0]), min(x0 + 70, grid[1])
            np.testing.assert_array_equal(read_block(str(path), 2, "bilinear", y0, y1, x0, x1, a.shape, ENV), full[y0:y1, x0:x1])
    assert native_read._tiles.computed - before == 9  # no tile decoded twice
    native_read.close_all()
    assert len(native_read._tiles) == 0
    read_block(str(path), 1, "nearest", 0, 10, 0, 10, a.shape, ENV)
    assert native_read._tiles.computed - before == 10  # decoded again after the grid's clean-up


def test_nearest_blocks_repeat_the_source(band_20m: tuple[Path, np.ndarray]) -> None:
    path, a = band_20m
    got = read_block(str(path), 2, "nearest", 3, 91, 7, 250, a.shape, ENV)
    np.testing.assert_array_equal(got, np.repeat(np.repeat(a, 2, 0), 2, 1)[3:91, 7:250])


def test_remove_offset_equals_apply_offsets() -> None:
    rng = np.random.default_rng(0)
    dn = rng.integers(0, 3000, (2, 12, 40, 50)).astype(np.uint16)
    dn[:, :, :5] = 0
    dn[:, :, 5:8] = rng.integers(1, 1001, (2, 12, 3, 50))  # at or below the offset: clamp to 1
    offsets = [1000, 0]
    want = apply_offsets(xr.DataArray(dn, dims=("time", "band", "y", "x")),
                         xr.DataArray(np.array(offsets), dims=["time"])).values
    for t, off in enumerate(offsets):
        np.testing.assert_array_equal(remove_offset(dn[t].copy(), off), want[t])
    assert (want[0][:, 5:8] == 1).all() and (want[0][:, :5] == 0).all()


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_native_cube_equals_odc_stac_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Real Planetary Computer items (baseline 05.10, offset in the data, real SCL) loaded by
    the fast path and by odc-stac's warp give the same harmonised cube."""
    cat = fx.make_pc_baseline_0510_catalog(tmp_path, sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir())[0])
    bb = np.array([it["bbox"] for it in fx._walk_items(cat)])
    bbox = f"{bb[:, 0].min() - .01},{bb[:, 1].min() - .01},{bb[:, 2].max() + .01},{bb[:, 3].max() + .01}"
    cfg = load_config(None, {"catalog": str(cat), "bbox": bbox, "max_cloud": 100, "output": str(tmp_path / "o"),
                             "resampling": {"20m": method, "60m": method}})
    with open_catalog(cfg) as c:
        unit = group_grids(search(cfg, c).scenes)[0][0]
    native = load_grid(unit, cfg).compute()
    monkeypatch.setattr(cube_mod, "_native_load", lambda *a, **k: None)  # force the general path
    warped = load_grid(unit, cfg).compute()
    assert native["dn"].shape == warped["dn"].shape and native["dn"].shape[1] == 12
    np.testing.assert_array_equal(native["scl"].values, warped["scl"].values)
    assert (native["scl"].values != 255).all()  # real SCL was read, not filled
    d = np.abs(native["dn"].values.astype(int) - warped["dn"].values.astype(int))
    if method == "nearest":
        assert d.max() == 0
    else:  # GDAL's bilinear warp is not nodata-aware the same way and rounds in its own order
        assert d.max() <= 1 and (d > 0).mean() < 0.05, (d.max(), (d > 0).mean())  # measured: 1 DN, 2 %
    assert native["dn"].values.max() < 20000 and (native["dn"].values > 0).mean() > 0.9  # offset removed
