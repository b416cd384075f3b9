"""The embedded sample catalog: up to date, pixels unchanged, valid COGs, real metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from pyproj import Transformer

from pipeline.catalogs import CATALOG_DIR, sensor
from tools.sample_catalog import (
    SampleCatalogError,
    build_sample_catalog,
    iter_catalog_files,
    main,
    read_patch,
)
from tests.helpers.paths import BIGEARTHNET

SAMPLE = CATALOG_DIR / "sample"
COLL = SAMPLE / "sentinel-2-l2a"
REBUILD = "rebuild it: python -m tools.sample_catalog --src ../shared/data/bigearthnet-s2-tiny --out catalogs/sample"


def _items() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(COLL.glob("*/*.json"))}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    build_sample_catalog(BIGEARTHNET, out)
    return out


def test_committed_sample_is_up_to_date(rebuilt: Path) -> None:
    committed = [p.relative_to(SAMPLE) for p in iter_catalog_files(SAMPLE)]
    fresh = [p.relative_to(rebuilt) for p in iter_catalog_files(rebuilt)]
    assert committed == fresh, f"catalogs/sample has other files than the builder writes; {REBUILD}"
    for rel in fresh:
        a, b = (SAMPLE / rel).read_bytes(), (rebuilt / rel).read_bytes()
        if rel.suffix == ".json":
            assert json.loads(a) == json.loads(b), f"{rel} differs from a fresh build; {REBUILD}"
        assert a == b, f"{rel} differs from a fresh build (same rasterio/GDAL pin?); {REBUILD}"


def test_build_is_deterministic(rebuilt: Path, tmp_path: Path) -> None:
    again = build_sample_catalog(BIGEARTHNET, tmp_path / "again").parent
    for p in iter_catalog_files(rebuilt):
        assert (again / p.relative_to(rebuilt)).read_bytes() == p.read_bytes(), p


def test_every_cog_holds_the_source_pixels_unchanged() -> None:
    for patch in sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir()):
        for band in sensor().bands:
            with rasterio.open(patch / f"{patch.name}_{band.name}.tif") as src, rasterio.open(
                COLL / patch.name / f"{patch.name}_{band.name}.tif"
            ) as cog:
                np.testing.assert_array_equal(cog.read(1), src.read(1))
                assert cog.transform == src.transform and cog.crs == src.crs


def test_known_pixel_at_the_same_location() -> None:
    """B04 of the 29UPU patch at a map coordinate: source GeoTIFF and COG agree."""
    patch = "S2A_MSIL2A_20170617T113321_36_85"
    x, y = 643200.0 + 10 * 57 + 5, 5798040.0 - 10 * 33 - 5  # centre of pixel row 33, col 57
    with rasterio.open(BIGEARTHNET / patch / f"{patch}_B04.tif") as src:
        expected = next(src.sample([(x, y)]))[0]
        assert expected == src.read(1)[33, 57]
    with rasterio.open(COLL / patch / f"{patch}_B04.tif") as cog:
        assert next(cog.sample([(x, y)]))[0] == expected


def test_cogs_are_cloud_optimized() -> None:
    tifs = sorted(COLL.glob("*/*.tif"))
    assert len(tifs) == 11 * 12
    for tif in tifs:
        with rasterio.open(tif) as ds:
            assert ds.profile["tiled"], tif
            bh, bw = ds.block_shapes[0]
            assert bh == bw and bh >= 16 and bh % 16 == 0
            assert ds.compression is not None and ds.compression.name.upper() == "DEFLATE"
            struct = ds.tags(ns="IMAGE_STRUCTURE")
            assert struct.get("PREDICTOR") == "2"
            assert struct.get("LAYOUT") == "COG", f"{tif}: GDAL does not see a COG layout"
            assert ds.nodata == 0 and ds.dtypes[0] == "uint16"
            assert ds.overviews(1), f"{tif}: no overview"
            assert max(ds.width, ds.height) > bh  # more than one tile per row: a real tiled layout


@pytest.mark.parametrize(
    ("patch", "dt", "epsg", "tile", "pb", "platform"),
    [
        ("S2A_MSIL2A_20170617T113321_36_85", "2017-06-17T11:33:21Z", 32629, "29UPU", "02.05", "sentinel-2a"),
        ("S2B_MSIL2A_20180421T114349_41_4", "2018-04-21T11:43:49Z", 32629, "29UPU", "02.06", "sentinel-2b"),
        # malformed 5-digit times in the names: the datetime comes from the metadata JSON
        ("S2A_MSIL2A_20180510T94033_19_86", "2018-05-10T09:40:33Z", 32635, "35WPN", "02.06", "sentinel-2a"),
        ("S2B_MSIL2A_20170924T93021_41_29", "2017-09-24T09:30:21Z", 32635, "35VPK", "02.05", "sentinel-2b"),
        ("S2A_MSIL2A_20171221T112501_56_35", "2017-12-21T11:25:01Z", 32629, "29SND", "02.06", "sentinel-2a"),
    ],
)
def test_items_carry_real_metadata(patch: str, dt: str, epsg: int, tile: str, pb: str, platform: str) -> None:
    item = _items()[patch]
    meta = json.loads((BIGEARTHNET / patch / f"{patch}_labels_metadata.json").read_text())
    p = item["properties"]
    assert item["id"] == patch and item["collection"] == "sentinel-2-l2a"
    assert p["datetime"] == dt
    assert p["proj:code"] == f"EPSG:{epsg}" and p["proj:epsg"] == epsg
    assert p["s2:mgrs_tile"] == tile and p["grid:code"] == f"MGRS-{tile}"
    assert (p["mgrs:utm_zone"], p["mgrs:latitude_band"], p["mgrs:grid_square"]) == (int(tile[:2]), tile[2], tile[3:])
    assert p["s2:processing_baseline"] == pb and "L1C" in p["sample:processing_baseline_source"]
    assert p["s2:product_type"] == "S2MSI2A"
    assert p["platform"] == platform and p["constellation"] == "sentinel-2" and p["instruments"] == ["msi"]
    assert p["sample:corine_labels"] == meta["labels"]
    assert p["sample:l1c_source_product"] == meta["tile_source"]
    assert p["eo:cloud_cover"] == 0.0 and "placeholder" in p["sample:cloud_cover_note"].lower()
    c = meta["coordinates"]
    assert p["proj:bbox"] == [c["ulx"], c["lry"], c["lrx"], c["uly"]]
    # the footprint holds the patch centre, transformed independently here
    lon, lat = Transformer.from_crs(epsg, 4326, always_xy=True).transform((c["ulx"] + c["lrx"]) / 2, (c["uly"] + c["lry"]) / 2)
    w, s, e, n = item["bbox"]
    assert w < lon < e and s < lat < n
    assert e - w < 0.05 and n - s < 0.02  # 1.2 km


def test_assets_follow_the_band_table() -> None:
    table = {b.asset_keys["b_numbers"]: b for b in sensor().bands}
    for iid, item in _items().items():
        assert set(item["assets"]) == set(table), iid  # B01..B12, B8A; no SCL in BigEarthNet
        for key, a in item["assets"].items():
            b = table[key]
            assert a["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
            assert a["roles"] == ["data"] and a["gsd"] == b.gsd
            assert a["eo:bands"] == [{"name": b.name, "common_name": b.common_name, "center_wavelength": b.center_wavelength}]
            assert a["raster:bands"] == [{"nodata": 0, "data_type": "uint16", "spatial_resolution": float(b.gsd)}]
            assert not a["href"].startswith(("/", "http", "file:")), "hrefs must be relative"
            with rasterio.open(COLL / iid / a["href"]) as ds:
                assert a["proj:shape"] == [ds.height, ds.width]
                assert a["proj:transform"] == list(ds.transform)[:6]


def test_pystac_reads_the_catalog_and_all_links_are_relative() -> None:
    cat = pystac.Catalog.from_file(str(SAMPLE / "catalog.json"))
    items = list(cat.get_items(recursive=True))
    assert len(items) == 11
    assert {i.collection_id for i in items} == {"sentinel-2-l2a"}
    coll = cat.get_child("sentinel-2-l2a")
    assert isinstance(coll, pystac.Collection)
    assert "Copernicus Sentinel data" in coll.description and "CDLA-Permissive-1.0" in coll.description
    assert "CDLA-Permissive-1.0" in (SAMPLE / "README.md").read_text()
    for path in SAMPLE.rglob("*.json"):
        for link in json.loads(path.read_text())["links"]:
            if link["rel"] in ("root", "parent", "child", "item", "collection"):
                assert link["href"].startswith(("./", "../")), (path, link)
            assert link["rel"] != "self"


def test_name_parsing_survives_five_digit_times() -> None:
    p = read_patch(BIGEARTHNET / "S2B_MSIL2A_20170924T93021_41_29")
    assert p.datetime == "2017-09-24T09:30:21Z" and p.tile == "35VPK" and p.relative_orbit == 136


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SampleCatalogError, match="no patch folders"):
        build_sample_catalog(tmp_path / "nothing", tmp_path / "out")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(SampleCatalogError, match="not a sample catalog"):
        build_sample_catalog(BIGEARTHNET, precious)
    assert (precious / "keep.txt").exists()
    assert main(["--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
