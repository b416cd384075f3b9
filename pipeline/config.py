"""Typed, frozen build configuration: defaults <- YAML file <- command-line overrides.

Every command-line option of `build_shards` is also a key here, so a run is fully
described by one YAML file. Unknown keys are refused (a typo must not silently fall back
to a default). The resolved config is stored in `manifest.json` with its hash.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from spectralgpt.shipped import find_config, package_folder, shipped_names

Resampling = Literal["nearest", "bilinear", "cubic", "average"]
SmallSceneRule = Literal["resize", "pad", "skip"]


@dataclass(frozen=True)
class TilingSpec:
    """One output dataset: chips of `size` px at `gsd` metres, stacks of `time_steps` dates."""

    size: int
    gsd: float = 10.0
    time_steps: int = 1  # T > 1 makes [T, C, H, W] samples of T consecutive dates, ascending
    overlap: int = 0  # pixels shared by neighbouring chips (stride = size - overlap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gsd", float(self.gsd))  # 10 and 10.0 are the same dataset (and hash)
        if self.size < 8 or self.size % 8:
            raise ConfigError(f"tiling size {self.size}: must be a positive multiple of 8 (the model's patch size)")
        if self.gsd < 10 or (self.gsd / 10) != int(self.gsd / 10):
            raise ConfigError(f"tiling gsd {self.gsd}: must be 10 m or an integer multiple of it")
        if self.time_steps < 1:
            raise ConfigError(f"tiling time_steps {self.time_steps}: must be >= 1")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"tiling overlap {self.overlap}: must be in [0, size)")

    @property
    def name(self) -> str:
        """Dataset name used for folders, keys and the manifest, e.g. `s96_g10m`, `s128_g20m_t4`."""
        n = f"s{self.size}_g{int(self.gsd)}m"
        if self.time_steps > 1:
            n += f"_t{self.time_steps}"
        if self.overlap:
            n += f"_o{self.overlap}"
        return n

    @property
    def factor(self) -> int:
        """Cube pixels (10 m) per output pixel."""
        return int(self.gsd // 10)


@dataclass(frozen=True)
class QualityConfig:
    """Per-chip thresholds on fractions in [0, 1]; a chip above any threshold is dropped.

    invalid = nodata in any band or SCL 0/1; cloud = SCL 3, 8, 9, 10; snow = SCL 11.
    Fractions are always stored in each sample's metadata, so training can filter harder.
    """

    max_invalid: float = 0.05
    max_cloud: float = 0.3
    max_snow: float = 1.0

    def __post_init__(self) -> None:
        for k, v in dataclasses.asdict(self).items():
            object.__setattr__(self, k, float(v))
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"quality.{k}={v}: must be a fraction in [0, 1]")


@dataclass(frozen=True)
class SplitConfig:
    """Spatial train/val split: whole blocks of `block_m` metres go to one split.

    Chips whose footprint touches blocks of both splits are dropped, so no val pixel is
    ever inside (or overlapping) a train chip.
    """

    val_fraction: float = 0.2
    block_m: float = 10_000.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "val_fraction", float(self.val_fraction))
        object.__setattr__(self, "block_m", float(self.block_m))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"split.val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.block_m <= 0:
            raise ConfigError(f"split.block_m={self.block_m}: must be > 0")


@dataclass(frozen=True)
class ShardConfig:
    """Shard size caps: a shard is closed at whichever limit is hit first."""

    max_bytes: int = 512 * 1024 * 1024  # DESIGN.md: ~0.5-1 GB shards by default
    max_samples: int = 10_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 or self.max_samples < 1:
            raise ConfigError("shards.max_bytes must be >= 1024 and shards.max_samples >= 1")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `build_shards` needs. See `configs/` examples and README for each key."""

    aoi: str | None = "europe"  # named AOI in catalogs/aois/, ignored when bbox is set
    bbox: tuple[float, float, float, float] | None = None  # W, S, E, N in degrees
    catalog: str | None = None  # None = embedded sample; else a name in sources.yaml, a URL or a path
    collection: str | None = None  # None = the source's L2A collection
    start: str | None = None  # ISO date, inclusive
    end: str | None = None  # ISO date, inclusive
    max_cloud: float = 30.0  # eo:cloud_cover percent, scene level
    max_items: int | None = None  # an explicit cap on the items searched; None: every page
    output: str | None = None  # None = datasets/<aoi> (or datasets/bbox_<hash>)
    resampling: dict[str, str] = field(default_factory=lambda: {"20m": "bilinear", "60m": "bilinear"})
    cube_chunk: int = 1024  # zarr chunk edge (px) of the analysis-ready cube
    tiling: tuple[TilingSpec, ...] = (TilingSpec(96), TilingSpec(128))  # SpectralGPT stage 1 and 2
    small_scene: SmallSceneRule = "resize"  # scene smaller than a chip: SpectralGPT resized 120 -> 128 px
    quality: QualityConfig = QualityConfig()
    split: SplitConfig = SplitConfig()
    shards: ShardConfig = ShardConfig()
    sign: str | None = None  # href signing for URL/path catalogs: none | planetary_computer (named sources set their own)
    token_url: str | None = None  # SAS token endpoint used with sign: planetary_computer
    retries: int = 3  # per grid, after GDAL's own HTTP retries; backoff 1 s, 2 s, 4 s ...
    retry_backoff_s: float = 1.0
    fail_fast: bool = False  # True: the first scene that keeps failing stops the run (exit 5)
    # small grids are packed into one unit of work (one task, one set of shards) up to this
    # many pixel-dates; default one full MGRS tile-date (10980 x 10980)
    pack_pixels: int = 10980 * 10980
    workers: int | None = None  # threads of the local build (each unit's own work); None = all cores
    scheduler: str | None = None  # address of an existing Dask scheduler; None = a LocalCluster on 127.0.0.1
    dashboard: bool = False  # the LocalCluster's dashboard on 127.0.0.1 (its URL is logged); off by default

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_cloud", float(self.max_cloud))
        if self.bbox is not None:
            _check_bbox(self.bbox)
        elif not self.aoi:
            raise ConfigError("give an AOI (--aoi NAME) or a bounding box (--bbox W,S,E,N)")
        s = _parse_date(self.start, "start") if self.start else None
        e = _parse_date(self.end, "end") if self.end else None
        if s and e and s > e:
            raise ConfigError(f"--start {self.start} is after --end {self.end}")
        if not 0 <= self.max_cloud <= 100:
            raise ConfigError(f"max_cloud={self.max_cloud}: must be a percentage in [0, 100]")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError("max_items must be >= 1 (or absent: no cap)")
        for k, v in self.resampling.items():
            if k not in ("20m", "60m"):
                raise ConfigError(f"resampling key {k!r}: use '20m' and '60m'")
            if v not in ("nearest", "bilinear", "cubic", "average"):
                raise ConfigError(f"resampling.{k}={v!r}: use nearest, bilinear, cubic or average")
        if self.small_scene not in ("resize", "pad", "skip"):
            raise ConfigError(f"small_scene={self.small_scene!r}: use resize, pad or skip")
        if not self.tiling:
            raise ConfigError("tiling: at least one chip size is needed")
        names = [t.name for t in self.tiling]
        if len(set(names)) != len(names):
            raise ConfigError(f"tiling: duplicate datasets {names}")
        if self.sign not in (None, "none", "planetary_computer"):
            raise ConfigError(f"sign={self.sign!r}: use none or planetary_computer")
        if self.sign == "planetary_computer" and not self.token_url:
            raise ConfigError("sign: planetary_computer needs token_url")
        if self.retries < 0:
            raise ConfigError("retries must be >= 0")
        if self.cube_chunk < 64:
            raise ConfigError("cube_chunk must be >= 64")
        if not isinstance(self.pack_pixels, int) or self.pack_pixels < 1:
            raise ConfigError(f"pack_pixels={self.pack_pixels!r}: must be a positive number of pixel-dates")

    # -- derived -------------------------------------------------------------------
    @property
    def resampling_full(self) -> dict[str, str]:
        return {"20m": "bilinear", "60m": "bilinear", **self.resampling}

    def default_output(self) -> Path:
        if self.bbox is not None:
            h = hashlib.sha256(json.dumps(list(self.bbox)).encode()).hexdigest()[:8]
            return Path("datasets") / f"bbox_{h}"
        return Path("datasets") / str(self.aoi)

    @property
    def output_path(self) -> Path:
        return Path(self.output) if self.output else self.default_output()

    @property
    def output_target(self) -> str:
        """The output as given: a local path or an fsspec URL (`s3://...` must not become a Path)."""
        return str(self.output) if self.output else str(self.default_output())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bbox"] = list(self.bbox) if self.bbox else None
        d["tiling"] = [dataclasses.asdict(t) for t in self.tiling]
        return d

    def recorded_catalog(self) -> str | None:
        """`catalog` as shareable outputs (manifest, sample JSON) record it: a local catalog
        file relative to the dataset folder (its name alone for a remote dataset), so no
        user's folder layout leaks into a dataset and a moved dataset + catalog still refresh."""
        if not is_catalog_file(self.catalog):
            return self.catalog
        assert self.catalog is not None
        target = self.output_target
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", target):
            return Path(self.catalog).name
        return Path(os.path.relpath(Path(self.catalog).resolve(), Path(target).resolve())).as_posix()

    def recorded(self) -> dict[str, Any]:
        """The config as `manifest.json` records it: no output location (the manifest is in
        it) and a local catalog file relative to the dataset (see `recorded_catalog`)."""
        d = self.to_dict()
        d.pop("output")
        d["catalog"] = self.recorded_catalog()
        return d

    def hash(self) -> str:
        """sha256 of the canonical JSON of everything that changes the dataset's content.

        `output`, `workers` and `scheduler` change where and how fast, not what; nor does
        where a static catalog file lies (the scene set has its own hash, `scenes_hash`).
        """
        d = self.recorded()
        if is_catalog_file(self.catalog):
            d["catalog"] = "static-file"
        for k in ("workers", "scheduler", *_RUN_KEYS):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def layout_hash(self) -> str:
        """Hash of what shapes samples (tiling, quality, split, shards, resampling), not of
        what is searched: a refresh may search another date range, never re-tile."""
        d = self.recorded()
        for k in ("workers", "scheduler", *_RUN_KEYS, *_SEARCH_KEYS):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def is_catalog_file(catalog: str | None) -> bool:
    """True when `catalog` names a local static catalog file (not a source name or a URL)."""
    if catalog is None or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", catalog):
        return False
    return catalog.endswith(".json") or Path(catalog).exists()


