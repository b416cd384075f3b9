"""The build, as thin wiring over the stage modules (search, cube, tiling, shards).

    search -> group by grid -> [per unit] lazy load + harmonise -> zarr cube
           -> [per dataset] tile + quality + split -> shards (+ train histograms)
           -> statistics -> manifest.json (last, atomic)

Resume: `<output>/_work/` holds the state. A unit whose cube exists with the same content
hash is not loaded again. Shard writing checkpoints after every closed shard: the writer
restarts at the beginning of the unit that holds the earliest open shard's first sample,
re-generates samples (deterministic) and skips those already in closed shards, so a run
killed at any moment finishes with exactly the dataset an uninterrupted run makes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import __version__
from pipeline.catalogs import sensor
from pipeline.config import BuildConfig, TilingSpec
from pipeline.catalogs import Source
from pipeline.cube import GDAL_CLOUD_ENV, Unit, cube_path, existing_cube, group_units, load_unit, write_cube
from pipeline.errors import NoScenesFound, OutputError
from pipeline.search import SearchResult, open_catalog, search
from pipeline.signing import make_patch_url
from pipeline.shards import ShardRecord, ShardWriter, stats_from_histogram, write_json_atomic
from pipeline.tiling import Chip, Dropped, iter_chips, positions, small_scene_shape

log = logging.getLogger(__name__)

FORMAT = "spectralgpt-shards/1"
SPLITS = ("train", "val")


@dataclass
class BuildSummary:
    """What a build did; printed by the CLI and stored in the manifest."""

    output: Path
    found: int = 0
    used: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    chips: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    dry_run: bool = False


# -- output checks ------------------------------------------------------------------


def check_output(cfg: BuildConfig, overwrite: bool) -> Path:
    """Validate the output location before any work; writes nothing."""
    out = cfg.output_path
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"--output {str(out)!r}: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"--output {str(out)!r} is not writable (no write permission on {str(probe)!r})")
    if cfg.catalog and not cfg.catalog.startswith(("http://", "https://")) and Path(cfg.catalog).exists():
        cat_dir = Path(cfg.catalog).resolve().parent
        if out.resolve() == cat_dir or cat_dir in out.resolve().parents:
            raise OutputError(f"--output {str(out)!r} is inside the input catalog folder {str(cat_dir)!r}: choose another")
    return out


def existing_manifest(out: Path) -> dict[str, Any] | None:
    p = out / "manifest.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


# -- state ---------------------------------------------------------------------------


class WorkState:
    """`_work/state.json`: config and scene-set identity of the unfinished build, and the
    per-dataset shard-writer checkpoints."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "_work"
        self.path = self.dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def matches(self, config_hash: str, scenes_hash: str) -> bool:
        return self.data.get("config_hash") == config_hash and self.data.get("scenes_hash") == scenes_hash

    def reset(self, config_hash: str, scenes_hash: str) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.data = {"config_hash": config_hash, "scenes_hash": scenes_hash, "datasets": {}}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def hist_path(self, shard_path: str) -> Path:
        return self.dir / "hist" / f"{shard_path.replace('/', '__')}.npy"


def scenes_hash(units: list[Unit]) -> str:
    ids = [[u.id, [s.id for s in u.scenes]] for u in units]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


# -- the build -----------------------------------------------------------------------


