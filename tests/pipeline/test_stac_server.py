"""A real STAC API on loopback over static catalogs, searched with pystac-client over HTTP.

Also checks the fixture builders of `tests/helpers/stac_fixtures.py` (real provider
metadata, real pixels with the provider's radiometric convention).
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pystac_client
import pytest
import rasterio
import shapely.geometry

from pipeline.catalogs import CATALOG_DIR, load_aoi, sensor
from pipeline.errors import CatalogError
from pipeline.stac_server import StacServerError, main, serve_static_catalog
from tests.helpers import stac_fixtures as sf
from tests.helpers.paths import BIGEARTHNET

SAMPLE_JSON = CATALOG_DIR / "sample" / "catalog.json"
COLL = "sentinel-2-l2a"
PATCHES = sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir())


def _sample_items() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((CATALOG_DIR / "sample" / COLL).glob("*/*.json"))]


@pytest.fixture(scope="module")
def sample_api() -> Iterator[str]:
    with serve_static_catalog(SAMPLE_JSON) as url:
        yield url


def _ids(url: str, **search: Any) -> list[str]:
    return sorted(i.id for i in pystac_client.Client.open(url).search(**search).items())


# --------------------------------------------------------------------------------------------
# The sample catalog served over HTTP


def test_landing_page_and_conformance(sample_api: str) -> None:
    assert urlparse(sample_api).hostname == "127.0.0.1" and sample_api.endswith("/")
    client = pystac_client.Client.open(sample_api)
    assert client.conforms_to("ITEM_SEARCH") and client.conforms_to("FILTER")
    assert [c.id for c in client.get_collections()] == [COLL]


def test_ireland_aoi_finds_the_29UPU_patches(sample_api: str) -> None:
    on_29upu = sorted(i["id"] for i in _sample_items() if i["properties"]["s2:mgrs_tile"] == "29UPU")
    assert len(on_29upu) == 4  # two dates (2017-06-17, 2018-04-21), two patches each
    bbox = list(shapely.geometry.shape(load_aoi("ireland")).bounds)
    assert _ids(sample_api, collections=[COLL], bbox=bbox) == on_29upu


def test_intersects_one_patch(sample_api: str) -> None:
    item = next(i for i in _sample_items() if i["id"] == "S2B_MSIL2A_20170914T093029_32_39")
    centre = shapely.geometry.shape(item["geometry"]).centroid.buffer(0.001)
    assert _ids(sample_api, collections=[COLL], intersects=shapely.geometry.mapping(centre)) == [item["id"]]


def test_datetime_ranges(sample_api: str) -> None:
    items = _sample_items()
    assert len(_ids(sample_api, collections=[COLL], datetime="2017-06-17")) == 2
    in_2018 = sorted(i["id"] for i in items if i["properties"]["datetime"].startswith("2018"))
    assert _ids(sample_api, collections=[COLL], datetime="2018-01-01T00:00:00Z/2018-12-31T23:59:59Z") == in_2018
    before = sorted(i["id"] for i in items if i["properties"]["datetime"] < "2017-09-20")
    assert _ids(sample_api, collections=[COLL], datetime="../2017-09-20T00:00:00Z") == before
    assert _ids(sample_api, collections=[COLL], datetime="2019-01-01/2019-12-31") == []


def test_collection_filter_pagination_and_cql2(sample_api: str) -> None:
    client = pystac_client.Client.open(sample_api)
    search = client.search(collections=[COLL], limit=3)
    pages = list(search.pages())
    assert len(pages) == 4 and sum(len(p.items) for p in pages) == 11
    assert len({i.id for p in pages for i in p.items}) == 11  # no item repeated across pages
    assert _ids(sample_api, collections=["sentinel-2-c1-l2a"]) == []
    cql = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 20]}
    assert len(_ids(sample_api, collections=[COLL], filter=cql, filter_lang="cql2-json")) == 11


def test_returned_hrefs_are_local_files_rasterio_reads(sample_api: str) -> None:
    items = list(pystac_client.Client.open(sample_api).search(collections=[COLL], datetime="2017-06-17").items())
    assert items
    for item in items:
        assert item.properties["proj:code"] == "EPSG:32629"
        for asset in item.assets.values():
            # file:// + absolute path: pystac keeps it as is (a bare path would be joined to the
            # item's http self link) and GDAL opens it without the server
            assert asset.href.startswith("file:///") and Path(asset.href[len("file://"):]).is_file(), asset.href
            assert asset.get_absolute_href() == asset.href
        src = BIGEARTHNET / item.id / f"{item.id}_B8A.tif"
        with rasterio.open(item.assets["B8A"].href) as cog, rasterio.open(src) as ref:
            np.testing.assert_array_equal(cog.read(1), ref.read(1))
            assert list(cog.transform)[:6] == item.assets["B8A"].extra_fields["proj:transform"]


def test_server_stops_after_the_block(tmp_path: Path) -> None:
    with serve_static_catalog(SAMPLE_JSON) as url:
        port = urlparse(url).port
        assert port
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        item = next(pystac_client.Client.open(url).search(collections=[COLL], max_items=1).items())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with rasterio.open(item.assets["B02"].get_absolute_href()) as ds:  # pixels do not need the server
        assert ds.read(1).shape == (120, 120)


def test_missing_or_non_stac_catalog_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "catalog.json"
    with pytest.raises(StacServerError, match="not found") as ei:
        with serve_static_catalog(missing):
            pass
    assert isinstance(ei.value, CatalogError) and "nope" in str(ei.value)
    notstac = tmp_path / "catalog.json"
    notstac.write_text('{"hello": 1}')
    with pytest.raises(StacServerError, match="not a STAC Catalog"):
        with serve_static_catalog(notstac):
            pass
    assert main([str(missing)]) == 2


# --------------------------------------------------------------------------------------------
# Fixture builders (tests/helpers/stac_fixtures.py)


def _only_item(catalog_json: Path) -> dict[str, Any]:
    (path,) = sorted(catalog_json.parent.glob("*/*/*.json"))
    return json.loads(path.read_text())


def _read(item_json_dir: Path, href: str) -> np.ndarray:
    with rasterio.open(item_json_dir / href) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and ds.nodata == 0
        return ds.read(1)


def _item_dir(catalog_json: Path, item: dict[str, Any]) -> Path:
    return catalog_json.parent / item["collection"] / item["id"]


def test_pc_baseline_0510_fixture_has_offset_pixels(tmp_path: Path) -> None:
    cat = sf.make_pc_baseline_0510_catalog(tmp_path, PATCHES[0])
    item = _only_item(cat)
    real = json.loads(sf.PC_ITEMS_JSON.read_text())[0]
    assert item["id"] == real["id"] and item["properties"]["datetime"] == real["properties"]["datetime"]
    assert item["properties"]["s2:processing_baseline"] == "05.10"
    assert item["properties"]["proj:epsg"] == real["properties"]["proj:epsg"]
    assert set(item["assets"]) == {*sensor().band_names, "SCL"}
    assert all("raster:bands" not in a for a in item["assets"].values())
    expected = sf.expected_dn(cat)[item["id"]]
    for band in sensor().band_names:
        cog = _read(_item_dir(cat, item), item["assets"][band]["href"])
        np.testing.assert_array_equal(cog, expected[band].astype(np.int32) + 1000)  # real DN have no 0
        assert item["assets"][band]["proj:shape"] == list(cog.shape)
    scl = _read(_item_dir(cat, item), item["assets"]["SCL"]["href"])
    assert scl.shape == (60, 60) and len(np.unique(scl)) >= 5 and 0 not in scl
    np.testing.assert_array_equal(scl, expected["SCL"])


def test_earth_search_fixture_keeps_provider_applied_offset(tmp_path: Path) -> None:
    cat = sf.make_earth_search_offset_applied_catalog(tmp_path, PATCHES[1])
    item = _only_item(cat)
    p = item["properties"]
    assert item["id"] == "S2A_13TDE_20231008_0_L2A" and p["earthsearch:boa_offset_applied"] is True
    assert p["s2:processing_baseline"] == "05.09" and p["proj:epsg"] == 32613
    assert item["assets"]["red"]["raster:bands"][0]["offset"] == -0.1  # as recorded (contradicts the flag)
    assert item["assets"]["red-jp2"]["href"].startswith("s3://")  # twins stay remote, never read
    expected = sf.expected_dn(cat)[item["id"]]
    for band in sensor().bands:
        key = band.asset_keys["earth_search"]
        np.testing.assert_array_equal(_read(_item_dir(cat, item), item["assets"][key]["href"]), expected[band.name])
    with rasterio.open(PATCHES[1] / f"{PATCHES[1].name}_B04.tif") as src:
        np.testing.assert_array_equal(expected["B04"], src.read(1))  # the original DN, not DN - 1000


def test_timeseries_fixture_one_grid_distinct_dates_shuffled(tmp_path: Path) -> None:
    cat = sf.make_timeseries_catalog(tmp_path, PATCHES)
    coll = json.loads((cat.parent / COLL / "collection.json").read_text())
    order = [link["href"].split("/")[1] for link in coll["links"] if link["rel"] == "item"]
    items = {p.stem: json.loads(p.read_text()) for p in (cat.parent / COLL).glob("*/*.json")}
    assert len(items) == 13 and len(order) == 13
    by_date = sorted(items, key=lambda i: items[i]["properties"]["datetime"])
    assert order != by_date  # shuffled: date order is the consumer's job
    assert [items[i]["properties"]["fixture:date_index"] for i in by_date] == list(range(13))
    real = {f["id"]: f for f in json.loads(sf.PC_TIMESERIES_GEOJSON.read_text())["features"]}
    assert set(items) == set(real)
    grids = {k: {json.dumps([a["proj:shape"], a["proj:transform"]]) for it in items.values() for kk, a in it["assets"].items() if kk == k} for k in ("B02", "B05", "B01", "SCL")}
    assert all(len(g) == 1 for g in grids.values()), grids
    expected = sf.expected_dn(cat)
    b02 = {i: expected[i]["B02"].tobytes() for i in items}
    assert len(set(b02.values())) == 13  # every date distinguishable
    for iid in by_date[:2] + by_date[-2:]:
        it = items[iid]
        assert it["properties"]["datetime"] == real[iid]["properties"]["datetime"]
        assert it["properties"]["s2:processing_baseline"] == "02.12"
        np.testing.assert_array_equal(_read(_item_dir(cat, it), it["assets"]["B02"]["href"]), expected[iid]["B02"])
    with serve_static_catalog(cat) as url:
        assert len(_ids(url, collections=[COLL], datetime="2020-06-01/2020-07-31", limit=5)) == 13


# pystac tries to migrate the recorded storage-extension fields of these items and warns; harmless here
@pytest.mark.filterwarnings("ignore:Could not parse bucket/account from href")
def test_mixed_collection_fixture_served_per_collection(tmp_path: Path) -> None:
    cat = sf.make_mixed_collection_catalog(tmp_path)
    with serve_static_catalog(cat) as url:
        client = pystac_client.Client.open(url)
        assert sorted(c.id for c in client.get_collections()) == ["sentinel-1-grd", "sentinel-2-c1-l2a", "sentinel-2-l1c", "sentinel-2-l2a"]
        found = list(client.search(collections=[c.id for c in client.get_collections()], limit=7).items())
        assert Counter(i.collection_id for i in found) == {"sentinel-1-grd": 3, "sentinel-2-c1-l2a": 6, "sentinel-2-l2a": 6, "sentinel-2-l1c": 5}
        l1c = list(client.search(collections=["sentinel-2-l1c"]).items())
        assert len(l1c) == 5 and all(a.media_type == "image/jp2" for i in l1c for k, a in i.assets.items() if k in ("red", "nir"))
        # remote hrefs are passed through untouched
        assert all(urlparse(a.href).scheme in ("https", "s3") for i in found for a in i.assets.values())
