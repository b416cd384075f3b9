"""Seeded builders of small static STAC catalogs from REAL metadata and REAL pixels, for tests.

Each builder takes one or more real STAC items recorded from a provider (`tests/data/stac`),
keeps their metadata (ids, datetimes, processing baselines, asset keys, raster:bands, ...),
moves them onto a small local grid inside their real MGRS tile, and points the band assets
at local COGs holding real BigEarthNet-S2 pixels (and a real SCL window), written with the
provider's radiometric convention. The catalogs can be served with
`pipeline.stac_server.serve_static_catalog` and searched with pystac-client like a live API.

What the pipeline should produce from each catalog is available from `expected_dn`, which
recomputes the original, harmonised DN from the provenance recorded in every fixture item
(`fixture:*` properties).

Grids: 10 m bands 120x120, 20 m bands (and SCL) 60x60, 60 m bands 20x20, covering the same
1.2 km square, like a BigEarthNet patch; the square is placed at the centre of the item's
real MGRS tile (its real proj:epsg), on the tile's own 60 m pixel lattice.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from rasterio.transform import Affine

from pipeline.catalogs import Band, sensor
from tools.sample_catalog import collection_extent, lonlat_footprint, write_cog, write_static_catalog
from tests.helpers.paths import SCL_JP2, SHARED_STAC

PC_ITEMS_JSON = SHARED_STAC / "planetary-computer_items_2024-04-19.json"
ES_SEARCH_JSON = SHARED_STAC / "earth-search-v1_search_S2A_13TDE_20231008.json"
PC_TIMESERIES_GEOJSON = SHARED_STAC / "planetary-computer_timeseries_35MNM_2020.geojson"
ES_MIXED_CASSETTE = SHARED_STAC / "earth-search-v1_mixed-collections_cassette.yaml"

#: Window (row, col) of 20x20 pixels of the real 60 m SCL tile (EPSG:32631, 1830x1830): no
#: nodata, 9 classes (2 dark, 3 shadow, 4 vegetation, 5 bare, 6 water, 7 unclassified,
#: 8/9 cloud, 11 snow), about 10% cloud or shadow; found by scanning the tile for windows
#: without class 0 and with the most classes.
SCL_WINDOW = (132, 1520)
SCL_WINDOW_SIZE = 20

PATCH_PX = 120  # a BigEarthNet patch at 10 m: 1.2 km
DN_OFFSET = 1000  # processing baseline >= 04.00 (catalogs/sentinel2.yaml radiometry.offset_dn)

__all__ = [
    "expected_dn",
    "make_earth_search_offset_applied_catalog",
    "make_mixed_collection_catalog",
    "make_pc_baseline_0510_catalog",
    "make_timeseries_catalog",
    "read_patch_bands",
    "real_scl_20m",
]


# --------------------------------------------------------------------------------------------
# Real pixels


def read_patch_bands(patch_dir: Path) -> dict[str, np.ndarray]:
    """The 12 bands of a BigEarthNet patch folder: band name -> uint16 [H, W] at native GSD.

    Shapes: 10 m bands [120, 120], 20 m bands [60, 60], 60 m bands [20, 20].
    """
    patch_dir = Path(patch_dir)
    out: dict[str, np.ndarray] = {}
    for band in sensor().bands:
        with rasterio.open(patch_dir / f"{patch_dir.name}_{band.name}.tif") as src:
            out[band.name] = src.read(1)
    return out


def real_scl_20m() -> np.ndarray:
    """Real SCL classes for one 1.2 km square at 20 m: uint8 [60, 60].

    The 20x20 window `SCL_WINDOW` of the real 60 m SCL band, upsampled x3 by nearest
    neighbour (each 60 m pixel becomes 3x3 20 m pixels, classes unchanged).
    """
    r, c = SCL_WINDOW
    n = SCL_WINDOW_SIZE
    with rasterio.open(SCL_JP2) as src:
        win = src.read(1, window=((r, r + n), (c, c + n))).astype(np.uint8)
    return np.repeat(np.repeat(win, 3, axis=0), 3, axis=1)


def _band_arrays(patch_dir: Path, rot90: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.rot90(v, rot90)) for k, v in read_patch_bands(patch_dir).items()}


def _with_offset(dn: np.ndarray, offset: int) -> np.ndarray:
    """DN + offset on valid pixels (DN > 0); nodata 0 stays 0. uint16 [H, W] -> uint16 [H, W]."""
    if offset == 0:
        return dn
    if int(dn.max()) + offset > np.iinfo(np.uint16).max:
        raise ValueError("DN + offset overflows uint16")
    return np.where(dn > 0, dn.astype(np.int32) + offset, 0).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# Item rewriting


def _tile_centre_grid(item: dict[str, Any], ref_key: str) -> tuple[float, float]:
    """Top-left (x, y) of a 1.2 km square at the centre of the item's real tile grid."""
    t = item["assets"][ref_key]["proj:transform"]
    shape = item["assets"][ref_key]["proj:shape"]
    half = int(shape[0]) * abs(float(t[0])) / 2  # 54900 m for a 109.8 km tile
    half -= half % 60  # stay on the tile's 60 m lattice so 10/20/60 m grids nest exactly
    return float(t[2]) + half, float(t[5]) - half


