"""STAC search through pystac-client and normalisation of items into `Scene`s.

One code path for every source: a live STAC API is searched directly; a static catalog
(the embedded sample, or a user's catalog.json) is first served on loopback by a real STAC
API (`pipeline.stac_server`), then searched the same way.

Items that cannot be used are rejected with a counted reason (not L2A, no COG assets,
missing bands, no projection, unknown processing baseline, too cloudy, outside the AOI).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely.geometry

from pipeline.catalogs import Source, get_source, load_aoi, sensor
from pipeline.config import BuildConfig
from pipeline.errors import CatalogError
from pipeline.harmonise import Harmonisation, decide
from pipeline.names import mgrs_tile

log = logging.getLogger(__name__)

_COG_TYPES = ("image/tiff", "image/vnd.stac.geotiff")
_MGRS_IN_ID = re.compile(r"_T?(\d{1,2}[C-X][A-Z]{2})_")


@dataclass(frozen=True)
class Scene:
    """One usable L2A item, with assets keyed by canonical band name (B01..B12, SCL)."""

    id: str
    collection: str
    datetime: str  # ISO 8601, UTC
    epsg: int
    tile: str  # MGRS tile, e.g. 29UPU ("" if unknown)
    hrefs: dict[str, str]  # band name -> href
    grid_shape: tuple[int, int]  # (rows, cols) of the 10 m grid
    grid_transform: tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f of the 10 m grid
    harmonisation: Harmonisation
    bbox_lonlat: tuple[float, float, float, float]
    cloud_cover: float | None
    item: dict[str, Any] = field(repr=False, compare=False, hash=False)  # item JSON, canonical asset keys

    @property
    def has_scl(self) -> bool:
        return "SCL" in self.hrefs

    @property
    def date_compact(self) -> str:
        return self.datetime[:10].replace("-", "")


@dataclass
class SearchResult:
    scenes: list[Scene]
    found: int
    rejected: Counter[str]
    catalog: str
    collection: str
    max_items: int | None = None  # the explicit cap, if any
    capped: bool = False  # the search stopped at max_items with more items left
    matched: int | None = None  # numberMatched, when the API says it


@dataclass(frozen=True)
class ResolvedCatalog:
    """Where to search: a STAC API URL (possibly a loopback server we started)."""

    label: str  # what the user asked for, for logs and the manifest
    url: str
    collection: str
    source: Source | None


@contextlib.contextmanager
def open_catalog(cfg: BuildConfig) -> Iterator[ResolvedCatalog]:
    """Resolve `cfg.catalog` to a STAC API URL, serving static catalogs on loopback."""
    from pipeline import stac_server  # imported lazily: uvicorn start-up is only needed for static catalogs

    name = cfg.catalog
    if name is None:
        src = get_source("sample")
        log.info(
            "no --catalog given: using the embedded sample catalog (11 real BigEarthNet-S2 patches, served on "
            "127.0.0.1); for live data pass --catalog earth-search (or planetary-computer, cdse, or a STAC API URL)"
        )
        assert src.path is not None
        with stac_server.serve_static_catalog(src.path) as url:
            yield ResolvedCatalog("sample", url, cfg.collection or src.collection, src)
        return
    if re.match(r"^https?://", name):
        yield ResolvedCatalog(name, name, cfg.collection or "sentinel-2-l2a", None)
        return
    p = Path(name)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise CatalogError(f"catalog file {name!r} not found")
        with stac_server.serve_static_catalog(p.resolve()) as url:
            # samples name a static catalog by its STAC id, not by where it lies on this machine
            yield ResolvedCatalog(_static_label(p), url, cfg.collection or _static_collection(p), None)
        return
    src = get_source(name)
    if src.path is not None:
        with stac_server.serve_static_catalog(src.path) as url:
            yield ResolvedCatalog(name, url, cfg.collection or src.collection, src)
        return
    assert src.url is not None
    yield ResolvedCatalog(name, src.url, cfg.collection or src.collection, src)


def _static_label(path: Path) -> str:
    """`static:<id>`: a static catalog as manifests and samples record it (its STAC id, the
    same wherever the catalog and the dataset lie, so samples stay byte-identical)."""
    import json

    try:
        ident = json.loads(path.read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        ident = None
    return f"static:{ident or path.name}"


def _static_collection(path: Path) -> str:
    """The collection id to search in a static catalog: the file itself or its first child."""
    import json

    d = json.loads(path.read_text())
    if d.get("type") == "Collection":
        return str(d["id"])
    for link in d.get("links", []):
        if link.get("rel") == "child":
            child = (path.parent / link["href"]).resolve()
            if child.is_file():
                c = json.loads(child.read_text())
                if c.get("type") == "Collection":
                    return str(c["id"])
    return "sentinel-2-l2a"


def aoi_geometry(cfg: BuildConfig) -> dict[str, Any]:
    """The search geometry (lon/lat GeoJSON) from --bbox or the named AOI."""
    if cfg.bbox is not None:
        return shapely.geometry.mapping(shapely.geometry.box(*cfg.bbox))
    assert cfg.aoi is not None
    return load_aoi(cfg.aoi)


def _datetime_range(cfg: BuildConfig) -> str | None:
    if not cfg.start and not cfg.end:
        return None
    s = f"{cfg.start}T00:00:00Z" if cfg.start else ".."
    e = f"{cfg.end}T23:59:59Z" if cfg.end else ".."
    return f"{s}/{e}"


def search(cfg: BuildConfig, cat: ResolvedCatalog) -> SearchResult:
    """Search `cat` for L2A items over the AOI and dates, and normalise them into scenes."""
    import pystac_client
    from pystac_client.exceptions import APIError

    geom = aoi_geometry(cfg)
    aoi_shape = shapely.geometry.shape(geom)
    try:
        client = pystac_client.Client.open(cat.url)
    except Exception as e:  # connection refused, DNS, HTTP errors, JSON that is not STAC
        raise CatalogError(f"cannot open STAC API {cat.label!r} ({cat.url}): {_one_line(e)}") from None
    if not client.conforms_to("ITEM_SEARCH"):
        raise CatalogError(f"{cat.label!r} ({cat.url}) is not a STAC API with item search (no /search conformance)")
    kwargs: dict[str, Any] = dict(
        collections=[c.strip() for c in cat.collection.split(",") if c.strip()],
        bbox=list(aoi_shape.bounds),
        datetime=_datetime_range(cfg),
        max_items=cfg.max_items,  # None: every page (a Europe-scale search is never cut silently)
        limit=min(cfg.max_items or 500, 500),
    )
    if cfg.max_cloud < 100 and client.conforms_to("FILTER"):
        # Server-side cloud filter saves transfer on live APIs; the same test runs client-side below.
        kwargs["filter"] = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, cfg.max_cloud]}
        kwargs["filter_lang"] = "cql2-json"
    rejected: Counter[str] = Counter()
    scenes: dict[str, Scene] = {}
    found = 0
    matched: int | None = None
    try:
        item_search = client.search(**kwargs)
        for item in item_search.items_as_dicts():
            found += 1
            scene, reason = normalise_item(item, cfg, aoi_shape, cat)
            if scene is None:
                rejected[reason] += 1
                log.debug("rejected %s: %s", item.get("id"), reason)
            elif scene.id in scenes:
                rejected["duplicate item id"] += 1  # PC pages can repeat items (PlanetaryComputer#163)
            else:
                scenes[scene.id] = scene
        capped = cfg.max_items is not None and found >= cfg.max_items
        if capped:
            with contextlib.suppress(Exception):  # numberMatched is optional in STAC API
                matched = item_search.matched()
    except APIError as e:
        raise CatalogError(f"STAC search on {cat.label!r} failed: {_one_line(e)}") from None
    except OSError as e:
        raise CatalogError(f"STAC search on {cat.label!r} failed: {_one_line(e)}") from None
    if capped:
        log.warning("search stopped at --max-items %d: %d items taken of %s matched; raise or drop --max-items to "
                    "take every item", cfg.max_items, found, matched if matched is not None else "more")
    ordered = sorted(scenes.values(), key=lambda s: (s.datetime, s.id))
    return SearchResult(ordered, found, rejected, cat.label, cat.collection, cfg.max_items, capped, matched)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _is_l2a(item: dict[str, Any]) -> bool:
    props = item.get("properties", {})
    ptype = str(props.get("s2:product_type", ""))
    if ptype:
        return ptype.upper().endswith("2A")
    level = str(props.get("processing:level", ""))
    if level:
        return level.upper() == "L2A"
    text = f"{item.get('collection', '')} {item.get('id', '')}".lower()
    return "sentinel-2" in text and "l2a" in text or text.strip().endswith("_l2a")


def _is_cog(asset: dict[str, Any]) -> bool:
    href = str(asset.get("href", ""))
    typ = str(asset.get("type", "")).lower()
    if href.lower().endswith((".jp2", ".safe", ".xml")) or "jp2" in typ:
        return False
    if typ:
        return typ.startswith(_COG_TYPES)
    return href.lower().endswith((".tif", ".tiff"))


def _epsg(item: dict[str, Any], asset: dict[str, Any] | None = None) -> int | None:
    for d in (asset or {}, item.get("properties", {})):
        if d.get("proj:epsg"):
            return int(d["proj:epsg"])
        code = d.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            return int(code.split(":", 1)[1])
    return None


def _tile(item: dict[str, Any]) -> str | None:
    """The item's MGRS tile ('' when it names none), or None when a field that should name
    one holds anything else: the tile becomes part of paths and sample keys, so only a real
    MGRS name passes (`names.mgrs_tile`); `../..`, an absolute path or a look-alike does not."""
    p = item.get("properties", {})
    given: list[object] = []
    if p.get("s2:mgrs_tile"):
        given.append(p["s2:mgrs_tile"])
    elif p.get("mgrs:utm_zone") and p.get("mgrs:latitude_band") and p.get("mgrs:grid_square"):
        given.append(f"{p['mgrs:utm_zone']}{p['mgrs:latitude_band']}{p['mgrs:grid_square']}")
    elif str(p.get("grid:code", "")).startswith("MGRS-"):
        given.append(p["grid:code"])
    if given:
        return mgrs_tile(given[0])
    m = _MGRS_IN_ID.search(str(item.get("id", "")) + "_")
    return (mgrs_tile(m.group(1)) or "") if m else ""


#: Sentinel-2A's first acquisition; items dated before it, or after tomorrow, are not real L2A
MISSION_START = "2015-06-23"
#: The largest grid side an item may declare (a 10980 px MGRS tile, with margin): bounds what
#: a hostile or broken `proj:shape` can make the build allocate or loop over before any read
MAX_SIDE = 30000


def _is_utm(epsg: int) -> bool:
    return 32601 <= epsg <= 32660 or 32701 <= epsg <= 32760


def _sanity(item: dict[str, Any], epsg: int, assets: dict[str, dict[str, Any]], ref: dict[str, Any],
            shape: Any, transform: Any, dt_text: str) -> str:
    """'' when the item's grid, shapes and date are what a Sentinel-2 L2A item can have."""
    import datetime as dt

    if not _is_utm(epsg):
        return f"not a UTM CRS (EPSG:{epsg}): Sentinel-2 L2A tiles are on UTM zones (EPSG:326xx/327xx)"
    for name, a in [("item", item.get("properties", {})), *assets.items()]:
        sh = a.get("proj:shape")
        if sh is None:
            continue
        try:
            rows, cols = int(sh[0]), int(sh[1])
        except (TypeError, ValueError, IndexError):
            return f"malformed proj:shape of {name}"
        if not (1 <= rows <= MAX_SIDE and 1 <= cols <= MAX_SIDE):
            return f"proj:shape of {name} {rows}x{cols} out of bounds (1..{MAX_SIDE} px per side)"
    try:
        px = (abs(float(transform[0])), abs(float(transform[4])))
    except (TypeError, ValueError, IndexError):
        return "malformed proj:transform"
    if any(abs(v - 10.0) > 0.01 for v in px):
        return f"10 m bands on a {px[0]:g} x {px[1]:g} m grid (not Sentinel-2's 10 m)"
    when = _iso_utc(dt_text)[:10]
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    if not MISSION_START <= when <= tomorrow:
        return f"datetime {when} outside the mission's lifetime ({MISSION_START} to {tomorrow})"
    return ""


