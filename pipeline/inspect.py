"""`python -m pipeline.inspect DATASET`: a static HTML report to judge a shard dataset by eye.

Examples:
    python -m pipeline.inspect datasets/europe                 # -> datasets/europe/report/index.html
    python -m pipeline.inspect datasets/europe/manifest.json --out /tmp/europe-report --per-split 12
    python -m pipeline.inspect datasets/europe --png           # -> datasets/europe/report/contact_sheet.png only
    python -m pipeline.inspect datasets/europe --version v2    # -> the manifest in datasets/europe/v2/

The report (one `index.html` plus PNGs, no scripts, no network references) shows:

- a contact sheet of random chips per dataset (chip size) and split, in true colour
  (B04, B03, B02) and false colour (B08, B04, B03), reflectance = value x value_scale
  stretched linearly between the dataset's stored train percentiles p2 and p98 (one range per
  composite, so colours keep their balance), or the chip's own 2-98 % when the dataset has
  no stored statistics; nodata (0 in any of the three bands) is black. Time stacks
  ([T, C, H, W]) show their first date; every date still counts in the histograms;
- per-band histograms of sampled pixel reflectances with the stored mean, std and
  percentiles marked, and a table of the stored statistics in reflectance units;
- a map of chip footprints (`bbox_lonlat` rectangles plus centre points, colour = split)
  over the AOI outline from `catalogs/aois/<config.aoi>.geojson` or `config.bbox`, with
  one zoomed panel per MGRS tile so 1 km chips stay visible;
- distributions of the per-chip quality fractions (null = "unknown (no SCL)");
- scenes used and rejected with reasons, chips dropped per reason, and the manifest summary.

Chips are read by streaming every shard once, in manifest order, with `tarfile`; `.npy`
members are decoded with `allow_pickle=False`. The chips shown are a reservoir sample of
`--per-split` chips per (dataset, split), seeded by `--seed`, so the same command gives the
same page. Pixel histograms use every chip with a stride of 2 pixels in each direction.

Manifests and sample JSON are written by others (another tool, another version, a hand
edit): every field the report computes with is type-checked first (`check_manifest`,
`check_sample_meta`) and a wrong one is a one-line error naming the file and the key; every
value that reaches the page is HTML-escaped, numbers included.

Exit codes: 0 written, 2 bad input (missing directory or manifest, wrong format id, missing
or unreadable shard, a field of the wrong type, output in the way); nothing is written then.
1 means a bug.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import sys
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.config import show_value
from pipeline.contract import READABLE_FORMATS
from pipeline.errors import PipelineError
from pipeline.names import UnsafeName, confined

log = logging.getLogger(__name__)

BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
TRUE_COLOUR = ("B04", "B03", "B02")
FALSE_COLOUR = ("B08", "B04", "B03")  # NIR-red-green: vegetation shows red
QUALITY_KEYS = ("nodata", "invalid", "cloud", "shadow", "cirrus", "snow")
SHEET_NAME = "contact_sheet.png"
HIST_SHIFT = 4  # pixel histograms bin DN >> 4: 16 DN = 0.0016 reflectance per bin
HIST_BINS = 65536 >> HIST_SHIFT
PIXEL_STRIDE = 2  # every 2nd row and column of every chip feeds the histograms
SPLIT_ORDER = ("train", "val", "test")


class ReportError(PipelineError):
    """The dataset cannot be reported on (missing, wrong format, unreadable shard, bad output)."""


# -- input ------------------------------------------------------------------------------


def resolve_manifest(dataset: Path, version: str | None = None) -> Path:
    """The manifest.json for a dataset directory, a manifest path, or one version of a dataset.

    A version is a sub-directory with its own manifest: `DATASET/<version>/` or
    `DATASET/versions/<version>/`.

    Raises:
        ReportError: nothing usable at that path.
    """
    dataset = Path(dataset)
    if not dataset.exists():
        raise ReportError(f"DATASET {str(dataset)!r} does not exist: pass a dataset directory holding manifest.json")
    if version is not None:
        base = dataset.parent if dataset.is_file() else dataset
        for cand in (base / version, base / "versions" / version):
            if (cand / "manifest.json").is_file():
                return cand / "manifest.json"
        known = ", ".join(_versions(base)) or "none"
        raise ReportError(f"--version {version!r}: no {base}/{version}/manifest.json (versions found: {known})")
    if dataset.is_file():
        return dataset
    if (dataset / "manifest.json").is_file():
        return dataset / "manifest.json"
    versions = _versions(dataset)
    if versions:
        raise ReportError(f"{dataset} holds versions {', '.join(versions)}: pick one with --version")
    raise ReportError(f"{dataset} has no manifest.json: is it a finished `python -m pipeline.build_shards` output?")


def _versions(base: Path) -> list[str]:
    found = [p.parent.name for p in sorted(base.glob("*/manifest.json"))]
    found += [p.parent.name for p in sorted(base.glob("versions/*/manifest.json"))]
    return found


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and check a manifest: JSON object, a readable format id (`pipeline.contract`), datasets with splits.

    Raises:
        ReportError: unreadable, another format, or structurally broken.
    """
    try:
        man = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an int of > 4300 digits
        raise ReportError(f"{path}: not a readable JSON manifest ({_one_line(e)})") from None
    if not isinstance(man, dict):
        raise ReportError(f"{path}: not a dataset manifest (expected a JSON object)")
    if man.get("format") not in READABLE_FORMATS:
        raise ReportError(f"{path}: format {str(man.get('format'))[:60]!r} is not one this tool reads "
                          f"({', '.join(READABLE_FORMATS)})")
    datasets = man.get("datasets")
    if not isinstance(datasets, dict) or not all(
        isinstance(d, dict) and isinstance(d.get("splits"), dict) for d in datasets.values()
    ):
        raise ReportError(f"{path}: 'datasets' must map each dataset name to an object with 'splits'")
    check_manifest(man, str(path))
    return man


# -- input checks: values written by others -------------------------------------------------


