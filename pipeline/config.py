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
import reprlib
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
    force: bool = False  # write into a non-empty folder that holds no dataset of ours

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_cloud", float(self.max_cloud))
        if self.bbox is not None:
            _check_bbox(self.bbox)
        elif not self.aoi:
            raise ConfigError("give an AOI (--aoi NAME) or a bounding box (--bbox W,S,E,N)")
        s = _parse_date(self.start, "start") if self.start else None
        e = _parse_date(self.end, "end") if self.end else None
        if s and e and s > e:
            raise ConfigError(f"--start {show_value(self.start)} is after --end {show_value(self.end)}")
        if not 0 <= self.max_cloud <= 100:
            raise ConfigError(f"max_cloud={self.max_cloud}: must be a percentage in [0, 100]")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError("max_items must be >= 1 (or absent: no cap)")
        for k, v in self.resampling.items():
            if k not in ("20m", "60m"):
                raise ConfigError(f"resampling key {show_value(k)}: use '20m' and '60m'")
            if v not in ("nearest", "bilinear", "cubic", "average"):
                raise ConfigError(f"resampling.{k}={show_value(v)}: use nearest, bilinear, cubic or average")
        if self.small_scene not in ("resize", "pad", "skip"):
            raise ConfigError(f"small_scene={show_value(self.small_scene)}: use resize, pad or skip")
        if not self.tiling:
            raise ConfigError("tiling: at least one chip size is needed")
        names = [t.name for t in self.tiling]
        if len(set(names)) != len(names):
            raise ConfigError(f"tiling: duplicate datasets {show_value(names)}")
        if self.sign not in (None, "none", "planetary_computer"):
            raise ConfigError(f"sign={show_value(self.sign)}: use none or planetary_computer")
        if self.sign == "planetary_computer" and not self.token_url:
            raise ConfigError("sign: planetary_computer needs token_url")
        if self.retries < 0:
            raise ConfigError("retries must be >= 0")
        if self.cube_chunk < 64:
            raise ConfigError("cube_chunk must be >= 64")
        if not isinstance(self.pack_pixels, int) or self.pack_pixels < 1:
            raise ConfigError(f"pack_pixels={show_value(self.pack_pixels)}: must be a positive number of pixel-dates")
        _check_workers(self.workers)
        if self.scheduler is not None:
            check_scheduler_address(self.scheduler)

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


_RUN_KEYS = ("retries", "retry_backoff_s", "fail_fast", "sign", "token_url", "dashboard", "force")  # how, not what is built
_SEARCH_KEYS = ("aoi", "bbox", "catalog", "collection", "start", "end", "max_cloud", "max_items")


# Error messages quote what the user wrote, but never all of it: a value from a config file
# can be megabytes long (or, without the alias ban below, a "billion laughs" expansion), and
# an error is one line.
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxset = 2, 6, 6, 6, 6
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 60, 60, 40


def show_value(value: Any, limit: int = 100) -> str:
    """`repr(value)` for an error message: bounded in size whatever the value (reprlib caps
    depth, items and string length before anything is built), on one line."""
    text = _SHOW.repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_date(s: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(s))
    except ValueError:
        raise ConfigError(f"--{what} {show_value(s)}: use an ISO date like 2018-05-31") from None


def _check_bbox(b: tuple[float, ...]) -> None:
    if len(b) != 4:
        raise ConfigError(f"bbox {show_value(list(b))}: needs 4 numbers W,S,E,N")
    w, s, e, n = b
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise ConfigError(f"bbox {list(b)}: longitudes must be in [-180, 180] and latitudes in [-90, 90]")
    if w >= e or s >= n:
        raise ConfigError(f"bbox {list(b)}: needs W < E and S < N")


def _check_workers(workers: Any) -> None:
    """`workers` is a thread count: a positive int or None (all cores). A zero or negative
    count used to reach the thread pools and fail every scene 30 s later."""
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {show_value(workers)}: must be a whole number >= 1 (or absent: all cores)")


# The address forms distributed's Client accepts for a running scheduler (comm schemes
# tcp, tls, ucx, ws, wss and inproc; a bare HOST:PORT means tcp). Checked here, as part of
# the config, so a typo is refused before the catalog is searched or anything is written.
_SCHEDULER_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
_SCHEDULER_URL = re.compile(rf"(?:(?P<scheme>tcp|tls|ucx|ws|wss)://)?(?P<host>{_SCHEDULER_HOST})(?::(?P<port>[0-9]{{1,5}}))?/?")
_INPROC = re.compile(r"inproc://[^\s/]+(?:/[^\s]*)?")