def validate_item(item: Any) -> str:
    """Structural STAC item checks (offline, no JSON-schema download): '' when valid."""
    if not isinstance(item, dict) or item.get("type") != "Feature":
        return "invalid STAC item (not a GeoJSON Feature)"
    if not item.get("id") or not isinstance(item.get("id"), str):
        return "invalid STAC item (no id)"
    props = item.get("properties")
    if not isinstance(props, dict):
        return "invalid STAC item (no properties)"
    if not (props.get("datetime") or (props.get("start_datetime") and props.get("end_datetime"))):
        return "invalid STAC item (no datetime)"
    try:
        _iso_utc(str(props.get("datetime") or props["start_datetime"]))
    except ValueError:
        return "invalid STAC item (unparsable datetime)"
    geom = item.get("geometry")
    try:
        if geom is not None and not shapely.geometry.shape(geom).is_valid:
            return "invalid STAC item (invalid geometry)"
    except (ValueError, TypeError, AttributeError, KeyError):
        return "invalid STAC item (invalid geometry)"
    bbox = item.get("bbox")
    if geom is not None and (not isinstance(bbox, list) or len(bbox) not in (4, 6)):
        return "invalid STAC item (bbox missing or malformed)"
    if not isinstance(item.get("assets"), dict):
        return "invalid STAC item (no assets)"
    return ""


