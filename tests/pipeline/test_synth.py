"""The scale-data generator: real-looking Earth Search COGs and STAC items from real patches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import shapely.geometry

from pipeline.catalogs import sensor
from pipeline.config import BuildConfig
from pipeline.search import ResolvedCatalog, normalise_item
from tools.synth import (
    OFFSET_DN,
    PATCH_PX_10M,
    PERTURBATION,
    band_pixels,
    draw_layout,
    generate_scenes,
    load_patches,
    orient,
)
from tests.helpers.paths import BIGEARTHNET

SIZE = 768  # 10 m px: 384 at 20 m, 128 at 60 m
BLOCK = 128  # small internal tiles so every band bigger than one tile gets overviews
SEED = 3


def _items(cat: Path) -> list[Path]:
    return sorted(cat.parent.glob("sentinel-2-c1-l2a/*/*.json"))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    cat = generate_scenes(out, 1, SIZE, SEED, patches_dir=BIGEARTHNET, blocksize=BLOCK)
    (item_path,) = _items(cat)
    return cat, json.loads(item_path.read_text())


def test_every_band_is_a_deflate_cog_at_native_size(scene: tuple[Path, dict]) -> None:
    cat, item = scene
    folder = _items(cat)[0].parent
    want = {10: SIZE, 20: SIZE // 2, 60: SIZE // 6}
    for b in sensor().bands:
        with rasterio.open(folder / f"{b.name}.tif") as src:
            s = want[int(b.gsd)]
            assert (src.height, src.width, src.count, src.dtypes[0]) == (s, s, 1, "uint16")
            ims = src.tags(ns="IMAGE_STRUCTURE")
            assert ims["LAYOUT"] == "COG" and ims["COMPRESSION"] == "DEFLATE" and ims["PREDICTOR"] == "2"
            assert src.block_shapes[0] == (BLOCK, BLOCK)  # (rasterio says tiled=False when one tile is the image)
            assert src.profile["tiled"] or s == BLOCK
            assert src.nodata == 0
            assert bool(src.overviews(1)) == (s > BLOCK), (b.name, src.overviews(1))
            assert src.crs.to_epsg() == item["properties"]["proj:epsg"]
            assert src.res == (b.gsd, b.gsd)
    with rasterio.open(folder / "SCL.tif") as src:
        assert (src.height, src.dtypes[0], src.nodata, src.res) == (SIZE // 2, "uint8", 0, (20.0, 20.0))
        assert src.overviews(1)


def test_scl_has_clouds_shadows_cirrus_and_a_nodata_wedge(scene: tuple[Path, dict]) -> None:
    cat, item = scene
    folder = _items(cat)[0].parent
    with rasterio.open(folder / "SCL.tif") as src:
        scl = src.read(1)
    with rasterio.open(folder / "B05.tif") as src:
        b05 = src.read(1)
    classes = set(np.unique(scl).tolist())
    assert {0, 3, 8, 9, 10} <= classes and {4, 5} & classes, classes
    # nodata is the same pixels in SCL and DN; valid DN carry the +1000 offset
    assert np.array_equal(scl == 0, b05 == 0)
    assert b05[b05 > 0].min() > OFFSET_DN
    # the wedge sits in a corner
    corners = [scl[0, 0], scl[0, -1], scl[-1, 0], scl[-1, -1]]
    assert corners.count(0) == 1
    # eo:cloud_cover is what the SCL says (8, 9, 10 over valid pixels)
    valid = scl > 0
    cc = np.isin(scl, [8, 9, 10])[valid].mean() * 100
    assert item["properties"]["eo:cloud_cover"] == pytest.approx(cc, abs=1e-4)


def test_stac_item_is_earth_search_c1_style(scene: tuple[Path, dict]) -> None:
    cat, item = scene
    catalog = pystac.Catalog.from_file(str(cat))
    items = list(catalog.get_items(recursive=True))
    assert [i.id for i in items] == [item["id"]]
    it = items[0]
    p = it.properties
    assert it.collection_id == "sentinel-2-c1-l2a"
    assert p["proj:code"] == f"EPSG:{item['properties']['proj:epsg']}"  # pystac drops proj:epsg (projection v2)
    assert p["s2:processing_baseline"] == "05.10" and p["s2:product_type"] == "S2MSI2A"
    assert p["grid:code"] == f"MGRS-{p['mgrs:utm_zone']:02d}{p['mgrs:latitude_band']}{p['mgrs:grid_square']}"
    keys = {b.asset_keys["earth_search"] for b in sensor().bands} | {"scl"}
    assert set(it.assets) == keys
    for key, asset in it.assets.items():
        d = asset.to_dict()
        assert not d["href"].startswith("/") and d["href"].endswith(".tif")  # relative
        with rasterio.open(asset.get_absolute_href()) as src:
            assert d["proj:shape"] == [src.height, src.width]
            assert d["proj:transform"] == list(src.transform)[:6]
        rb = d["raster:bands"][0]
        assert rb["nodata"] == 0
        if key != "scl":
            assert (rb["data_type"], rb["scale"], rb["offset"]) == ("uint16", 0.0001, -0.1)
    # the pipeline accepts it and removes the offset
    cfg = BuildConfig(bbox=tuple(it.bbox), max_cloud=100)  # type: ignore[arg-type]
    scene_, reason = normalise_item(item, cfg, shapely.geometry.box(*it.bbox), ResolvedCatalog("t", "t", "sentinel-2-c1-l2a", None))
    assert scene_ is not None, reason
    assert scene_.harmonisation.offset_dn == 1000 and scene_.grid_shape == (SIZE, SIZE)


def test_pixels_are_flipped_perturbed_real_patches(scene: tuple[Path, dict]) -> None:
    """A clear mosaic tile matches exactly one of the 88 oriented patches, at every resolution."""
    cat, _ = scene
    folder = _items(cat)[0].parent
    patches = load_patches(BIGEARTHNET)
    with rasterio.open(folder / "SCL.tif") as src:
        scl = src.read(1)
    n = SIZE // PATCH_PX_10M
    clear = [(ty, tx) for ty in range(n) for tx in range(n)
             if np.isin(scl[ty * 60:(ty + 1) * 60, tx * 60:(tx + 1) * 60], [4, 5, 6]).all()]
    assert clear, "no cloud-free mosaic tile to check"
    ty, tx = clear[0]
    matches = set()
    for name in ("B04", "B05", "B01"):
        gsd = next(b.gsd for b in sensor().bands if b.name == name)
        p = PATCH_PX_10M * 10 // gsd
        with rasterio.open(folder / f"{name}.tif") as src:
            tile = src.read(1)[ty * p:(ty + 1) * p, tx * p:(tx + 1) * p].astype(np.float64).ravel()
        cands = patches[name].reshape(-1, p * p).astype(np.float64)  # [N * 8, p * p]
        corr = [np.corrcoef(tile, c)[0, 1] for c in cands]
        best = int(np.argmax(corr))
        assert corr[best] > 0.99, (name, corr[best])
        matches.add(best)
        # the gain that maps the patch onto the tile is within the stated perturbation
        gain = np.median((tile - OFFSET_DN) / np.maximum(cands[best], 1))
        assert 1 - PERTURBATION - 0.05 <= gain <= 1 + PERTURBATION + 0.01, (name, gain)
    assert len(matches) == 1, "every band must take the same patch and orientation"


def test_clean_mosaic_is_exactly_gain_times_oriented_patch() -> None:
    patches = load_patches(BIGEARTHNET)
    n_patches = patches["B02"].shape[0]
    layout = draw_layout(np.random.default_rng([SEED, 0]), 240, n_patches)
    assert (np.abs(layout.gain - 1) <= PERTURBATION).all()
    b02 = next(b for b in sensor().bands if b.name == "B02")
    clean = band_pixels(layout, b02, patches["B02"], clean=True)
    raw = np.stack([np.asarray(__import__("rasterio").open(f).read(1)) for f in
                    sorted(p / f"{p.name}_B02.tif" for p in BIGEARTHNET.iterdir() if p.is_dir())])
    for ty in range(2):
        for tx in range(2):
            src = orient(raw[layout.patch[ty, tx]], int(layout.orientation[ty, tx])).astype(np.float32)
            want = np.clip(np.rint(src * layout.gain[ty, tx]), 1, None)
            assert np.array_equal(clean[ty * 120:(ty + 1) * 120, tx * 120:(tx + 1) * 120], want)


def test_same_seed_same_bytes_and_distinct_grids(tmp_path: Path) -> None:
    a = generate_scenes(tmp_path / "a", 2, 240, 7, blocksize=128)
    b = generate_scenes(tmp_path / "b", 2, 240, 7, blocksize=128)
    c = generate_scenes(tmp_path / "c", 1, 240, 8, blocksize=128)
    da, db = _digest(a.parent), _digest(b.parent)
    assert da == db
    first = next(k for k in da if k.endswith("B04.tif"))
    assert _digest(c.parent)[first] != da[first]
    grids = {json.loads(p.read_text())["properties"]["grid:code"] for p in _items(a)}
    assert len(grids) == 2