def _one_line(e: object, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(v: Any) -> bool:
    """A finite JSON number (not a bool, which is an int in Python)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _name(key: Any, limit: int = 60) -> str:
    """A key of the manifest as a message names it: as written when short, capped otherwise."""
    return key if isinstance(key, str) and len(key) <= limit else show_value(key, limit)


def _wrong(where: str, value: Any, expected: str) -> ReportError:
    return ReportError(f"{where} is {show_value(value, 60)} ({type(value).__name__}), expected {expected}")


def _expect(ok: bool, where: str, value: Any, expected: str) -> None:
    if not ok:
        raise _wrong(where, value, expected)


def check_manifest(man: dict[str, Any], where: str = "manifest.json") -> None:
    """Check the type of every manifest field the report computes with (sums, scales, plots).

    Fields that are only shown (ids, dates, hashes, counts in the scenes table) may hold
    anything: they are escaped on the page. A manifest is another program's output, so a
    wrong type is the user's input problem, reported in one line, not a traceback.

    Raises:
        ReportError: names the key, the value (capped) and what was expected.
    """
    bands = man.get("bands")
    if bands is not None:
        _expect(isinstance(bands, list) and bool(bands) and all(isinstance(b, str) for b in bands),
                f"{where}: bands", bands, "a list of band names")
        missing = sorted({*TRUE_COLOUR, *FALSE_COLOUR} - set(bands))
        if missing:
            raise ReportError(f"{where}: bands lack {', '.join(missing)}, needed for the colour composites")
    n_bands = len(bands or BANDS)
    scale = man.get("value_scale")
    _expect(scale is None or (_is_number(scale) and 0 < scale <= 1), f"{where}: value_scale", scale,
            "a number in (0, 1] (reflectance per stored value)")
    nodata = man.get("nodata")
    _expect(nodata is None or (isinstance(nodata, int) and not isinstance(nodata, bool)), f"{where}: nodata", nodata,
            "an integer")
    for key in ("config", "source", "summary", "scenes"):
        _expect(man.get(key) is None or isinstance(man.get(key), dict), f"{where}: {key}", man.get(key), "an object")
    bbox = (man.get("config") or {}).get("bbox")
    _expect(bbox is None or (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)),
            f"{where}: config.bbox", bbox, "4 numbers W, S, E, N")
    rejected = (man.get("scenes") or {}).get("rejected")
    _expect(rejected is None or (isinstance(rejected, dict) and all(_is_count(v) for v in rejected.values())),
            f"{where}: scenes.rejected", rejected, "an object of reason: count")
    items = man.get("items")
    _expect(items is None or (isinstance(items, list) and all(isinstance(i, dict) for i in items)),
            f"{where}: items", items, "a list of objects")
    for ds, d in man["datasets"].items():
        at = f"{where}: datasets.{_name(ds)}"
        for key in ("chip_size", "gsd"):
            _expect(d.get(key) is None or (_is_number(d[key]) and d[key] > 0), f"{at}.{key}", d.get(key), "a positive number")
        ts = d.get("time_steps")
        _expect(ts is None or (_is_count(ts) and ts >= 1), f"{at}.time_steps", ts, "a whole number >= 1")
        dropped = d.get("dropped")
        _expect(dropped is None or (isinstance(dropped, dict) and all(_is_count(v) for v in dropped.values())),
                f"{at}.dropped", dropped, "an object of reason: count")
        _check_stats(d.get("stats"), f"{at}.stats", n_bands)
        for split, sp in d["splits"].items():
            sw = f"{at}.splits.{_name(split, 40)}"
            _expect(isinstance(sp, dict), sw, sp, "an object")
            _expect(sp.get("num_samples") is None or _is_count(sp["num_samples"]), f"{sw}.num_samples",
                    sp.get("num_samples"), "a whole number >= 0")
            shards = sp.get("shards", [])
            _expect(isinstance(shards, list), f"{sw}.shards", shards, "a list")
            for i, sh in enumerate(shards):
                _expect(isinstance(sh, dict), f"{sw}.shards.{i}", sh, "an object")
                _expect(isinstance(sh.get("path"), str) and bool(sh["path"]), f"{sw}.shards.{i}.path", sh.get("path"),
                        "a file name")
                _expect(sh.get("bytes") is None or _is_count(sh["bytes"]), f"{sw}.shards.{i}.bytes", sh.get("bytes"),
                        "a whole number >= 0")


def _check_stats(stats: Any, where: str, n_bands: int) -> None:
    """Stored statistics are plotted: per-band lists of numbers, one per band, in stored
    units (uint16 DN: 0..65535; the histogram axes are sized from them)."""
    if stats is None:
        return
    _expect(isinstance(stats, dict), where, stats, "an object")

    def per_band(v: Any, at: str, top: float = 65535) -> None:
        _expect(isinstance(v, list) and len(v) == n_bands and all(_is_number(x) and 0 <= x <= top for x in v), at, v,
                f"a list of {n_bands} numbers in [0, {top:g}] (one per band)")

    for key in ("count", "mean", "std", "min", "max"):
        if stats.get(key) is not None:
            per_band(stats[key], f"{where}.{key}", math.inf if key == "count" else 65535)
    if stats.get("mean") is not None and stats.get("std") is None:
        raise ReportError(f"{where}: has mean but no std")
    pct = stats.get("percentiles")
    if pct is not None:
        _expect(isinstance(pct, dict), f"{where}.percentiles", pct, "an object of pNN: list")
        for k, v in pct.items():
            per_band(v, f"{where}.percentiles.{_name(k, 30)}")


def check_sample_meta(meta: Any, where: str) -> dict[str, Any]:
    """Check the fields of a sample's JSON that the report computes with; return it.

    Raises:
        ReportError: one line naming the sample, the key and the value (capped).
    """
    _expect(isinstance(meta, dict), f"{where}: metadata", meta, "a JSON object")
    q = meta.get("quality")
    _expect(q is None or isinstance(q, dict), f"{where}: quality", q, "an object of fractions")
    for k in QUALITY_KEYS:
        v = (q or {}).get(k)
        _expect(v is None or _is_number(v), f"{where}: quality.{k}", v, "a number in [0, 1] or null")
    bbox = meta.get("bbox_lonlat")
    _expect(bbox is None or (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)),
            f"{where}: bbox_lonlat", bbox, "4 numbers W, S, E, N")
    dts = meta.get("datetimes")
    _expect(dts is None or (isinstance(dts, list) and all(isinstance(t, str) for t in dts)), f"{where}: datetimes",
            dts, "a list of ISO dates")
    return meta


def shard_paths(root: Path, man: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """(dataset, split, shard path) in manifest order; every shard must exist.

    Raises:
        ReportError: a listed shard is missing (an incomplete or moved dataset).
    """
    out = []
    for ds, d in man["datasets"].items():
        for split in _splits(d):
            for sh in d["splits"][split].get("shards", []):
                try:  # a manifest is input: its paths stay inside the dataset (pipeline.names)
                    p = confined(root, sh["path"], "shard path")
                except UnsafeName as e:
                    raise ReportError(str(e)) from None
                if not p.is_file():
                    raise ReportError(f"shard {p} listed in the manifest is missing: the dataset is incomplete or was moved")
                out.append((ds, split, p))
    return out


def _splits(d: dict[str, Any]) -> list[str]:
    names = list(d["splits"])
    return sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


def iter_shard(path: Path, *, decode: bool = True) -> Iterator[tuple[str, np.ndarray | bytes, dict[str, Any]]]:
    """Stream (key, chip, metadata) from one WebDataset shard without extracting it.

    Args:
        path: a `.tar` shard (compressed tars are read too).
        decode: False yields the raw `.npy` bytes instead of an array (decode later with `decode_npy`).

    Raises:
        ReportError: a sample lacks its `.npy` or `.json` member, or cannot be decoded.
    """
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                f = tar.extractfile(m)
                assert f is not None
                parts = pending.setdefault(key, {})
                parts[ext] = f.read()
                if "npy" in parts and "json" in parts:
                    del pending[key]
                    try:
                        meta = json.loads(parts["json"])
                    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int of > 4300 digits
                        raise ReportError(f"{path}: sample {key}: bad JSON metadata ({_one_line(e)})") from None
                    yield key, (decode_npy(parts["npy"], where=f"{path}: sample {key}") if decode else parts["npy"]), meta
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ReportError(f"{path}: unreadable shard ({e})") from None
    if pending:
        k, parts = next(iter(pending.items()))
        raise ReportError(f"{path}: sample {k} has only {', '.join(parts)} (needs .npy and .json)")


def decode_npy(data: bytes, *, where: str = "") -> np.ndarray:
    """A `.npy` member as uint16 [C, H, W] or [T, C, H, W] (pickles refused)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ReportError(f"{where}: bad .npy ({e})") from None
    if arr.ndim not in (3, 4):
        raise ReportError(f"{where}: chip shape {list(arr.shape)[:8]} is not [C, H, W] or [T, C, H, W]")
    if arr.dtype != np.uint16:  # the format's dtype; the histograms shift DN as unsigned integers
        raise ReportError(f"{where}: chip dtype {arr.dtype}, expected uint16")
    return arr


# -- scan -------------------------------------------------------------------------------


@dataclass
class Chip:
    """A chip chosen for the contact sheet: array [C, H, W] or [T, C, H, W] and its metadata."""

    key: str
    data: np.ndarray
    meta: dict[str, Any]


@dataclass
class Scan:
    """What one streaming pass over the shards collects.

    Attributes:
        chips: reservoir sample per (dataset, split), in reading order.
        read: chips read per (dataset, split).
        bboxes: per (dataset, split), [N, 4] lon/lat bounds (w, s, e, n) of every chip.
        tiles: per (dataset, split), the MGRS tile of every chip (same order as bboxes).
        quality: per (dataset, split) and quality key, every chip's fraction (None = unknown).
        hist: per (dataset, split), [C, HIST_BINS] counts of valid pixels (DN >> HIST_SHIFT).
    """

    chips: dict[tuple[str, str], list[Chip]] = field(default_factory=dict)
    read: Counter[tuple[str, str]] = field(default_factory=Counter)
    bboxes: dict[tuple[str, str], list[list[float]]] = field(default_factory=lambda: defaultdict(list))
    tiles: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    quality: dict[tuple[str, str], dict[str, list[float | None]]] = field(
        default_factory=lambda: defaultdict(lambda: {k: [] for k in QUALITY_KEYS})
    )
    hist: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def scan_dataset(
    root: Path, man: dict[str, Any], *, per_split: int = 8, seed: int = 0, pixels: bool = True
) -> Scan:
    """Read every shard once and collect samples, footprints, quality and pixel histograms.

    Args:
        root: the manifest's directory (shard paths are relative to it).
        man: the manifest (checked by `load_manifest`).
        per_split: chips kept per (dataset, split) by reservoir sampling (Vitter's algorithm R).
        seed: sampling seed; each (dataset, split) draws from its own generator, so the choice
            does not depend on the order or number of other shards.
        pixels: accumulate pixel histograms (False: decode only the chips kept).
    """
    scan = Scan()
    rngs: dict[tuple[str, str], random.Random] = {}
    n_bands = len(man.get("bands") or BANDS)
    paths = shard_paths(root, man)
    for ds, split, path in paths:
        g = (ds, split)
        rng = rngs.setdefault(g, random.Random(f"{seed}/{ds}/{split}"))
        reservoir = scan.chips.setdefault(g, [])
        for key, raw, meta in iter_shard(path, decode=False):
            check_sample_meta(meta, f"{path}: sample {key}")
            i = scan.read[g]
            scan.read[g] += 1
            slot = i if i < per_split else rng.randrange(i + 1)
            keep = slot < per_split
            bbox = meta.get("bbox_lonlat")
            if isinstance(bbox, list) and len(bbox) == 4:
                scan.bboxes[g].append([float(v) for v in bbox])
                scan.tiles[g].append(str(meta.get("tile") or "?"))
            q = meta.get("quality") or {}
            for k in QUALITY_KEYS:
                v = q.get(k)
                scan.quality[g][k].append(None if v is None else float(v))
            if not (keep or pixels):
                continue
            assert isinstance(raw, bytes)
            arr = decode_npy(raw, where=f"{path}: sample {key}")
            if arr.shape[-3] != n_bands:
                raise ReportError(f"{path}: sample {key}: {arr.shape[-3]} bands, the manifest lists {n_bands}")
            if keep:
                chip = Chip(key, arr, meta)
                if slot < len(reservoir):
                    reservoir[slot] = chip
                else:
                    reservoir.append(chip)
            if pixels:
                _accumulate(scan.hist, g, arr)
        log.debug("read %s", path)
    for g, n in scan.read.items():
        log.info("%s/%s: read %d chips, kept %d", g[0], g[1], n, len(scan.chips[g]))
    return scan


def _accumulate(hists: dict[tuple[str, str], np.ndarray], g: tuple[str, str], arr: np.ndarray) -> None:
    """Add a chip's strided valid pixels to the per-band DN histogram of group `g`."""
    c = arr.shape[-3]
    sub = arr[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE]
    flat = np.moveaxis(sub.reshape(-1, c, sub.shape[-2] * sub.shape[-1]), 1, 0).reshape(c, -1)
    idx = (flat >> HIST_SHIFT).astype(np.int64) + (np.arange(c, dtype=np.int64) * HIST_BINS)[:, None]
    h = np.bincount(idx.ravel(), minlength=c * HIST_BINS).reshape(c, HIST_BINS)
    h[:, 0] -= (flat == 0).sum(axis=1)  # 0 = nodata, not a dark pixel
    if g in hists and hists[g].shape == h.shape:
        hists[g] += h
    else:
        hists[g] = h


# -- stretch ----------------------------------------------------------------------------


def stretch(refl: np.ndarray, lo: float, hi: float, gamma: float = 1.0) -> np.ndarray:
    """Linear stretch of reflectance to [0, 1]: lo -> 0, hi -> 1, clipped, then `** (1 / gamma)`."""
    span = hi - lo if hi > lo else 1.0
    out = np.clip((np.asarray(refl, dtype=np.float32) - lo) / span, 0.0, 1.0)
    return out ** (1.0 / gamma) if gamma != 1.0 else out


def stretch_range(stats: dict[str, Any] | None, idx: Sequence[int], scale: float) -> tuple[float, float] | None:
    """One (lo, hi) reflectance range for a composite from stored p2/p98: min p2 .. max p98 of its bands.

    None when the dataset has no usable stored percentiles.
    """
    try:
        pct = (stats or {})["percentiles"]
        lo = min(float(pct["p2"][i]) for i in idx) * scale
        hi = max(float(pct["p98"][i]) for i in idx) * scale
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return (lo, hi) if hi > lo else None


def composite(
    chip: np.ndarray,
    idx: Sequence[int],
    *,
    scale: float = 1e-4,
    nodata: int = 0,
    lohi: tuple[float, float] | None = None,
    gamma: float = 1.0,
) -> np.ndarray:
    """RGB image [H, W, 3] float32 in [0, 1] from three bands of a chip.

    Args:
        chip: [C, H, W] stored values, or [T, C, H, W] (the first date is used).
        idx: band indices for red, green, blue.
        scale: stored value -> reflectance.
        nodata: stored nodata value; a pixel with nodata in any of the three bands is black.
        lohi: reflectance range to stretch; None = the chip's own 2nd-98th percentiles of valid pixels.
        gamma: optional gamma applied after the linear stretch.
    """
    if chip.ndim == 4:
        chip = chip[0]
    x = chip[list(idx)]
    bad = (x == nodata).any(axis=0)
    refl = x.astype(np.float32) * scale
    if lohi is None:
        valid = refl[:, ~bad]
        lohi = (float(np.percentile(valid, 2)), float(np.percentile(valid, 98))) if valid.size else (0.0, 1.0)
    rgb = stretch(refl, lohi[0], lohi[1], gamma)
    rgb[:, bad] = 0.0
    return np.moveaxis(rgb, 0, -1)


# -- figures ----------------------------------------------------------------------------


def _band_index(man: dict[str, Any]) -> dict[str, int]:
    bands = man.get("bands") or BANDS
    return {b: i for i, b in enumerate(bands)}


def _short(meta: dict[str, Any], key: str) -> tuple[str, str]:
    """Two short labels for a chip: 'tile date' and its row_col offsets."""
    date = (meta.get("datetimes") or [""])[0][:10]
    parts = key.rsplit("_", 2)
    return f"{meta.get('tile') or parts[0].split('_')[0]} {date}".strip(), "_".join(parts[-2:])


def plot_contact_sheet(
    scan: Scan, man: dict[str, Any], path: Path | BinaryIO, *, per_split: int, gamma: float = 1.0
) -> Any:
    """Contact sheet PNG: per (dataset, split) a true-colour row and a false-colour row.

    Chips are pasted at their native pixel size (upsampled by an integer factor, nearest
    neighbour, when smaller than 96 px) into one image and labelled in pixel coordinates:
    one `imshow` instead of one Axes per chip keeps this fast for many chips.
    """
    from pipeline.report_html import new_figure, save_png

    bi = _band_index(man)
    scale = float(man.get("value_scale") or 1e-4)
    nodata = int(man.get("nodata") or 0)
    groups = [(ds, s) for ds, d in man["datasets"].items() for s in _splits(d)]
    ncols = max(1, min(per_split, max((len(scan.chips.get(g, [])) for g in groups), default=1)))
    cell = max([max(c.data.shape[-2:]) for cs in scan.chips.values() for c in cs] or [96])
    zoom = max(1, math.ceil(96 / cell))
    cell *= zoom
    left, gap, title, top = 190, 6, 16, 6  # pixels
    rows: list[tuple[tuple[str, str], str, tuple[str, ...] | None]] = []
    for g in groups:
        if scan.chips.get(g):
            rows += [(g, "true colour", TRUE_COLOUR), (g, "false colour", FALSE_COLOUR)]
        else:
            rows.append((g, "no chips", None))
    row_h = title + cell + gap
    width = left + ncols * (cell + gap)
    height = top + len(rows) * row_h + gap
    canvas = np.ones((height, width, 3), dtype=np.float32)
    labels: list[tuple[float, float, str, dict[str, Any]]] = []
    for r, (g, label, bands) in enumerate(rows):
        ds, split = g
        d = man["datasets"][ds]
        y0 = top + r * row_h + title
        t_steps = int(d.get("time_steps") or 1)
        note = f"\n(first of {t_steps} dates)" if t_steps > 1 else ""
        labels.append((left - 10, y0 + cell / 2, f"{ds}\n{split} \u00b7 {label}{note}",
                       {"ha": "right", "va": "center", "fontsize": 8}))
        if bands is None:
            continue
        idx = [bi[b] for b in bands]
        lohi = stretch_range(d.get("stats"), idx, scale)
        for c, chip in enumerate(scan.chips[g][:ncols]):
            rgb = composite(chip.data, idx, scale=scale, nodata=nodata, lohi=lohi, gamma=gamma)
            if zoom > 1:
                rgb = rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)
            x0 = left + c * (cell + gap)
            h, w = rgb.shape[:2]
            canvas[y0:y0 + h, x0:x0 + w] = rgb
            top_label, offsets = _short(chip.meta, chip.key)
            labels.append((x0 + w / 2, y0 - 3, top_label if label == "true colour" else offsets,
                           {"ha": "center", "va": "bottom", "fontsize": 6.5}))
    dpi = 100
    fig = new_figure(width / dpi, height / dpi, dpi=dpi, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    for x, y, text, kw in labels:
        ax.text(x, y, text, **kw)
    return save_png(fig, path)


def plot_histograms(scan: Scan, man: dict[str, Any], ds: str, path: Path) -> Any:
    """Per-band histograms of sampled valid reflectances (train filled, other splits as lines),
    with the stored train mean (solid), mean +- std (dashed), p2/p98 (dotted) and p50 (dash-dot)."""
    from pipeline.report_html import PALETTE, new_figure, save_png

    bands = man.get("bands") or BANDS
    scale = float(man.get("value_scale") or 1e-4)
    d = man["datasets"][ds]
    stats = d.get("stats") or {}
    pct = stats.get("percentiles") or {}
    splits = [s for s in _splits(d) if (ds, s) in scan.hist]
    total = sum(scan.hist[(ds, s)] for s in splits) if splits else None
    ncol = 4
    nrow = math.ceil(len(bands) / ncol)
    fig = new_figure(11, 2.0 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    bin_w = (1 << HIST_SHIFT) * scale
    for b, name in enumerate(bands):
        ax = axes[b // ncol, b % ncol]
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        if total is None or b >= total.shape[0] or total[b].sum() == 0:
            ax.text(0.5, 0.5, "no pixels", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        cdf = np.cumsum(total[b]) / total[b].sum()
        top = int(np.searchsorted(cdf, 0.995)) + 1
        hi_candidates = [top * bin_w]
        if pct.get("p99") and b < len(pct["p99"]):
            hi_candidates.append(float(pct["p99"][b]) * scale * 1.15)
        xmax = max([*hi_candidates, 0.05])
        nb = max(1, int(math.ceil(xmax / bin_w)))
        factor = max(1, nb // 70)  # ~70 display bins
        for k, s in enumerate(splits):
            h = scan.hist[(ds, s)][b, : nb - nb % factor or factor]
            h = h[: len(h) // factor * factor].reshape(-1, factor).sum(axis=1).astype(float)
            if h.sum() == 0:
                continue
            h /= h.sum() * bin_w * factor  # density, so splits of different sizes compare
            edges = np.arange(len(h) + 1) * bin_w * factor
            colour = PALETTE[k % len(PALETTE)]
            if k == 0:
                ax.stairs(h, edges, fill=True, color=colour, alpha=0.45, label=s)
            else:
                ax.stairs(h, edges, color=colour, lw=1.2, label=s)
        if stats.get("mean") and b < len(stats["mean"]):
            m, sd = float(stats["mean"][b]) * scale, float(stats["std"][b]) * scale
            ax.axvline(m, color="black", lw=1.1, label="mean")
            for v in (m - sd, m + sd):
                ax.axvline(v, color="black", lw=0.8, ls="--", label="mean \u00b1 std" if v < m else None)
        for p, ls in (("p2", ":"), ("p98", ":"), ("p50", "-.")):
            if pct.get(p) and b < len(pct[p]):
                ax.axvline(float(pct[p][b]) * scale, color="#D55E00", lw=1.0, ls=ls,
                           label={"p2": "p2 / p98", "p50": "p50"}.get(p))
        ax.set_xlim(0, xmax)
        if b // ncol == nrow - 1:
            ax.set_xlabel("reflectance", fontsize=8)
    for b in range(len(bands), nrow * ncol):
        axes[b // ncol, b % ncol].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=8, frameon=False)
    return save_png(fig, path)


def aoi_outline(man: dict[str, Any]) -> tuple[list[np.ndarray], str]:
    """Outline rings (lon/lat arrays [N, 2]) of the build's AOI and a label for it.

    From `catalogs/aois/<config.aoi>.geojson`, else the rectangle of `config.bbox`; no rings
    (and a label saying so) when neither can be found.
    """
    cfg = man.get("config") or {}
    bbox = cfg.get("bbox")
    if bbox and len(bbox) == 4:
        w, s, e, n = (float(v) for v in bbox)
        return [np.array([[w, s], [e, s], [e, n], [w, n], [w, s]])], f"bbox {w:g}, {s:g}, {e:g}, {n:g}"
    name = cfg.get("aoi")
    if not name:
        return [], "no AOI in the manifest config"
    try:
        from pipeline.catalogs import load_aoi

        geom = load_aoi(str(name))
    except (PipelineError, OSError, ValueError) as e:
        log.warning("AOI outline not drawn: %s", e)
        return [], f"AOI {name!r} (outline not found)"
    return _rings(geom), f"AOI {name}"


def _rings(geom: dict[str, Any]) -> list[np.ndarray]:
    t = geom.get("type")
    if t == "Polygon":
        return [np.asarray(r, dtype=float)[:, :2] for r in geom["coordinates"]]
    if t == "MultiPolygon":
        return [np.asarray(r, dtype=float)[:, :2] for poly in geom["coordinates"] for r in poly]
    if t == "GeometryCollection":
        return [r for g in geom["geometries"] for r in _rings(g)]
    if t == "Feature":
        return _rings(geom["geometry"])
    if t == "FeatureCollection":
        return [r for f in geom["features"] for r in _rings(f["geometry"])]
    return []


def plot_footprints(scan: Scan, man: dict[str, Any], path: Path, *, max_tiles: int = 8) -> Any:
    """Footprint map: overview over the AOI outline plus one zoomed panel per tile (largest first)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from pipeline.report_html import PALETTE, new_figure, save_png

    rings, aoi_label = aoi_outline(man)
    datasets = list(man["datasets"])
    splits = sorted({s for (_, s) in scan.bboxes}, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(splits)}
    markers = ["o", "s", "^", "D", "v", "P"]
    marker = {ds: markers[i % len(markers)] for i, ds in enumerate(datasets)}
    tile_counts: Counter[str] = Counter(t for ts in scan.tiles.values() for t in ts)
    tiles = [t for t, _ in tile_counts.most_common(max_tiles)]
    ncol = min(4, max(1, len(tiles)))
    nrow_tiles = math.ceil(len(tiles) / ncol) if tiles else 0
    fig = new_figure(11, 6.2 + 2.7 * nrow_tiles)
    gs = fig.add_gridspec(1 + nrow_tiles, ncol, height_ratios=[6.2] + [2.7] * nrow_tiles)
    ax = fig.add_subplot(gs[0, :])

    def draw(ax: Any, select_tile: str | None, points: bool | None) -> list[float]:
        """Rectangles (and centre points: True, False, or None = when chips are tiny in the view)."""
        xs: list[float] = []
        ys: list[float] = []
        def extent_m(item: Any) -> float:
            d = man["datasets"].get(item[0][0], {})
            return -float(d.get("chip_size") or 0) * float(d.get("gsd") or 1)

        for (ds, s), boxes in sorted(scan.bboxes.items(), key=extent_m):  # large chips first, small on top
            if select_tile is not None:
                boxes = [b for b, t in zip(boxes, scan.tiles[(ds, s)]) if t == select_tile]
            if not boxes:
                continue
            arr = np.asarray(boxes)
            polys = [[(w, so), (e, so), (e, n), (w, n)] for w, so, e, n in arr]
            ax.add_collection(PolyCollection(polys, facecolor=colour[s], edgecolor=colour[s], alpha=0.35, lw=0.6))
            cx, cy = (arr[:, 0] + arr[:, 2]) / 2, (arr[:, 1] + arr[:, 3]) / 2
            if points is None and select_tile is not None:
                all_boxes = np.asarray([b for bs, ts in zip(scan.bboxes.values(), scan.tiles.values())
                                        for b, t in zip(bs, ts) if t == select_tile])
                view = max(np.ptp(all_boxes[:, [0, 2]]), np.ptp(all_boxes[:, [1, 3]]))
                chip = float(np.max(arr[:, 2] - arr[:, 0]))
                points = chip < 0.05 * view
            if points:
                ax.scatter(cx, cy, s=22, marker=marker.get(ds, "o"), facecolor=colour[s], edgecolor="black",
                           lw=0.4, zorder=3)
            xs += [float(arr[:, 0].min()), float(arr[:, 2].max())]
            ys += [float(arr[:, 1].min()), float(arr[:, 3].max())]
        return [min(xs), min(ys), max(xs), max(ys)] if xs else []

    for r in rings:
        ax.plot(r[:, 0], r[:, 1], color="#444444", lw=1.2)
    ext = draw(ax, None, points=True)
    lons = [v for r in rings for v in r[:, 0]] + ([ext[0], ext[2]] if ext else [])
    lats = [v for r in rings for v in r[:, 1]] + ([ext[1], ext[3]] if ext else [])
    if lons:
        pad = max(0.5, 0.04 * (max(lons) - min(lons)))
        ax.set_xlim(min(lons) - pad, max(lons) + pad)
        ax.set_ylim(min(lats) - pad, max(lats) + pad)
        ax.set_aspect(1 / max(0.2, math.cos(math.radians((min(lats) + max(lats)) / 2))))
    ax.grid(True, lw=0.4, color="#cccccc")
    ax.set_xlabel("longitude (\u00b0E)", fontsize=9)
    ax.set_ylabel("latitude (\u00b0N)", fontsize=9)
    ax.set_title(f"chip footprints over {aoi_label} (centres marked; rectangles to scale)", fontsize=10)
    handles = [Line2D([], [], color="#444444", lw=1.2, label=aoi_label)]
    handles += [Line2D([], [], ls="", marker="s", markersize=8, color=colour[s], alpha=0.7, label=s) for s in splits]
    handles += [Line2D([], [], ls="", marker=marker[ds], markersize=6, mfc="white", mec="black", label=ds)
                for ds in datasets]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    ax.tick_params(labelsize=8)
    for i, t in enumerate(tiles):
        tax = fig.add_subplot(gs[1 + i // ncol, i % ncol])
        e = draw(tax, t, points=None)
        if e:
            pad = 0.08 * max(e[2] - e[0], e[3] - e[1], 1e-4)
            tax.set_xlim(e[0] - pad, e[2] + pad)
            tax.set_ylim(e[1] - pad, e[3] + pad)
            tax.set_aspect(1 / max(0.2, math.cos(math.radians((e[1] + e[3]) / 2))))
        tax.set_title(f"tile {t}: {tile_counts[t]} chips", fontsize=8)
        tax.tick_params(labelsize=6)
        tax.ticklabel_format(useOffset=False)
        tax.xaxis.set_major_locator(MaxNLocator(3))
        tax.yaxis.set_major_locator(MaxNLocator(4))
        tax.grid(True, lw=0.3, color="#dddddd")
    return save_png(fig, path)


def plot_quality(scan: Scan, man: dict[str, Any], path: Path) -> Any:
    """Histograms (log counts) of each quality fraction per (dataset, split); nulls counted as unknown."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from pipeline.report_html import PALETTE, new_figure, save_png

    groups = [(ds, s) for ds, d in man["datasets"].items() for s in _splits(d) if (ds, s) in scan.quality]
    splits = list(dict.fromkeys(s for _, s in groups))
    styles = ["-", "--", ":", "-."]
    dsets = list(dict.fromkeys(ds for ds, _ in groups))
    fig = new_figure(11, 5.4)
    axes = fig.subplots(2, 3, squeeze=False)
    edges = np.linspace(0, 1, 21)
    for k, key in enumerate(QUALITY_KEYS):
        ax = axes[k // 3, k % 3]
        unknown = 0
        ymax = 1.0
        for ds, s in groups:
            vals = scan.quality[(ds, s)][key]
            known = np.array([v for v in vals if v is not None], dtype=float)
            unknown += len(vals) - known.size
            if known.size:
                h, _ = np.histogram(np.clip(known, 0, 1), bins=edges)
                ymax = max(ymax, float(h.max()))
                ax.stairs(h, edges, color=PALETTE[splits.index(s) % len(PALETTE)],
                          ls=styles[dsets.index(ds) % len(styles)], lw=1.4, label=f"{ds} {s}")
        ax.set_yscale("log")
        ax.set_ylim(0.7, max(2.0, ymax * 1.6))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(0, 1)
        ax.set_title(f"{key} fraction", fontsize=9)
        ax.tick_params(labelsize=7)
        if unknown:
            ax.text(0.97, 0.95, f"unknown (no SCL): {unknown} chips", transform=ax.transAxes, ha="right", va="top",
                    fontsize=7.5, bbox={"facecolor": "white", "edgecolor": "#999999", "lw": 0.5})
        if k // 3 == 1:
            ax.set_xlabel("fraction of chip pixels", fontsize=8)
        if k % 3 == 0:
            ax.set_ylabel("chips (log scale)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    return save_png(fig, path)


# -- page -------------------------------------------------------------------------------


def total_chips(man: dict[str, Any]) -> int:
    """Sum of num_samples over all datasets and splits of the manifest."""
    return sum(int(sp.get("num_samples") or 0) for d in man["datasets"].values() for sp in d["splits"].values())


def _fmt_refl(v: Any, scale: float) -> float | None:
    try:
        return round(float(v) * scale, 4)
    except (TypeError, ValueError):
        return None


def _credit_years(man: dict[str, Any]) -> str:
    years = sorted({str(i.get("datetime") or "")[:4] for i in man.get("items") or [] if i.get("used", True)} - {""})
    return f" [{years[0]}]" if len(years) == 1 else (f" [{years[0]}\u2013{years[-1]}]" if years else "")


def render_page(scan: Scan, man: dict[str, Any], manifest_path: Path, out: Path, pngs: dict[str, Any]) -> str:
    """The report's HTML, referring to the PNGs already written into `out`."""
    from pipeline import __version__
    from pipeline.report_html import COPERNICUS_CREDIT, Cell, Page, esc, figure_html, fmt_bytes, key_values, table

    root = manifest_path.parent
    scale = float(man.get("value_scale") or 1e-4)
    n_chips = total_chips(man)
    n_shards = sum(len(sp.get("shards", [])) for d in man["datasets"].values() for sp in d["splits"].values())
    n_bytes = sum(int(sh.get("bytes") or 0) for d in man["datasets"].values() for sp in d["splits"].values()
                  for sh in sp.get("shards", []))
    name = root.resolve().name
    # the report names the manifest relative to itself: no local folder layout in a page users share
    rel_manifest = Path(os.path.relpath(manifest_path.resolve(), out.resolve())).as_posix()
    # every value is escaped, numbers too: they are computed from a manifest written by others
    headline = (
        f'<strong><span id="chip-count">{esc(n_chips)}</span> chips</strong> in {esc(len(man["datasets"]))} datasets '
        f"({esc(', '.join(man['datasets']))}) \u00b7 {esc(n_shards)} shards \u00b7 {esc(fmt_bytes(n_bytes))}"
        f" \u00b7 built {esc(man.get('created'))}"
    )
    page = Page(
        f"Dataset report: {name}",
        subtitle=f"{rel_manifest} \u00b7 {man.get('format')} \u00b7 config {str(man.get('config_hash') or '')[:12]}",
        headline=headline,
        credits=[
            f"{COPERNICUS_CREDIT}{_credit_years(man)}, processed by ESA.",
            f"Report written by python -m pipeline.inspect (pipeline {__version__}) from {rel_manifest}; "
            "static page, no scripts, no network resources.",
        ],
    )

    # summary
    mismatch = [
        f"{ds}/{s}: manifest {int(sp.get('num_samples') or 0)}, shards hold {scan.read.get((ds, s), 0)}"
        for ds, d in man["datasets"].items() for s, sp in d["splits"].items()
        if int(sp.get("num_samples") or 0) != scan.read.get((ds, s), 0)
    ]
    rows: list[list[Any]] = []
    for ds, d in man["datasets"].items():
        for s in _splits(d):
            sp = d["splits"][s]
            shards = sp.get("shards", [])
            rows.append([ds, d.get("chip_size"), d.get("gsd"), d.get("time_steps"), d.get("layout"), s, len(shards),
                         int(sp.get("num_samples") or 0),
                         Cell(esc(fmt_bytes(sum(int(h.get("bytes") or 0) for h in shards))), True)])
    rows.append([Cell("<strong>total</strong>"), "", "", "", "", "", n_shards, Cell(f"<strong>{esc(n_chips)}</strong>", True),
                 Cell(esc(fmt_bytes(n_bytes)), True)])
    cfg = man.get("config") or {}
    src = man.get("source") or {}
    summ = man.get("summary") or {}
    kv = key_values([
        ("dataset", name),
        ("format", man.get("format")),
        ("created", man.get("created")),
        ("software version", man.get("software_version")),
        ("config hash", Cell(f"<code>{esc(man.get('config_hash'))}</code>")),
        ("source", f"{src.get('catalog') or cfg.get('catalog') or 'n/a'} \u00b7 {src.get('collection') or 'n/a'}"),
        ("area", f"AOI {cfg['aoi']}" if cfg.get("aoi") and not cfg.get("bbox") else f"bbox {cfg.get('bbox')}"),
        ("dates", f"{cfg.get('start') or 'any'} to {cfg.get('end') or 'any'}"),
        ("bands", " ".join(man.get("bands") or BANDS)),
        ("values", f"{man.get('dtype', 'uint16')}, reflectance = value \u00d7 {scale:g}, nodata = {man.get('nodata', 0)}"),
        ("build time", f"{summ.get('seconds')} s" if summ.get("seconds") is not None else None),
    ])
    warn = (
        f'<p class="warn">Shards and manifest disagree: {esc("; ".join(mismatch))}</p>' if mismatch else ""
    )
    cfg_json = esc(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    page.section(
        "summary", "Summary", kv, warn,
        table(["dataset", "chip px", "GSD m", "dates", "layout", "split", "shards", "samples", "bytes"], rows,
              numeric=(1, 2, 3, 6, 7, 8), table_id="datasets"),
        f"<details><summary>build configuration</summary><pre>{cfg_json}</pre></details>",
    )

    # contact sheet
    sampled = []
    for (ds, s), chips in scan.chips.items():
        for c in chips:
            q = c.meta.get("quality") or {}
            sampled.append([ds, s, Cell(f"<code>{esc(c.key)}</code>"), q.get("nodata"), q.get("cloud"), q.get("shadow")])
    n_shown = sum(len(v) for v in scan.chips.values())
    page.section(
        "chips", "Contact sheet",
        figure_html(pngs["sheet"], alt=f"{n_shown} random chips in true and false colour",
                    caption=(
                        f"{esc(n_shown)} chips drawn at random (seeded) per dataset and split; the tile and date above each "
                        "true-colour chip, its row_col pixel offset above the false-colour one. True colour = B04, B03, "
                        "B02; false colour = B08, B04, B03 (vegetation red). Reflectance = value \u00d7 "
                        f"{esc(f'{scale:g}')}, stretched linearly between the dataset's stored train p2 and p98 (one range per "
                        "composite: lowest p2 to highest p98 of its three bands; the chip's own 2-98 % when no statistics "
                        "are stored). Nodata is black. Time stacks show their first date."
                    )),
        "<details><summary>keys of the chips shown</summary>"
        + table(["dataset", "split", "key", "nodata", "cloud", "shadow"], sampled, numeric=(3, 4, 5)) + "</details>",
    )

    # bands
    blocks = []
    for ds, d in man["datasets"].items():
        blocks.append(f"<h3>{esc(ds)}</h3>")
        if ds in pngs.get("hist", {}):
            blocks.append(figure_html(pngs["hist"][ds], alt=f"per-band reflectance histograms of {ds}", caption=(
                "Density of valid pixel reflectances (every chip, every 2nd pixel; train filled, other splits as "
                "lines). Black: stored train mean (solid) and mean \u00b1 std (dashed); orange: stored p2 and p98 "
                "(dotted) and median (dash-dot).")))
        stats = d.get("stats")
        if not stats:
            blocks.append('<p class="note">No statistics stored (no train chips).</p>')
            continue
        pct = stats.get("percentiles") or {}
        pkeys = sorted(pct, key=lambda k: float(k[1:]) if k[1:].replace(".", "").isdigit() else 1e9)
        bands = man.get("bands") or BANDS
        srows = []
        for b, bn in enumerate(bands):
            def at(lst: Any, b: int = b) -> Any:
                return lst[b] if isinstance(lst, list) and b < len(lst) else None
            refl = [_fmt_refl(at(stats.get(k)), scale) for k in ("mean", "std", "min")]
            refl += [_fmt_refl(at(pct[k]), scale) for k in pkeys]
            srows.append([bn, at(stats.get("count")), *refl, _fmt_refl(at(stats.get("max")), scale)])
        blocks.append(table(["band", "valid px", "mean", "std", "min", *pkeys, "max"], srows,
                            caption=f"{ds}: stored statistics of the train split, reflectance",
                            numeric=tuple(range(1, 6 + len(pkeys)))))
    page.section("bands", "Band statistics", *blocks, page_break=True)

    # footprints
    page.section("map", "Footprints", figure_html(pngs["map"], alt="map of chip footprints over the AOI", caption=(
        "Each chip's bbox_lonlat as a rectangle (colour = split) and its centre as a point (shape = dataset), over "
        "the AOI outline in longitude/latitude (no basemap). Chips are small next to the AOI, so the lower panels "
        "zoom on the tiles holding most chips.")), page_break=True)

    # quality
    qrows = []
    for ds, d in man["datasets"].items():
        for s in _splits(d):
            q = scan.quality.get((ds, s))
            if q is None:
                continue
            row: list[Any] = [ds, s, scan.read.get((ds, s), 0)]
            unknown = 0
            for k in QUALITY_KEYS:
                known = [v for v in q[k] if v is not None]
                unknown = max(unknown, len(q[k]) - len(known))
                row.append(round(float(np.mean(known)), 4) if known else None)
            row.append(unknown)
            qrows.append(row)
    page.section(
        "quality", "Quality fractions",
        figure_html(pngs["quality"], alt="histograms of per-chip quality fractions", caption=(
            "Per-chip fractions of pixels flagged in the SCL layer (nodata and invalid come from the pixel values). "
            "Chips whose scenes had no SCL asset have unknown cloud/shadow/cirrus/snow and are counted as "
            "\u201cunknown (no SCL)\u201d.")),
        table(["dataset", "split", "chips", *(f"mean {k}" for k in QUALITY_KEYS), "unknown (no SCL)"], qrows,
              caption="mean fraction per chip", numeric=tuple(range(2, 4 + len(QUALITY_KEYS)))),
    )

    # scenes
    scenes = man.get("scenes") or {}
    rejected = scenes.get("rejected") or {}
    items = man.get("items") or []
    item_rows = [
        [Cell(f"<code>{esc(i.get('id'))}</code>"), str(i.get("datetime") or "")[:19].replace("T", " "), i.get("tile"),
         i.get("processing_baseline"), i.get("rule"), i.get("scl"), i.get("used")]
        for i in items
    ]
    drop_rows = [[ds, reason, n] for ds, d in man["datasets"].items() for reason, n in sorted(
        (d.get("dropped") or {}).items(), key=lambda kv: -kv[1])]
    page.section(
        "scenes", "Scenes",
        key_values([("found", scenes.get("found")), ("used", scenes.get("used")),
                    ("rejected", sum(int(v) for v in rejected.values()))]),
        table(["reason a scene was rejected", "scenes"], sorted(rejected.items(), key=lambda kv: -kv[1]),
              caption="rejected scenes") if rejected else '<p class="note">No scene was rejected.</p>',
        table(["dataset", "reason a chip was dropped", "chips"], drop_rows, caption="dropped chips")
        if drop_rows else '<p class="note">No chip was dropped.</p>',
        table(["item", "acquired (UTC)", "tile", "baseline", "harmonisation rule", "SCL", "used"], item_rows,
              caption=f"{len(items)} items found", table_id="items") if items else '<p class="note">No items listed.</p>',
        page_break=True,
    )
    return page.render()


# -- entry points -----------------------------------------------------------------------


def build_report(
    dataset: Path,
    out: Path | None = None,
    *,
    png_only: bool = False,
    seed: int = 0,
    per_split: int = 8,
    version: str | None = None,
    gamma: float = 1.0,
) -> Path:
    """Write the report (or with `png_only` just the contact sheet) and return what was written.

    Args:
        dataset: dataset directory or its manifest.json.
        out: report directory (default `<dataset>/report/`); with `png_only`, a `.png` path or a
            directory that receives `contact_sheet.png`.
        png_only: write only the contact sheet PNG, leave anything else in place.
        seed: chip sampling seed.
        per_split: chips shown per (dataset, split).
        version: a version sub-directory of `dataset` (see `resolve_manifest`).
        gamma: gamma applied after the linear stretch of the composites.

    Returns:
        The `index.html` path, or the PNG path with `png_only`.

    Raises:
        ReportError: bad input or an output location in the way; nothing is written then.
    """
    import matplotlib

    matplotlib.use("Agg")
    # dataset names, tiles and dates from the data label the figures: drawn as plain text, so a
    # `$` in them is a character, not TeX that matplotlib fails to parse
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        return _build_report(dataset, out, png_only=png_only, seed=seed, per_split=per_split, version=version,
                             gamma=gamma)


def _build_report(
    dataset: Path, out: Path | None, *, png_only: bool, seed: int, per_split: int, version: str | None, gamma: float,
) -> Path:
    """`build_report` under its matplotlib settings."""
    from pipeline.report_html import write_file_atomic

    if per_split < 1:
        raise ReportError(f"--per-split {per_split}: must be >= 1")
    if gamma <= 0:
        raise ReportError(f"--gamma {gamma}: must be > 0")
    mpath = resolve_manifest(dataset, version)
    man = load_manifest(mpath)
    root = mpath.parent
    out = Path(out) if out is not None else root / "report"
    if png_only:
        target = out if out.suffix.lower() == ".png" else out / SHEET_NAME
        if target.exists() and target.is_dir():
            raise ReportError(f"--out {target} is a directory")
        scan = scan_dataset(root, man, per_split=per_split, seed=seed, pixels=False)
        buf = io.BytesIO()
        try:
            plot_contact_sheet(scan, man, buf, per_split=per_split, gamma=gamma)
            write_file_atomic(target, buf.getvalue())
        except OSError as e:
            raise ReportError(f"cannot write {target}: {e.strerror or e}") from None
        log.info("wrote %s", target)
        return target
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: give a directory")
    if out.exists() and any(out.iterdir()) and not ((out / "index.html").exists() or (out / SHEET_NAME).exists()):
        raise ReportError(f"--out {out} exists and is not a report: choose another directory")
    scan = scan_dataset(root, man, per_split=per_split, seed=seed, pixels=True)
    try:
        _write_report(scan, man, mpath, out, per_split=per_split, gamma=gamma)
    except OSError as e:
        raise ReportError(f"cannot write the report to {out}: {e.strerror or e}") from None
    log.info("wrote %s (%d chips in the dataset)", out / "index.html", total_chips(man))
    return out / "index.html"


def _write_report(scan: Scan, man: dict[str, Any], mpath: Path, out: Path, *, per_split: int, gamma: float) -> None:
    from pipeline.report_html import atomic_dir

    with atomic_dir(out, markers=("index.html", SHEET_NAME)) as tmp:
        pngs: dict[str, Any] = {"sheet": plot_contact_sheet(scan, man, tmp / SHEET_NAME, per_split=per_split, gamma=gamma)}
        pngs["hist"] = {}
        for i, ds in enumerate(man["datasets"]):
            if any(g[0] == ds for g in scan.hist):
                pngs["hist"][ds] = plot_histograms(scan, man, ds, tmp / f"histograms_{i}.png")
        pngs["map"] = plot_footprints(scan, man, tmp / "footprints.png")
        pngs["quality"] = plot_quality(scan, man, tmp / "quality.png")
        (tmp / "index.html").write_text(render_page(scan, man, mpath, out, pngs), encoding="utf-8")


def parser(prog: str = "python -m pipeline.inspect") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write a static HTML report (index.html + PNGs) of a shard dataset: contact sheet, band "
        "histograms and statistics, footprint map, quality distributions, scenes and summary.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset directory holding manifest.json, or the manifest itself")
    p.add_argument("--out", help="report directory (default: DATASET/report); with --png, a .png file or a directory")
    p.add_argument("--png", action="store_true", help="write only the contact sheet PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the random chip choice (default 0)")
    p.add_argument("--per-split", type=int, default=8, dest="per_split",
                   help="chips shown per dataset and split (default 8)")
    p.add_argument("--version", help="report on DATASET/<version>/ (or DATASET/versions/<version>/)")
    p.add_argument("--gamma", type=float, default=1.0, help="gamma after the linear stretch (default 1.0 = none)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.inspect") -> int:
    """CLI entry point; returns the exit code."""
    args = parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # manifests record catalog URLs and sample JSON hrefs: no credential or signed query may reach the log
    from pipeline.redact import install_redaction

    install_redaction()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        build_report(
            Path(args.dataset), Path(args.out) if args.out else None, png_only=args.png, seed=args.seed,
            per_split=args.per_split, version=args.version, gamma=args.gamma,
        )
    except PipelineError as e:
        log.error("%s", e)
        return e.exit_code
    except FileExistsError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
