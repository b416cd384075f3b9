"""Build the embedded sample catalog: real BigEarthNet-S2 patches as COGs with real STAC items.

    python -m tools.sample_catalog --src ../shared/data/bigearthnet-s2-tiny --out catalogs/sample

Input: BigEarthNet-S2 v1.0 patch folders (`<patch>/<patch>_<band>.tif`, 12 single-band uint16
GeoTIFFs at native 10/20/60 m, plus `<patch>_labels_metadata.json`). Output, with relative
hrefs only so the folder can be shipped in the repository and moved::

    <out>/catalog.json
    <out>/README.md
    <out>/sentinel-2-l2a/collection.json
    <out>/sentinel-2-l2a/<patch>/<patch>.json           one STAC item per patch
    <out>/sentinel-2-l2a/<patch>/<patch>_<band>.tif     one COG per band, native resolution

Pixels are copied unchanged (uint16 DN); only the container changes (tiled, DEFLATE +
horizontal predictor, overviews, nodata=0). Item metadata comes from the patch's own
metadata JSON (acquisition time, UTM corners, CRS, L1C source product name); band metadata
comes from `catalogs/sentinel2.yaml`. The build is deterministic: no wall-clock timestamps
are written, so two runs give byte-identical files (pinned rasterio/GDAL).

The static-catalog writers here (`write_cog`, `write_static_catalog`) are also used by the
test fixtures in `tests/helpers/stac_fixtures.py`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from pyproj import CRS, Transformer
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from pipeline.catalogs import Band, sensor
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STAC_VERSION = "1.1.0"
COLLECTION_ID = "sentinel-2-l2a"
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "eo": "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "mgrs": "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
    "grid": "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
    "sat": "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "s2": "https://stac-extensions.github.io/sentinel-2/v1.0.0/schema.json",
}

# BigEarthNet patch folder names: <platform>_MSIL2A_<yyyymmdd>T<hhmmss>_<row>_<col>. Two
# patches of the tiny set have a 5-digit time (T94033, T93021: the leading zero of the hour
# was dropped by BigEarthNet itself), so the time group accepts 5 or 6 digits and the
# datetime is taken from the metadata JSON, never from the name.
_PATCH_NAME = re.compile(r"^(?P<platform>S2[A-D])_MSIL2A_(?P<date>\d{8})T(?P<time>\d{5,6})_(?P<row>\d+)_(?P<col>\d+)$")
# L1C product names (Sentinel-2 Products Specification Document, "Product naming"):
# MMM_MSIL1C_YYYYMMDDTHHMMSS_Nxxyy_ROOO_Txxxxx_<product discriminator>.SAFE. The same
# 5-digit-time quirk appears in `tile_source`, hence \d{5,6}.
_L1C_NAME = re.compile(
    r"^(?P<platform>S2[A-D])_MSIL1C_\d{8}T\d{5,6}_N(?P<pb_major>\d{2})(?P<pb_minor>\d{2})"
    r"_R(?P<orbit>\d{3})_T(?P<zone>\d{2})(?P<band>[C-X])(?P<square>[A-Z]{2})_\d{8}T\d{5,6}(\.SAFE)?$"
)

CLOUD_COVER_NOTE = (
    "Placeholder. The true cloud cover of a 1.2 km BigEarthNet patch is unknown: the patches carry "
    "no SCL band and BigEarthNet publishes no per-patch cloud percentage. 0.0 keeps the patch when "
    "a search filters on eo:cloud_cover; do not use it as a measurement."
)
BASELINE_NOTE = (
    "Derived from the N-number of the L1C source product (tile_source in the BigEarthNet metadata); the L2A "
    "patch was made from that product with sen2cor, taken here to inherit its baseline. Either way it predates "
    "baseline 04.00 (25 Jan 2022), which introduced the +1000 DN offset, so the DN carry no offset."
)
CREDIT = "Contains modified Copernicus Sentinel data (2017-2018), processed by ESA."
BIGEARTHNET_CREDIT = (
    "Patches from BigEarthNet-S2 v1.0 (Sumbul et al., 'BigEarthNet: A Large-Scale Benchmark Archive for "
    "Remote Sensing Image Understanding', IGARSS 2019), licence CDLA-Permissive-1.0, via the tiny subset of "
    "kai-tub/bigearthnet_common (Apache-2.0, commit 0449ebffc1cbe3693e38e7db2ded0e6cf8b18173)."
)


class SampleCatalogError(PipelineError):
    """The source patches are missing, malformed, or the output folder is not ours to replace."""


# --------------------------------------------------------------------------------------------
# COG and JSON writers (shared with tests/helpers/stac_fixtures.py)


def cog_blocksize(height: int, width: int) -> int:
    """Tile edge (pixels) for a COG of `height` x `width`: about half the longer side, 16..512.

    GDAL's default (512) would store a 20x20 band in one mostly empty 512x512 tile; half the
    image keeps tiles small and still gives one reduced-resolution overview level (overviews
    are added while the image is larger than one tile). TIFF tiles must be multiples of 16.
    120 px -> 64, 60 px -> 32, 20 px -> 16.
    """
    target = max(height, width) / 2
    size = 16
    while size < target and size < 512:
        size *= 2
    return size


def overview_factors(height: int, width: int, blocksize: int) -> list[int]:
    """Decimation factors [2, 4, ...] until the smallest overview fits in one tile (as GDAL's COG driver does)."""
    factors: list[int] = []
    size = max(height, width)
    while size > blocksize:
        factors.append(2 ** (len(factors) + 1))
        size = -(-size // 2)
    return factors


def write_cog(
    path: Path,
    data: np.ndarray,
    *,
    crs: str,
    transform: Affine,
    nodata: int = 0,
    overview_resampling: str = "average",
) -> None:
    """Write `data` [H, W] (one band, any integer dtype) as a Cloud-Optimized GeoTIFF.

    The classic COG recipe (GDAL wiki "Cloud Optimized GeoTIFF"): build overviews in memory,
    then copy with the GTiff driver and COPY_SRC_OVERVIEWS=YES, which writes IFDs first and
    tiles in order (GDAL reports LAYOUT=COG). GDAL's COG driver would do the same but warns
    about tiles below 128 px, which these 20-120 px bands need (see `cog_blocksize`).
    DEFLATE with horizontal differencing (predictor 2) is lossless and the usual choice for
    integer reflectance COGs. `overview_resampling`: "average" for reflectance, "nearest" for
    class maps such as SCL. Full-resolution pixel values are written unchanged.
    """
    if data.ndim != 2:
        raise ValueError(f"write_cog expects one band [H, W], got shape {data.shape}")
    h, w = data.shape
    bs = cog_blocksize(h, w)
    profile = dict(
        driver="MEM", height=h, width=w, count=1, dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with MemoryFile() as mem, mem.open(**profile) as src:
        src.write(data, 1)
        factors = overview_factors(h, w, bs)
        if factors:
            src.build_overviews(factors, Resampling[overview_resampling.lower()])
        rasterio.shutil.copy(
            src,
            str(path),
            driver="GTiff",
            TILED="YES",
            BLOCKXSIZE=bs,
            BLOCKYSIZE=bs,
            COMPRESS="DEFLATE",
            PREDICTOR=2,  # horizontal differencing, right for integers
            COPY_SRC_OVERVIEWS="YES",
            INTERLEAVE="BAND",
        )


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write `obj` as stable, human-readable JSON (2-space indent, trailing newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _rel(frm: Path, to: Path) -> str:
    """Relative href from the folder of `frm` to `to`, always starting with './' or '../'."""
    r = os.path.relpath(to, frm.parent).replace(os.sep, "/")
    return r if r.startswith("../") else f"./{r}"


def collection_extent(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """STAC extent (lon/lat bbox union, [first, last] datetime) of `items`."""
    boxes = np.array([it["bbox"][:4] for it in items], dtype=float)
    times = sorted(it["properties"]["datetime"] for it in items)
    return {
        "spatial": {"bbox": [[float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]]},
        "temporal": {"interval": [[times[0], times[-1]]]},
    }


def write_static_catalog(
    out_dir: Path,
    catalog: Mapping[str, Any],
    collections: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]],
) -> Path:
    """Write a self-contained static STAC catalog and return the path of `catalog.json`.

    `catalog`: Catalog fields without links. `collections`: (collection fields without links,
    its items). Items are written to `<collection id>/<item id>/<item id>.json` (STAC best-practice
    layout) and keep their assets' hrefs as given: asset files must already be in that item
    folder (relative hrefs) or be absolute/remote. Every structural link (root, parent, child,
    item, collection) is relative and there are no `self` links, so the folder can be moved.
    """
    cat_path = out_dir / "catalog.json"
    cat = dict(catalog)
    cat["links"] = [{"rel": "root", "href": "./catalog.json", "type": "application/json", "title": cat.get("title", cat["id"])}]
    for coll, items in collections:
        coll_path = out_dir / coll["id"] / "collection.json"
        cat["links"].append({"rel": "child", "href": _rel(cat_path, coll_path), "type": "application/json", "title": coll.get("title", coll["id"])})
        c = dict(coll)
        c_links = [
            {"rel": "root", "href": _rel(coll_path, cat_path), "type": "application/json"},
            {"rel": "parent", "href": _rel(coll_path, cat_path), "type": "application/json"},
        ]
        c_links.extend(dict(link) for link in coll.get("links", []) if link.get("rel") not in _STRUCTURAL)
        for it in items:
            item_path = out_dir / coll["id"] / it["id"] / f"{it['id']}.json"
            c_links.append({"rel": "item", "href": _rel(coll_path, item_path), "type": "application/geo+json"})
            i = dict(it)
            i["collection"] = coll["id"]
            i["links"] = [
                {"rel": "root", "href": _rel(item_path, cat_path), "type": "application/json"},
                {"rel": "parent", "href": _rel(item_path, coll_path), "type": "application/json"},
                {"rel": "collection", "href": _rel(item_path, coll_path), "type": "application/json"},
                *(dict(link) for link in it.get("links", []) if link.get("rel") not in _STRUCTURAL),
            ]
            write_json(item_path, i)
        c["links"] = c_links
        write_json(coll_path, c)
    write_json(cat_path, cat)
    return cat_path


_STRUCTURAL = {"self", "root", "parent", "child", "item", "items", "collection", "next", "prev", "previous"}


# --------------------------------------------------------------------------------------------
# BigEarthNet patch -> STAC item


@dataclass(frozen=True)
class Patch:
    """One BigEarthNet-S2 patch folder and the facts parsed from its name and metadata JSON."""

    name: str
    folder: Path
    platform: str  # "sentinel-2a"
    datetime: str  # ISO 8601 UTC, "2017-06-17T11:33:21Z"
    epsg: int
    bounds: tuple[float, float, float, float]  # UTM metres: left, bottom, right, top
    mgrs_zone: int
    mgrs_band: str
    mgrs_square: str
    processing_baseline: str  # "02.05"
    relative_orbit: int
    l1c_product: str
    labels: tuple[str, ...]  # CORINE Land Cover labels (BigEarthNet 43-class nomenclature)

    @property
    def tile(self) -> str:
        return f"{self.mgrs_zone:02d}{self.mgrs_band}{self.mgrs_square}"


def read_patch(folder: Path) -> Patch:
    """Parse a patch folder's name and `<name>_labels_metadata.json` into a `Patch`."""
    name = folder.name
    m = _PATCH_NAME.match(name)
    if not m:
        raise SampleCatalogError(f"{folder}: not a BigEarthNet-S2 patch folder name (expected S2X_MSIL2A_<date>T<time>_<r>_<c>)")
    meta_path = folder / f"{name}_labels_metadata.json"
    if not meta_path.is_file():
        raise SampleCatalogError(f"{meta_path} is missing: every patch folder needs its labels metadata JSON")
    meta = json.loads(meta_path.read_text())
    src = str(meta["tile_source"])
    s = _L1C_NAME.match(src)
    if not s:
        raise SampleCatalogError(f"{meta_path}: cannot parse tile_source {src!r} as a Sentinel-2 L1C product name")
    if s["platform"] != m["platform"]:
        raise SampleCatalogError(f"{meta_path}: platform {m['platform']} in the name but {s['platform']} in tile_source")
    # acquisition_date is "YYYY-MM-DD HH:MM:SS" in UTC (Sentinel-2 sensing times are UTC).
    when = dt.datetime.strptime(meta["acquisition_date"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
    epsg = CRS.from_wkt(meta["projection"]).to_epsg()
    if epsg is None:
        raise SampleCatalogError(f"{meta_path}: the projection WKT has no EPSG code")
    c = meta["coordinates"]
    return Patch(
        name=name,
        folder=folder,
        platform=f"sentinel-2{m['platform'][-1].lower()}",
        datetime=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        epsg=int(epsg),
        bounds=(float(c["ulx"]), float(c["lry"]), float(c["lrx"]), float(c["uly"])),
        mgrs_zone=int(s["zone"]),
        mgrs_band=s["band"],
        mgrs_square=s["square"],
        processing_baseline=f"{s['pb_major']}.{s['pb_minor']}",
        relative_orbit=int(s["orbit"]),
        l1c_product=src,
        labels=tuple(meta["labels"]),
    )


def lonlat_footprint(epsg: int, bounds: tuple[float, float, float, float]) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON Polygon and bbox (lon/lat, WGS 84) of a UTM rectangle `bounds` (l, b, r, t).

    The four corners are transformed exactly; for a 1.2 km patch the edges between them are
    straight to far below a centimetre. Coordinates are rounded to 1e-7 degrees (~1 cm) so the
    JSON does not depend on the last bits of a PROJ version. Ring is counter-clockwise
    (RFC 7946).
    """
    tr = Transformer.from_crs(CRS.from_epsg(epsg), CRS.from_epsg(4326), always_xy=True)
    left, bottom, right, top = bounds
    corners = [(left, bottom), (right, bottom), (right, top), (left, top)]
    pts = [tuple(round(float(v), 7) for v in tr.transform(x, y)) for x, y in corners]
    ring = [list(p) for p in [*pts, pts[0]]]
    lons = [p[0] for p in pts]
    lats = [p[1] for p in pts]
    return {"type": "Polygon", "coordinates": [ring]}, [min(lons), min(lats), max(lons), max(lats)]


def band_asset(band: Band, href: str, *, shape: tuple[int, int], transform: Affine, title_suffix: str = "") -> dict[str, Any]:
    """STAC asset for one Sentinel-2 band COG, band facts from `catalogs/sentinel2.yaml`.

    `raster:bands` carries nodata and data type but no scale/offset, like Planetary Computer:
    the DN convention (DN / 10000, offset decided from s2:processing_baseline) is the
    pipeline's job.
    """
    res = abs(float(transform.a))
    return {
        "href": href,
        "type": COG_MEDIA_TYPE,
        "title": f"{band.name} - {band.common_name} - {int(band.gsd)}m{title_suffix}",
        "roles": ["data"],
        "gsd": float(band.gsd),
        "eo:bands": [{"name": band.name, "common_name": band.common_name, "center_wavelength": band.center_wavelength}],
        "raster:bands": [{"nodata": 0, "data_type": "uint16", "spatial_resolution": res}],
        "proj:shape": [int(shape[0]), int(shape[1])],
        "proj:transform": [float(v) for v in tuple(transform)[:6]],
    }


def patch_item(patch: Patch, item_dir: Path) -> dict[str, Any]:
    """Convert one patch's bands to COGs in `item_dir` and return its STAC item (relative hrefs)."""
    geometry, bbox = lonlat_footprint(patch.epsg, patch.bounds)
    assets: dict[str, Any] = {}
    for band in sensor().bands:
        src_path = patch.folder / f"{patch.name}_{band.name}.tif"
        if not src_path.is_file():
            raise SampleCatalogError(f"{src_path} is missing: a patch needs all 12 L2A bands")
        with rasterio.open(src_path) as src:
            data = src.read(1)
            if src.crs is None or src.crs.to_epsg() != patch.epsg:
                raise SampleCatalogError(f"{src_path}: CRS {src.crs} differs from the metadata EPSG:{patch.epsg}")
            if abs(src.res[0] - band.gsd) > 1e-6:
                raise SampleCatalogError(f"{src_path}: resolution {src.res[0]} m, expected {band.gsd} m for {band.name}")
            transform = src.transform
        cog_name = f"{patch.name}_{band.name}.tif"
        write_cog(item_dir / cog_name, data, crs=f"EPSG:{patch.epsg}", transform=transform)
        key = band.asset_keys["b_numbers"]
        assets[key] = band_asset(band, f"./{cog_name}", shape=data.shape, transform=transform)
    props: dict[str, Any] = {
        "datetime": patch.datetime,
        "platform": patch.platform,
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "eo:cloud_cover": 0.0,
        "sample:cloud_cover_note": CLOUD_COVER_NOTE,
        "proj:code": f"EPSG:{patch.epsg}",
        "proj:epsg": patch.epsg,  # projection extension v1 name, still read by older clients
        "proj:bbox": list(patch.bounds),
        "mgrs:utm_zone": patch.mgrs_zone,
        "mgrs:latitude_band": patch.mgrs_band,
        "mgrs:grid_square": patch.mgrs_square,
        "grid:code": f"MGRS-{patch.tile}",
        "s2:mgrs_tile": patch.tile,
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": patch.processing_baseline,
        "sample:processing_baseline_source": BASELINE_NOTE,
        "sat:relative_orbit": patch.relative_orbit,
        "sample:l1c_source_product": patch.l1c_product,
        "sample:corine_labels": list(patch.labels),
        "sample:source": "BigEarthNet-S2 v1.0 patch (1.2 km x 1.2 km), bands copied unchanged into COGs",
    }
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": sorted(EXTENSIONS.values()),
        "id": patch.name,
        "geometry": geometry,
        "bbox": bbox,
        "properties": props,
        "assets": assets,
        "links": [],
    }


def _collection(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    bands = sensor().bands
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": sorted(EXTENSIONS[k] for k in ("eo", "raster", "proj")),
        "id": COLLECTION_ID,
        "title": "Sentinel-2 L2A sample: 11 real BigEarthNet-S2 patches",
        "description": (
            "Embedded offline sample of Sentinel-2 Level-2A surface reflectance: 11 real 1.2 km x 1.2 km "
            "patches of BigEarthNet-S2 v1.0 (sen2cor L2A, 2017-2018, 7 MGRS tiles in UTM zones 29, 34 and 35), "
            "12 bands as Cloud-Optimized GeoTIFFs at native 10/20/60 m, DN unchanged (reflectance = DN / 10000, "
            f"nodata 0, processing baselines before 04.00 so no offset). No SCL band. {CREDIT} {BIGEARTHNET_CREDIT}"
        ),
        "keywords": ["sentinel-2", "l2a", "bigearthnet", "sample"],
        "license": "other",
        "providers": [
            {"name": "European Space Agency / Copernicus", "roles": ["producer", "licensor"], "url": "https://sentinels.copernicus.eu/"},
            {
                "name": "BigEarthNet (Remote Sensing Image Analysis group, TU Berlin)",
                "roles": ["processor", "licensor"],
                "url": "https://bigearth.net/",
                "description": "Made sen2cor L2A products and cut them into 1.2 km x 1.2 km patches with CORINE labels; CDLA-Permissive-1.0.",
            },
            {"name": "spectralgpt-pipeline", "roles": ["processor", "host"], "description": "Converted the patches to COGs and wrote this catalog (tools/sample_catalog.py)."},
        ],
        "extent": collection_extent(items),
        "summaries": {
            "platform": sorted({it["properties"]["platform"] for it in items}),
            "constellation": ["sentinel-2"],
            "instruments": ["msi"],
            "gsd": sorted({float(b.gsd) for b in bands}),
            "s2:processing_baseline": sorted({it["properties"]["s2:processing_baseline"] for it in items}),
            "proj:code": sorted({it["properties"]["proj:code"] for it in items}),
        },
        "item_assets": {
            b.asset_keys["b_numbers"]: {
                "type": COG_MEDIA_TYPE,
                "roles": ["data"],
                "gsd": float(b.gsd),
                "eo:bands": [{"name": b.name, "common_name": b.common_name, "center_wavelength": b.center_wavelength}],
            }
            for b in bands
        },
        "links": [
            {"rel": "license", "href": "https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice", "title": "Legal notice on the use of Copernicus Sentinel Data and Service Information"},
            {"rel": "license", "href": "https://cdla.dev/permissive-1-0/", "title": "CDLA-Permissive-1.0 (BigEarthNet)"},
            {"rel": "cite-as", "href": "https://doi.org/10.1109/IGARSS.2019.8900532", "title": "BigEarthNet (Sumbul et al., IGARSS 2019)"},
        ],
    }


README = """\
# Embedded sample catalog (generated: do not edit)

Generated by `python -m tools.sample_catalog --src ../shared/data/bigearthnet-s2-tiny --out catalogs/sample`
(the same patches are in `tests/data/bigearthnet-s2-tiny`); a test checks this folder is up to date.

A static STAC catalog (`catalog.json` -> `sentinel-2-l2a/collection.json` -> one item per patch)
with relative hrefs, served by `pipeline.stac_server` as a real STAC API on 127.0.0.1 when
`python -m pipeline.build_shards` runs without `--catalog`.

- 11 real BigEarthNet-S2 v1.0 patches (1.2 km x 1.2 km, Sentinel-2 L2A from sen2cor, 2017-2018),
  12 bands each as Cloud-Optimized GeoTIFFs at native 10/20/60 m (uint16, DEFLATE + predictor 2,
  nodata 0). Pixel values are the original DN: reflectance = DN / 10000.
- Item metadata is real, from each patch's `labels_metadata.json`: datetime, UTM CRS and corners,
  MGRS tile, relative orbit and processing baseline (from the L1C source product name, see
  `sample:processing_baseline_source`), CORINE labels (`sample:corine_labels`).
- `eo:cloud_cover` is a 0.0 placeholder (see `sample:cloud_cover_note`): patches have no SCL band.

## Credits and licences

- Contains modified Copernicus Sentinel data (2017-2018), processed by ESA. Use is governed by the
  Legal Notice on the use of Copernicus Sentinel Data and Service Information.
- BigEarthNet-S2 v1.0: G. Sumbul, M. Charfuelan, B. Demir, V. Markl, "BigEarthNet: A Large-Scale
  Benchmark Archive for Remote Sensing Image Understanding", IGARSS 2019. Licence
  CDLA-Permissive-1.0 (https://cdla.dev/permissive-1-0/).
- Tiny subset taken from kai-tub/bigearthnet_common (Apache-2.0), `nbs/datasets/tiny/`,
  commit 0449ebffc1cbe3693e38e7db2ded0e6cf8b18173.
"""


def build_sample_catalog(src_dir: Path, out_dir: Path) -> Path:
    """Convert every BigEarthNet patch folder under `src_dir` into the static catalog `out_dir`.

    Returns the path of `<out_dir>/catalog.json`. The catalog is built in a temporary sibling
    folder and then replaces `out_dir`, which must be absent, empty, or a previous build (it
    holds a catalog.json): anything else is refused rather than deleted.
    """
    src_dir = Path(src_dir)
    out_dir = Path(out_dir)
    folders = sorted(p for p in src_dir.iterdir() if p.is_dir()) if src_dir.is_dir() else []
    if not folders:
        raise SampleCatalogError(f"no patch folders in {src_dir}: pass --src pointing at bigearthnet-s2-tiny")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "catalog.json").is_file():
        raise SampleCatalogError(f"{out_dir} exists and is not a sample catalog (no catalog.json): choose another --out")
    patches = [read_patch(f) for f in folders]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        items = [patch_item(p, tmp / COLLECTION_ID / p.name) for p in patches]
        catalog = {
            "type": "Catalog",
            "stac_version": STAC_VERSION,
            "id": "spectralgpt-sample",
            "title": "SpectralGPT pipeline embedded sample catalog",
            "description": f"Offline sample for the SpectralGPT data pipeline: real Sentinel-2 L2A patches as COGs. {CREDIT}",
        }
        write_static_catalog(tmp, catalog, [(_collection(items), items)])
        (tmp / "README.md").write_text(README, encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp creates 0700; the shipped folder should be readable like the rest of the repo
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d items (%d COGs) to %s", len(items), sum(len(i["assets"]) for i in items), out_dir)
    return out_dir / "catalog.json"


def iter_catalog_files(root: Path) -> Iterable[Path]:
    """Every file of a built catalog folder, sorted (for comparisons)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """CLI: build the sample catalog. Returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m tools.sample_catalog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="folder of BigEarthNet-S2 patch folders (e.g. ../shared/data/bigearthnet-s2-tiny)")
    ap.add_argument("--out", type=Path, default=Path("catalogs/sample"), help="output folder (replaced)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = build_sample_catalog(args.src, args.out)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