def check_scheduler_address(address: Any) -> None:
    """Refuse anything that is not a Dask scheduler address: `tcp://HOST:PORT`, `tls://`,
    `ucx://`, `ws://`, `wss://` (port optional), `inproc://...`, or a bare `HOST:PORT`."""
    why = "use tcp://HOST:PORT (or tls://, ucx://, ws://, wss://, inproc://, or HOST:PORT)"
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"--scheduler {show_value(address)}: not a Dask scheduler address; {why}")
    if _INPROC.fullmatch(address):
        return
    m = _SCHEDULER_URL.fullmatch(address)
    if m is None or (m["scheme"] is None and m["port"] is None):
        raise ConfigError(f"--scheduler {show_value(address)}: not a Dask scheduler address; {why}")
    if m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
        raise ConfigError(f"--scheduler {show_value(address)}: port {m['port']} is not in 1-65535")


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """Parse `W,S,E,N` (degrees) and validate it."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--bbox {show_value(text)}: use four numbers W,S,E,N, e.g. -10.7,51.3,-5.9,55.4") from None
    _check_bbox(vals)
    return vals  # type: ignore[return-value]


_NESTED = {"quality": QualityConfig, "split": SplitConfig, "shards": ShardConfig}


def build_config(raw: dict[str, Any]) -> BuildConfig:
    """Make a `BuildConfig` from a plain dict (YAML), refusing unknown keys."""
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys need not be strings (`1: x`)
    if unknown:
        raise ConfigError(f"unknown config key(s) {_show_keys(unknown)}; known keys: {', '.join(sorted(known))}")
    try:
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            if k in _NESTED and v is not None:
                cls = _NESTED[k]
                if not isinstance(v, dict):
                    raise ConfigError(f"{k}: expected a mapping, got {show_value(v)}")
                sub = {f.name for f in dataclasses.fields(cls)}
                bad = sorted(set(v) - sub, key=str)
                if bad:
                    raise ConfigError(f"unknown config key(s) {_show_keys(bad, f'{k}.')}; known: {', '.join(sorted(sub))}")
                kw[k] = cls(**v)
            elif k == "tiling" and v is not None:
                if not isinstance(v, list):
                    raise ConfigError(f"tiling: expected a list of sizes or mappings, got {show_value(v)}")
                specs = []
                for t in v:
                    if isinstance(t, int):
                        t = {"size": t}
                    if not isinstance(t, dict):
                        raise ConfigError("tiling: each entry is a size or a mapping {size, gsd, time_steps, overlap}")
                    bad = sorted(set(t) - {"size", "gsd", "time_steps", "overlap"}, key=str)
                    if bad:
                        raise ConfigError(f"unknown config key(s) {_show_keys(bad, 'tiling.')}")
                    specs.append(TilingSpec(**t))
                kw[k] = tuple(specs)
            elif k == "bbox" and v is not None:
                kw[k] = parse_bbox(v) if isinstance(v, str) else tuple(float(x) for x in v)
            elif k in ("start", "end") and v is not None:
                kw[k] = str(v)  # YAML parses dates into datetime.date
            else:
                kw[k] = v
        return BuildConfig(**kw)
    except (TypeError, ValueError, OverflowError) as e:  # wrong value types from YAML: `float("abc")`, `"x" < 1`
        raise ConfigError(f"invalid config: {_one_line(e)}") from None


def _show_keys(keys: list[Any], prefix: str = "", most: int = 10) -> str:
    """Unknown keys for a message: the first few, each capped (a file may hold thousands)."""
    shown = [prefix + (k if isinstance(k, str) and len(k) <= 60 else show_value(k, 60)) for k in keys[:most]]
    return ", ".join(shown) + (f" (and {len(keys) - most} more)" if len(keys) > most else "")


def _one_line(e: object, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Example configs shipped in the package (`--config europe_live` finds pipeline/configs/europe_live.yaml).
SHIPPED_CONFIGS = package_folder("pipeline", "configs")


#: Config files larger than this are refused before parsing (the shipped ones are under 2 KiB).
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of mappings/lists a config may have (the configs use 3).
MAX_CONFIG_DEPTH = 32


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`) and deep nesting while composing.

    PyYAML builds an alias as a reference to the anchored object, so nine nested levels of
    nine aliases ("billion laughs") parse in milliseconds into 9**9 references, and then
    blow up whatever walks the value: an error message's repr, json.dumps for the config
    hash. Configs need no aliases, so they are refused where they appear, before any value
    is built. Deep nesting is refused too: the composer recurses per level.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a config file: write the value out",
                self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_config_yaml(text: str) -> Any:
    """Parse one YAML document of a config safely (no aliases, bounded nesting, safe tags).

    Raises:
        ValueError: with a one-line reason (and the line and column) when the text is not
            acceptable YAML; the callers wrap it into their own ConfigError.
    """
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = ", ".join(t for t in (e.context, e.problem) if t) or str(e)
        raise ValueError(f"{_one_line(what, 150)}{where}") from None
    except yaml.YAMLError as e:
        raise ValueError(_one_line(e, 150)) from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise ValueError(_one_line(e, 150)) from None
    finally:
        loader.dispose()


def read_config_yaml(path: Path) -> Any:
    """Read and parse a YAML config file (see `parse_config_yaml`); the size is checked first.

    Raises:
        ValueError: one line: too large, not UTF-8, or not acceptable YAML.
    """
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{size} bytes; a config file holds at most {MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_config_yaml(text)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Defaults <- YAML file at `path` (or a shipped config of that name) <- `overrides`
    (None values are ignored)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = find_config(path, SHIPPED_CONFIGS)
        if not p.is_file():
            raise ConfigError(f"config file {show_value(str(path))} not found (shipped configs: {shipped_names(SHIPPED_CONFIGS)})")
        try:
            loaded = read_config_yaml(p) or {}
        except ValueError as e:
            raise ConfigError(f"config file {show_value(str(p), 200)} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {show_value(str(p), 200)}: expected a mapping of keys to values")
        raw.update(loaded)
    for k, v in (overrides or {}).items():
        if v is not None:
            raw[k] = v
    if raw.get("bbox") is not None and "aoi" not in (overrides or {}):
        raw.setdefault("aoi", None)
    return build_config(raw)