def build(cfg: BuildConfig, *, dry_run: bool = False, overwrite: bool = False) -> BuildSummary:
    """Run the whole pipeline for `cfg`. Raises `PipelineError` for user-fixable problems."""
    t0 = time.monotonic()
    out = check_output(cfg, overwrite)
    summary = BuildSummary(output=out, dry_run=dry_run)
    config_hash = cfg.hash()
    with open_catalog(cfg) as cat:
        result = search(cfg, cat)
        src = cat.source
    summary.found = result.found
    summary.rejected.update(result.rejected)
    if not result.scenes:
        reasons = ", ".join(f"{n} {r}" for r, n in result.rejected.most_common()) or "no items matched"
        raise NoScenesFound(
            f"no usable Sentinel-2 L2A scenes in {result.catalog!r} for this AOI/dates ({result.found} found: {reasons}); "
            "widen --start/--end, --bbox/--aoi or --max-cloud"
        )
    units, dup = group_units(result.scenes)
    for _, reason in dup:
        summary.rejected[reason] += 1
    summary.used = sum(len(u.scenes) for u in units)
    log.info(
        "search: %d items found, %d scenes used on %d grids, %d rejected%s",
        result.found, summary.used, len(units), sum(summary.rejected.values()),
        "".join(f"; {n} {r}" for r, n in summary.rejected.most_common()),
    )
    if dry_run:
        _dry_run_report(cfg, units, summary)
        summary.seconds = time.monotonic() - t0
        return summary

    man = existing_manifest(out)
    s_hash = scenes_hash(units)
    if man is not None:
        if man.get("config_hash") == config_hash and man.get("scenes_hash") == s_hash and not overwrite:
            log.info("%s is up to date (same config and scenes): nothing to do", out / "manifest.json")
            shutil.rmtree(out / "_work", ignore_errors=True)  # killed after publishing, before clean-up
            summary.up_to_date = True
            summary.chips = man.get("summary", {}).get("chips", {})
            return summary
        if not overwrite:
            raise OutputError(
                f"{str(out)!r} holds a dataset built with another config or scene set; "
                "pass --overwrite to rebuild it (cubes are reused) or choose another --output"
            )
    out.mkdir(parents=True, exist_ok=True)
    state = WorkState(out)
    if not state.matches(config_hash, s_hash):
        if state.data:
            log.info("discarding an unfinished build with another config/scene set in %s", state.dir)
        state.reset(config_hash, s_hash)
    else:
        log.info("resuming the unfinished build in %s", state.dir)
    if man is not None:  # --overwrite: the old manifest must not describe new shards
        (out / "manifest.json").unlink()
        for spec_dir in man.get("datasets", {}):
            shutil.rmtree(out / spec_dir, ignore_errors=True)

    source = {"catalog": result.catalog, "collection": result.collection}
    _dask_setup(cfg, src)
    patch_url = make_patch_url(src.sign, src.token_url) if src else None
    cube_hashes = {u.id: u.cube_hash(cfg) for u in units}
    for u in tqdm(units, desc="cubes", unit="grid", disable=None):
        path = cube_path(out, u)
        if existing_cube(path, cube_hashes[u.id]) is None:
            write_cube(load_unit(u, cfg, patch_url=patch_url), path, cfg)
    _remove_stale_cubes(out, units)

    datasets: dict[str, Any] = {}
    for spec in cfg.tiling:
        datasets[spec.name] = _write_dataset(out, spec, cfg, units, state, summary, source)
    summary.bytes = sum(sh["bytes"] for d in datasets.values() for sp in d["splits"].values() for sh in sp["shards"])
    summary.seconds = time.monotonic() - t0
    manifest = _manifest(cfg, config_hash, s_hash, result, units, datasets, summary)
    write_json_atomic(out / "manifest.json", manifest)
    shutil.rmtree(state.dir, ignore_errors=True)
    return summary


def _dask_setup(cfg: BuildConfig, src: Source | None) -> None:
    """Local threaded Dask and GDAL settings for cloud reads (retries, no directory listing)."""
    import dask
    import odc.stac

    dask.config.set(scheduler="threads", num_workers=cfg.workers or os.cpu_count() or 1)
    odc.stac.configure_rio(cloud_defaults=True, **GDAL_CLOUD_ENV, **(src.gdal_env if src else {}))


