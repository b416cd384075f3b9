"""Access to the facts kept as data in `catalogs/`: bands, STAC sources and AOIs.

Nothing here knows about a particular provider beyond what the YAML files say, so a new
provider or AOI is a data change, not a code change.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import catalogs as _catalog_data
from pipeline.errors import CatalogError, ConfigError

#: The installed `catalogs` package's folder: sentinel2.yaml, sources.yaml, aois/ and sample/
#: (package data, found through importlib.resources, so it works from a wheel as from a checkout).
CATALOG_DIR = _catalog_data.root()

_AOI_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Band:
    """One Sentinel-2 band as listed in `catalogs/sentinel2.yaml`."""

    name: str
    common_name: str
    center_wavelength: float  # micrometres
    gsd: int  # native ground sampling distance, metres
    asset_keys: dict[str, str]


@dataclass(frozen=True)
class SensorTable:
    """The band table in SpectralGPT order plus SCL classes and radiometry constants."""

    bands: tuple[Band, ...]
    scl_asset_keys: dict[str, str]
    scl_gsd: int
    scl_groups: dict[str, tuple[int, ...]]
    scale: float
    nodata: int
    offset_baseline: str
    offset_dn: int

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]

    def asset_key_candidates(self, band: str) -> list[str]:
        """All provider asset keys that may hold `band` (a band name or "SCL")."""
        if band == "SCL":
            return list(dict.fromkeys(self.scl_asset_keys.values()))
        b = next(b for b in self.bands if b.name == band)
        return list(dict.fromkeys(b.asset_keys.values()))


@dataclass(frozen=True)
class Source:
    """A named STAC source from `catalogs/sources.yaml`."""

    name: str
    url: str | None  # STAC API root, or None for a static catalog shipped in catalogs/
    path: Path | None  # static catalog.json (sample)
    collection: str
    asset_convention: str
    sign: str
    gdal_env: dict[str, str]
    token_url: str | None = None  # SAS token endpoint for sign: planetary_computer


@functools.cache
def sensor() -> SensorTable:
    """Load `catalogs/sentinel2.yaml` (cached)."""
    raw = yaml.safe_load((CATALOG_DIR / "sentinel2.yaml").read_text())
    bands = tuple(
        Band(
            name=b["name"],
            common_name=b["common_name"],
            center_wavelength=float(b["center_wavelength"]),
            gsd=int(b["gsd"]),
            asset_keys=dict(b["asset_keys"]),
        )
        for b in raw["bands"]
    )
    scl = raw["scl"]
    rad = raw["radiometry"]
    return SensorTable(
        bands=bands,
        scl_asset_keys=dict(scl["asset_keys"]),
        scl_gsd=int(scl["gsd"]),
        scl_groups={k: tuple(int(c) for c in v) for k, v in scl["groups"].items()},
        scale=float(rad["scale"]),
        nodata=int(rad["nodata"]),
        offset_baseline=str(rad["offset_baseline"]),
        offset_dn=int(rad["offset_dn"]),
    )


@functools.cache
def _sources_raw() -> dict[str, Any]:
    return yaml.safe_load((CATALOG_DIR / "sources.yaml").read_text())


def source_names() -> list[str]:
    return sorted(_sources_raw()["sources"])


def default_live_source() -> str:
    return str(_sources_raw()["default_live"])


def get_source(name: str) -> Source:
    """Look up a named source; raise `CatalogError` listing the known names."""
    raw = _sources_raw()["sources"]
    if name not in raw:
        raise CatalogError(
            f"unknown catalog {name!r}: use one of {', '.join(sorted(raw))}, "
            "a STAC API URL, or a path to a static catalog.json/collection.json"
        )
    s = raw[name]
    return Source(
        name=name,
        url=s.get("url"),
        path=(CATALOG_DIR / s["path"]) if s.get("path") else None,
        collection=s["collection"],
        asset_convention=s["asset_convention"],
        sign=s.get("sign", "none"),
        gdal_env={k: str(v) for k, v in (s.get("gdal_env") or {}).items()},
        token_url=s.get("token_url"),
    )


def aoi_names() -> list[str]:
    return sorted(p.stem for p in (CATALOG_DIR / "aois").glob("*.geojson"))


def load_aoi(name: str) -> dict[str, Any]:
    """Return the GeoJSON geometry (lon/lat) of a named AOI from `catalogs/aois/`.

    Names are plain identifiers: anything with a path separator or a dot is rejected, so
    an AOI name can never read a file outside `catalogs/aois/`.
    """
    if not _AOI_NAME.match(name):
        raise ConfigError(f"invalid AOI name {name!r}: use letters, digits, '-' or '_' (known: {', '.join(aoi_names())})")
    path = CATALOG_DIR / "aois" / f"{name}.geojson"
    if not path.is_file():
        raise ConfigError(f"unknown AOI {name!r}: known AOIs are {', '.join(aoi_names())}; or pass --bbox W,S,E,N")
    gj = json.loads(path.read_text())
    if gj.get("type") == "FeatureCollection":
        geoms = [f["geometry"] for f in gj["features"]]
        if len(geoms) == 1:
            return geoms[0]
        return {"type": "GeometryCollection", "geometries": geoms}
    if gj.get("type") == "Feature":
        return gj["geometry"]
    return gj