_RUN_KEYS = ("retries", "retry_backoff_s", "fail_fast", "sign", "token_url", "dashboard")  # how, not what is built
_SEARCH_KEYS = ("aoi", "bbox", "catalog", "collection", "start", "end", "max_cloud", "max_items")


def _parse_date(s: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(s))
    except ValueError:
        raise ConfigError(f"--{what} {s!r}: use an ISO date like 2018-05-31") from None


def _check_bbox(b: tuple[float, ...]) -> None:
    if len(b) != 4:
        raise ConfigError(f"bbox {list(b)}: needs 4 numbers W,S,E,N")
    w, s, e, n = b
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise ConfigError(f"bbox {list(b)}: longitudes must be in [-180, 180] and latitudes in [-90, 90]")
    if w >= e or s >= n:
        raise ConfigError(f"bbox {list(b)}: needs W < E and S < N")


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """Parse `W,S,E,N` (degrees) and validate it."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--bbox {text!r}: use four numbers W,S,E,N, e.g. -10.7,51.3,-5.9,55.4") from None
    _check_bbox(vals)
    return vals  # type: ignore[return-value]


_NESTED = {"quality": QualityConfig, "split": SplitConfig, "shards": ShardConfig}


def build_config(raw: dict[str, Any]) -> BuildConfig:
    """Make a `BuildConfig` from a plain dict (YAML), refusing unknown keys."""
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _NESTED and v is not None:
            cls = _NESTED[k]
            if not isinstance(v, dict):
                raise ConfigError(f"{k}: expected a mapping")
            sub = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(v) - sub)
            if bad:
                raise ConfigError(f"unknown config key(s) {', '.join(f'{k}.{b}' for b in bad)}; known: {', '.join(sorted(sub))}")
            kw[k] = cls(**v)
        elif k == "tiling" and v is not None:
            specs = []
            for t in v:
                if isinstance(t, int):
                    t = {"size": t}
                if not isinstance(t, dict):
                    raise ConfigError("tiling: each entry is a size or a mapping {size, gsd, time_steps, overlap}")
                bad = sorted(set(t) - {"size", "gsd", "time_steps", "overlap"})
                if bad:
                    raise ConfigError(f"unknown config key(s) tiling.{', tiling.'.join(bad)}")
                specs.append(TilingSpec(**t))
            kw[k] = tuple(specs)
        elif k == "bbox" and v is not None:
            kw[k] = parse_bbox(v) if isinstance(v, str) else tuple(float(x) for x in v)
        elif k in ("start", "end") and v is not None:
            kw[k] = str(v)  # YAML parses dates into datetime.date
        else:
            kw[k] = v
    try:
        return BuildConfig(**kw)
    except TypeError as e:  # wrong value types from YAML
        raise ConfigError(f"invalid config: {e}") from None


#: Example configs shipped in the package (`--config europe_live` finds pipeline/configs/europe_live.yaml).
SHIPPED_CONFIGS = package_folder("pipeline", "configs")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Defaults <- YAML file at `path` (or a shipped config of that name) <- `overrides`
    (None values are ignored)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = find_config(path, SHIPPED_CONFIGS)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (shipped configs: {shipped_names(SHIPPED_CONFIGS)})")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of keys to values")
        raw.update(loaded)
    for k, v in (overrides or {}).items():
        if v is not None:
            raw[k] = v
    if raw.get("bbox") is not None and "aoi" not in (overrides or {}):
        raw.setdefault("aoi", None)
    return build_config(raw)