def _remove_stale_cubes(out: Path, units: list[Unit]) -> None:
    keep = {cube_path(out, u).name for u in units}
    for p in (out / "cube").glob("*.zarr*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _write_dataset(
    out: Path, spec: TilingSpec, cfg: BuildConfig, units: list[Unit], state: WorkState,
    summary: BuildSummary, source: dict[str, Any],
) -> dict[str, Any]:
    """Tile every unit for one spec and write its shards, resumably."""
    import xarray as xr

    ds_state = state.data["datasets"].setdefault(
        spec.name,
        {"writers": {s: {"index": 0, "start": [0, 0], "shards": []} for s in SPLITS}, "unit_dropped": {}, "done": False},
    )
    writers: dict[str, ShardWriter] = {}
    pos = [0, 0]

    def make_on_close(split: str) -> Any:
        def on_close(rec: ShardRecord, hist: np.ndarray | None) -> None:
            if hist is not None:
                hp = state.hist_path(rec.path)
                hp.parent.mkdir(parents=True, exist_ok=True)
                np.save(hp, hist)
            w = ds_state["writers"][split]
            w["shards"].append(rec.to_json())
            w["index"] = writers[split].index
            w["start"] = list(pos)  # the sample being written now opens the next shard
            state.save()
        return on_close

    for split in SPLITS:
        w = ds_state["writers"][split]
        writers[split] = ShardWriter(
            out, spec.name, split, cfg.shards.max_bytes, cfg.shards.max_samples,
            index=w["index"], with_hist=(split == "train"), on_close=make_on_close(split),
        )
    if not ds_state["done"]:
        # remove shards beyond the checkpoint (written after it, before a kill) and temp files
        for split in SPLITS:
            d = out / spec.name
            for p in d.glob(f"{split}-*.tar*") if d.exists() else []:
                idx = int(p.name.split("-")[1].split(".")[0])
                if p.name.endswith(".tmp") or idx >= ds_state["writers"][split]["index"]:
                    p.unlink()
        restart_unit = min(tuple(ds_state["writers"][s]["start"]) for s in SPLITS)[0]
        unit_dropped: dict[str, dict[str, int]] = ds_state["unit_dropped"]
        for ui in tqdm(range(restart_unit, len(units)), desc=spec.name, unit="grid", disable=None):
            u = units[ui]
            cube = xr.open_zarr(cube_path(out, u), consolidated=False)
            dropped: Counter[str] = Counter()
            for k, item in enumerate(iter_chips(cube, spec, cfg, source)):
                pos[0], pos[1] = ui, k
                if isinstance(item, Dropped):
                    dropped[item.reason] += 1
                    continue
                assert isinstance(item, Chip)
                if (ui, k) < tuple(ds_state["writers"][item.split]["start"]):
                    continue  # already inside a closed shard
                writers[item.split].write(item.key, item.data, item.meta)
            unit_dropped[str(ui)] = dict(dropped)
        pos[0], pos[1] = len(units), 0
        for split in SPLITS:
            writers[split].close_shard()
        ds_state["done"] = True
        state.save()
    dropped_total: Counter[str] = Counter()
    for d in ds_state["unit_dropped"].values():
        dropped_total.update(d)
    summary.dropped[spec.name] = dict(dropped_total)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = ds_state["writers"][split]["shards"]
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
    summary.chips[spec.name] = {s: splits[s]["num_samples"] for s in SPLITS}
    hist = None
    for sh in splits["train"]["shards"]:
        h = np.load(state.hist_path(sh["path"]))
        hist = h if hist is None else hist + h
    n_bands = len(sensor().band_names)
    shape = [n_bands, spec.size, spec.size] if spec.time_steps == 1 else [spec.time_steps, n_bands, spec.size, spec.size]
    return {
        "chip_size": spec.size,
        "gsd": spec.gsd,
        "time_steps": spec.time_steps,
        "overlap": spec.overlap,
        "layout": "CHW" if spec.time_steps == 1 else "TCHW",
        "shape": shape,
        "splits": splits,
        "stats": stats_from_histogram(hist) if hist is not None else None,
        "dropped": dict(dropped_total),
    }


def _manifest(
    cfg: BuildConfig, config_hash: str, s_hash: str, result: SearchResult, units: list[Unit],
    datasets: dict[str, Any], summary: BuildSummary,
) -> dict[str, Any]:
    s = sensor()
    used = {sc.id for u in units for sc in u.scenes}
    items = [
        {
            "id": sc.id,
            "collection": sc.collection,
            "datetime": sc.datetime,
            "tile": sc.tile,
            "crs": f"EPSG:{sc.epsg}",
            "processing_baseline": sc.harmonisation.processing_baseline,
            "rule": sc.harmonisation.rule,
            "scl": sc.has_scl,
            "used": sc.id in used,
            "grid": next(u.id for u in units if sc in u.scenes) if sc.id in used else None,
        }
        for sc in result.scenes
    ]
    return {
        "format": FORMAT,
        "software_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": cfg.to_dict(),
        "config_hash": config_hash,
        "scenes_hash": s_hash,
        "bands": s.band_names,
        "dtype": "uint16",
        "value_scale": s.scale,
        "nodata": s.nodata,
        "source": {"catalog": result.catalog, "collection": result.collection},
        "datasets": datasets,
        "scenes": {"found": summary.found, "used": summary.used, "rejected": dict(summary.rejected)},
        "items": items,
        "summary": {"chips": summary.chips, "bytes": summary.bytes, "seconds": round(summary.seconds, 2)},
    }


def _dry_run_report(cfg: BuildConfig, units: list[Unit], summary: BuildSummary) -> None:
    """Scenes found and the chip positions each dataset would have (before quality/split)."""
    for u in units:
        for sc in u.scenes:
            log.info(
                "scene %s  %s  tile %s  EPSG:%d  baseline %s  rule %s  SCL %s",
                sc.id, sc.datetime, sc.tile or "?", sc.epsg, sc.harmonisation.processing_baseline,
                sc.harmonisation.rule, "yes" if sc.has_scl else "no",
            )
    for spec in cfg.tiling:
        n = 0
        for u in units:
            h, w = u.shape[0] // spec.factor, u.shape[1] // spec.factor
            shape = small_scene_shape(h, w, spec.size, cfg.small_scene) or (h, w)
            stride = spec.size - spec.overlap
            per_date = len(positions(shape[0], spec.size, stride)) * len(positions(shape[1], spec.size, stride))
            n += per_date * (len(u.scenes) // spec.time_steps)
        summary.chips[spec.name] = {"positions": n}
        log.info("dataset %s: would cut up to %d chips (before quality filtering and split)", spec.name, n)