def _gsd_transform(x0: float, y0: float, gsd: float) -> Affine:
    return Affine(gsd, 0.0, x0, 0.0, -gsd, y0)


def _epsg_of(item: dict[str, Any]) -> int:
    p = item["properties"]
    if p.get("proj:epsg"):
        return int(p["proj:epsg"])
    return int(str(p["proj:code"]).split(":")[1])


def _localise(
    item: dict[str, Any],
    item_dir: Path,
    *,
    band_key: dict[str, str],
    scl_key: str | None,
    arrays: dict[str, np.ndarray],
    offset: int,
    provenance: dict[str, Any],
    keep_extra_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Rewrite a real item onto a local 1.2 km grid at its tile centre, with local COGs.

    `band_key`: band name -> the provider's asset key. `arrays`: band name (and "SCL") ->
    pixels at native GSD. `offset` is added to valid band DN (not to SCL). Assets not named
    in `band_key`/`scl_key`/`keep_extra_keys` are dropped; extra keys are kept verbatim
    (remote hrefs, never read).
    """
    item = json.loads(json.dumps(item))  # deep copy
    epsg = _epsg_of(item)
    ref_key = band_key["B02"]
    x0, y0 = _tile_centre_grid(item, ref_key)
    size_m = PATCH_PX * 10.0
    bounds = (x0, y0 - size_m, x0 + size_m, y0)
    geometry, bbox = lonlat_footprint(epsg, bounds)
    assets: dict[str, Any] = {}
    wanted = [(name, key) for name, key in band_key.items()]
    if scl_key is not None:
        wanted.append(("SCL", scl_key))
    for name, key in wanted:
        data = arrays[name] if name == "SCL" else _with_offset(arrays[name], offset)
        gsd = PATCH_PX * 10.0 / data.shape[0]
        tr = _gsd_transform(x0, y0, gsd)
        fname = f"{item['id']}_{key}.tif"
        write_cog(item_dir / fname, data, crs=f"EPSG:{epsg}", transform=tr, overview_resampling="nearest" if name == "SCL" else "average")
        a = dict(item["assets"][key])
        a["href"] = f"./{fname}"
        a["proj:shape"] = [int(data.shape[0]), int(data.shape[1])]
        a["proj:transform"] = [float(v) for v in tuple(tr)[:6]]
        if "proj:bbox" in a:
            a["proj:bbox"] = list(bounds)
        assets[key] = a
    for key in keep_extra_keys:
        if key in item["assets"]:
            assets[key] = item["assets"][key]
    item["assets"] = assets
    item["geometry"] = geometry
    item["bbox"] = bbox
    item["properties"].update({f"fixture:{k}": v for k, v in provenance.items()})
    item["properties"]["fixture:dn_offset_written"] = offset
    item["properties"]["fixture:note"] = (
        "Test fixture: real provider metadata, moved to a 1.2 km grid at the tile centre; band pixels are a real "
        "BigEarthNet-S2 patch (fixture:source_patch, rotated fixture:rot90 x 90 deg) plus fixture:dn_offset_written "
        "on valid DN; SCL is a real SCL window. Contains modified Copernicus Sentinel data."
    )
    return item


def _fixture_collection(coll_id: str, items: Sequence[dict[str, Any]], what: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": coll_id,
        "description": f"Test fixture ({what}). Contains modified Copernicus Sentinel data.",
        "license": "other",
        "extent": collection_extent(items),
        "links": [],
    }


def _write(tmp: Path, name: str, groups: Sequence[tuple[str, list[dict[str, Any]]]], what: str) -> Path:
    catalog = {"type": "Catalog", "stac_version": "1.1.0", "id": name, "description": f"Test fixture: {what}"}
    colls = [(_fixture_collection(cid, items, what), items) for cid, items in groups]
    return write_static_catalog(tmp, catalog, colls)


def _keys(convention: str) -> dict[str, str]:
    return {b.name: b.asset_keys[convention] for b in sensor().bands}


# --------------------------------------------------------------------------------------------
# Builders


def make_pc_baseline_0510_catalog(tmp: Path, patch_dir: Path) -> Path:
    """Planetary Computer, baseline 05.10: raw DN WITH the +1000 offset; returns catalog.json.

    Item: the first real item of `planetary-computer_items_2024-04-19.json`
    (S2B_MSIL2A_20240419T095549_R122_T47XML_20240419T123458, EPSG:32647), metadata kept
    (id, datetime, s2:processing_baseline "05.10", proj:epsg, eo:cloud_cover, ...), no
    `raster:bands` (as served by PC). Assets B01..B12, B8A (COGs of `patch_dir`'s real DN
    + 1000 where DN > 0) and SCL (real classes, `real_scl_20m`). The correct pipeline output
    is the original DN: `expected_dn(path)[item_id][band]`.
    """
    tmp = Path(tmp)
    item = json.loads(PC_ITEMS_JSON.read_text())[0]
    arrays = read_patch_bands(patch_dir)
    arrays["SCL"] = real_scl_20m()
    local = _localise(
        item,
        tmp / item["collection"] / item["id"],
        band_key=_keys("b_numbers"),
        scl_key=sensor().scl_asset_keys["b_numbers"],
        arrays=arrays,
        offset=DN_OFFSET,
        provenance={"source_patch": str(Path(patch_dir).resolve()), "rot90": 0},
    )
    return _write(tmp, "fixture-pc-0510", [(item["collection"], [local])], "Planetary Computer baseline 05.10, offset in DN")


def make_earth_search_offset_applied_catalog(tmp: Path, patch_dir: Path) -> Path:
    """Earth Search legacy `sentinel-2-l2a`, baseline 05.09, offset ALREADY removed; returns catalog.json.

    Item: the real S2A_13TDE_20231008_0_L2A (EPSG:32613) with `earthsearch:boa_offset_applied:
    true`, common-name asset keys (`coastal`, `blue`, ..., `nir08`, `swir22`, `scl`) and
    `raster:bands` still claiming scale 0.0001 / offset -0.1. Band COGs hold `patch_dir`'s
    real DN unchanged (the provider removed the offset), so the correct pipeline output equals
    the COG values (`expected_dn`), not DN - 1000. The `-jp2` twins of the kept keys stay as
    recorded (remote JP2 hrefs: a reader must skip them, they are never fetched).
    """
    tmp = Path(tmp)
    item = next(f for f in json.loads(ES_SEARCH_JSON.read_text())["features"] if f["collection"] == "sentinel-2-l2a")
    keys = _keys("earth_search")
    scl_key = sensor().scl_asset_keys["earth_search"]
    arrays = read_patch_bands(patch_dir)
    arrays["SCL"] = real_scl_20m()
    local = _localise(
        item,
        tmp / item["collection"] / item["id"],
        band_key=keys,
        scl_key=scl_key,
        arrays=arrays,
        offset=0,
        provenance={"source_patch": str(Path(patch_dir).resolve()), "rot90": 0},
        keep_extra_keys=[f"{k}-jp2" for k in [*keys.values(), scl_key]],
    )
    return _write(tmp, "fixture-es-offset-applied", [(item["collection"], [local])], "Earth Search baseline 05.09, offset applied by provider")


def make_timeseries_catalog(tmp: Path, patch_dirs: Sequence[Path], *, seed: int = 0) -> Path:
    """13 real Planetary Computer items on tile 35MNM (2020-06-01..07-31), ONE shared grid; returns catalog.json.

    All items get the same proj:transform/proj:shape per GSD (a 1.2 km square at the centre
    of 35MNM, EPSG:32735) and keep their real ids, datetimes and baseline 02.12 (no offset).
    Date k (0 = earliest) holds the pixels of `patch_dirs[k % n]` rotated by `k // n` x 90
    degrees, so with the 11 BigEarthNet patches every date has distinct pixels; the choice
    is recorded in `fixture:date_index`, `fixture:source_patch` and `fixture:rot90`. SCL is
    the same real window on every date. Items are written in a seeded shuffled order, so
    ordering by date must be done by the code under test. `expected_dn` gives the arrays.
    """
    tmp = Path(tmp)
    dirs = [Path(p) for p in patch_dirs]
    if not dirs:
        raise ValueError("make_timeseries_catalog needs at least one patch folder")
    feats = json.loads(PC_TIMESERIES_GEOJSON.read_text())["features"]
    feats = sorted(feats, key=lambda f: f["properties"]["datetime"])
    scl = real_scl_20m()
    items = []
    for k, item in enumerate(feats):
        patch, rot = dirs[k % len(dirs)], k // len(dirs)
        arrays = _band_arrays(patch, rot)
        arrays["SCL"] = scl
        items.append(
            _localise(
                item,
                tmp / item["collection"] / item["id"],
                band_key=_keys("b_numbers"),
                scl_key=sensor().scl_asset_keys["b_numbers"],
                arrays=arrays,
                offset=0,
                provenance={"source_patch": str(patch.resolve()), "rot90": rot, "date_index": k},
            )
        )
    random.Random(seed).shuffle(items)
    return _write(tmp, "fixture-timeseries-35MNM", [(items[0]["collection"], items)], "13-date time series on one grid")


def make_mixed_collection_catalog(tmp: Path) -> Path:
    """The 20 real items of a recorded two-page Earth Search search, one collection each; returns catalog.json.

    Source: `earth-search-v1_mixed-collections_cassette.yaml` (a CQL2 search
    `eo:cloud_cover <= 40` recorded by pystac-client's tests). Collections and counts:
    sentinel-1-grd 3, sentinel-2-c1-l2a 6, sentinel-2-l2a 6 (offset applied flag true),
    sentinel-2-l1c 5 (JP2 assets at s3:// addresses). Items are kept as recorded except for
    their structural links (made local); asset hrefs stay remote: these items are for search,
    filtering and rejection tests only and must never be read. The four collection documents
    are minimal (id, description, extent from the items): the cassette holds no collection
    responses.
    """
    tmp = Path(tmp)
    cassette = yaml.safe_load(ES_MIXED_CASSETTE.read_text())
    by_coll: dict[str, list[dict[str, Any]]] = {}
    for inter in cassette["interactions"]:
        body = json.loads(inter["response"]["body"]["string"])
        if body.get("type") != "FeatureCollection":
            continue
        for f in body["features"]:
            by_coll.setdefault(f["collection"], []).append(f)
    groups = sorted(by_coll.items())
    return _write(tmp, "fixture-earth-search-mixed", groups, "recorded Earth Search items of four collections")


# --------------------------------------------------------------------------------------------
# Expected values


def _walk_items(catalog_json: Path) -> list[dict[str, Any]]:
    cat = json.loads(Path(catalog_json).read_text())
    out = []
    for link in cat["links"]:
        if link["rel"] != "child":
            continue
        coll_path = (Path(catalog_json).parent / link["href"]).resolve()
        coll = json.loads(coll_path.read_text())
        for il in coll["links"]:
            if il["rel"] == "item":
                out.append(json.loads((coll_path.parent / il["href"]).resolve().read_text()))
    return out


def expected_dn(catalog_json: Path) -> dict[str, dict[str, np.ndarray]]:
    """What a correct pipeline reads from a fixture catalog: item id -> name -> uint16 [H, W].

    Names are canonical band names (B01..B12, B8A) at native GSD holding the harmonised DN
    (the original BigEarthNet DN, rotated as recorded; i.e. the COG values minus
    `fixture:dn_offset_written` on valid pixels), plus "SCL" (uint8 classes at 20 m) where
    the item has SCL. Only items built from pixels (with `fixture:source_patch`) appear.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for item in _walk_items(catalog_json):
        p = item["properties"]
        if "fixture:source_patch" not in p:
            continue
        arrays = _band_arrays(Path(p["fixture:source_patch"]), int(p["fixture:rot90"]))
        keys = {k.lower() for k in item["assets"]}
        if any(k.lower() in keys for k in sensor().scl_asset_keys.values()):
            arrays["SCL"] = real_scl_20m()
        out[item["id"]] = arrays
    return out


def band_for_key(key: str) -> Band | None:
    """The band (from catalogs/sentinel2.yaml) a provider asset key names, if any."""
    for b in sensor().bands:
        if key in b.asset_keys.values():
            return b
    return None