def normalise_item(
    item: dict[str, Any], cfg: BuildConfig, aoi_shape: Any, cat: ResolvedCatalog
) -> tuple[Scene | None, str]:
    """Turn a STAC item into a `Scene`, or return (None, reason) when it cannot be used."""
    bad = validate_item(item)
    if bad:
        return None, bad
    s = sensor()
    props = item.get("properties", {})
    iid = str(item.get("id", ""))
    if not _is_l2a(item):
        return None, f"not L2A (collection {item.get('collection')})"
    cc = props.get("eo:cloud_cover")
    if cc is not None and float(cc) > cfg.max_cloud:
        return None, "scene cloud cover above max_cloud"
    geom = item.get("geometry")
    if geom and not shapely.geometry.shape(geom).intersects(aoi_shape):
        return None, "outside the AOI"
    assets = item.get("assets", {})
    hrefs: dict[str, str] = {}
    canon_assets: dict[str, dict[str, Any]] = {}
    saw_non_cog = False
    for band in [*s.band_names, "SCL"]:
        for key in s.asset_key_candidates(band):
            a = assets.get(key)
            if a is None:
                continue
            if not _is_cog(a):
                saw_non_cog = True
                continue
            hrefs[band] = str(a["href"])
            canon_assets[band] = dict(a)
            break
    missing = [b for b in s.band_names if b not in hrefs]
    if len(missing) == len(s.band_names):
        return None, "no COG assets" if (saw_non_cog or assets) else "no assets"
    if missing:
        return None, f"missing bands {','.join(missing)}"
    ref = next((canon_assets[b] for b in s.band_names if s.bands[s.band_names.index(b)].gsd == 10), None)
    assert ref is not None
    epsg = _epsg(item, ref)
    shape = ref.get("proj:shape") or props.get("proj:shape")
    transform = ref.get("proj:transform") or props.get("proj:transform")
    if epsg is None or not shape or not transform:
        return None, "no projection (proj:epsg/proj:code and proj:shape/proj:transform)"
    harm = decide(props, iid)
    if harm is None:
        return None, "unknown processing baseline"
    dt_text = str(props.get("datetime") or props.get("start_datetime") or "")
    if not dt_text:
        return None, "no datetime"
    insane = _sanity(item, epsg, canon_assets, ref, shape, transform, dt_text)
    if insane:
        return None, insane
    tile = _tile(item)
    if tile is None:
        return None, "invalid MGRS tile name"
    canon_item = dict(item)
    canon_item["assets"] = canon_assets
    bbox = item.get("bbox") or list(shapely.geometry.shape(geom).bounds)
    return (
        Scene(
            id=iid,
            collection=str(item.get("collection", cat.collection)),
            datetime=_iso_utc(dt_text),
            epsg=epsg,
            tile=tile,
            hrefs=hrefs,
            grid_shape=(int(shape[0]), int(shape[1])),
            grid_transform=tuple(float(v) for v in transform[:6]),  # type: ignore[arg-type]
            harmonisation=harm,
            bbox_lonlat=tuple(float(v) for v in bbox[:4]),  # type: ignore[arg-type]
            cloud_cover=float(cc) if cc is not None else None,
            item=canon_item,
        ),
        "",
    )


def _iso_utc(text: str) -> str:
    import datetime as dt

    d = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
