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

import concurrent.futures as cf
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import __version__
from pipeline.catalogs import sensor
from pipeline.config import BuildConfig, TilingSpec
from pipeline.catalogs import Source
from pipeline.cube import GDAL_CLOUD_ENV, Unit, check_scene_assets, clear_gdal_http_cache, cube_path, existing_cube, group_units, load_unit, write_cube
from pipeline import storage
from pipeline.errors import NoScenesFound, OutputError, SceneError, ScenesFailed
from pipeline.locking import dataset_lock
from pipeline.search import SearchResult, open_catalog, search
from pipeline.signing import make_patch_url
from pipeline.storage import is_url, staging_dir
from pipeline.shards import N_BINS, load_hist, save_hist, ShardRecord, ShardWriter, stats_from_histogram, write_json_atomic
from pipeline.tiling import Chip, Dropped, iter_chips, positions, small_scene_shape

log = logging.getLogger(__name__)

FORMAT = "spectralgpt-shards/1"
SPLITS = ("train", "val")


@dataclass
class BuildSummary:
    """What a build did; printed by the CLI and stored in the manifest."""

    output: Path | str  # a local dir, or the URL of a remote dataset
    found: int = 0
    used: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    chips: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    dry_run: bool = False
    nothing_new: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # scene id -> reason
    version: int = 0
    bytes_published: int = 0
    t0: float = field(default_factory=time.monotonic)


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
        self.lock = threading.RLock()  # held while mutating `data` or saving it

    def matches(self, config_hash: str, scenes_hash: str, version: int) -> bool:
        d = self.data
        return d.get("config_hash") == config_hash and d.get("scenes_hash") == scenes_hash and d.get("version") == version

    def reset(self, config_hash: str, scenes_hash: str, version: int) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.data = {"config_hash": config_hash, "scenes_hash": scenes_hash, "version": version, "datasets": {}}
        self.save()

    def save(self) -> None:
        with self.lock:  # datasets are written by concurrent threads
            write_json_atomic(self.path, json.loads(json.dumps(self.data)))

    def hist_path(self, shard_path: str) -> Path:
        return self.dir / "hist" / f"{shard_path.replace('/', '__')}.npz"


def scenes_hash(units: list[Unit] | None = None, ids: list[str] | None = None) -> str:
    """Identity of a set of used scenes (sorted ids)."""
    all_ids = sorted(ids if ids is not None else [s.id for u in units or [] for s in u.scenes])
    return hashlib.sha256(json.dumps(all_ids).encode()).hexdigest()


# -- the build -----------------------------------------------------------------------


def build(
    cfg: BuildConfig, *, dry_run: bool = False, overwrite: bool = False, refresh: bool = False, wait: bool = False
) -> BuildSummary:
    """Run the pipeline for `cfg`. Raises `PipelineError` for user-fixable problems.

    `refresh=True` adds a new dataset version holding only scenes the dataset does not have
    yet (new ids, or known ids with another processing baseline); otherwise a dataset is
    built (version 1), or found up to date.
    """
    target = cfg.output_target
    remote = is_url(target)
    if remote:
        storage.check_remote(target)
        out = staging_dir(target)
    else:
        out = check_output(cfg, overwrite)
    summary = BuildSummary(output=target if remote else Path(target), dry_run=dry_run)
    if not dry_run:
        _warm_imports()
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
    all_units, dup = group_units(result.scenes)
    for _, reason in dup:
        summary.rejected[reason] += 1
    summary.used = sum(len(u.scenes) for u in all_units)
    log.info(
        "search: %d items found, %d scenes used on %d grids, %d rejected%s",
        result.found, summary.used, len(all_units), sum(summary.rejected.values()),
        "".join(f"; {n} {r}" for r, n in summary.rejected.most_common()),
    )
    if dry_run:
        _dry_run_report(cfg, all_units, summary)
        summary.seconds = time.monotonic() - summary.t0
        return summary
    if cfg.scheduler:
        _check_scheduler(cfg.scheduler)  # before anything is written
    with dataset_lock(out, wait=wait):
        if remote:
            storage.pull_state(target, out)  # a refresh on a new machine starts from the published version
        _build_locked(cfg, out, result, all_units, src, summary, overwrite=overwrite, refresh=refresh)
        if remote and storage.needs_publish(target, out):
            summary.bytes_published = storage.publish(out, target)
    summary.seconds = time.monotonic() - summary.t0
    return summary


def _warm_imports() -> None:
    """Import the cube stage's heavy modules in a background thread.

    xarray (with pandas), distributed, zarr, rasterio, odc-stac and rioxarray take ~1.8 s
    to import here, and Numba with the cached kernels ~0.7 s; the catalog stage spends
    about as long waiting on another process (the loopback STAC server starting, or a
    remote API answering), so importing meanwhile hides that time (measured: about 1.5 s
    less per build). The main thread's own imports
    later wait on the module locks, so nothing is imported twice or half-way.
    """

    def run() -> None:
        with contextlib.suppress(Exception):  # a broken install surfaces at the real import
            import xarray  # noqa: F401
            import distributed  # noqa: F401
            import rasterio  # noqa: F401
            import rioxarray  # noqa: F401
            import zarr  # noqa: F401
            from pipeline import kernels

            kernels.warm_up()

    threading.Thread(target=run, name="warm-imports", daemon=True).start()


def _build_locked(
    cfg: BuildConfig, out: Path, result: SearchResult, all_units: list[Unit], src: Source | None,
    summary: BuildSummary, *, overwrite: bool, refresh: bool,
) -> None:
    config_hash = cfg.hash()
    layout = cfg.layout_hash()
    man = existing_manifest(out)
    if refresh and man is not None:
        if man.get("layout_hash") != layout:
            raise OutputError(
                f"{str(out)!r} was built with other tiling/quality/split/shard settings; a refresh must use the "
                "dataset's settings (omit them, or pass the same --config), or rebuild with build_shards --overwrite"
            )
        known = {it["id"]: it.get("processing_baseline") for it in man.get("items", []) if it.get("used")}
        new = [
            sc for u in all_units for sc in u.scenes
            if sc.id not in known or known[sc.id] != sc.harmonisation.processing_baseline
        ]
        if not new:
            log.info("refresh: nothing new in %r since version %d", result.catalog, man.get("latest_version", 1))
            summary.nothing_new = True
            summary.chips = man.get("summary", {}).get("chips", {})
            shutil.rmtree(out / "_work", ignore_errors=True)
            return
        units, _ = group_units(new)
        version = int(man.get("latest_version", 1)) + 1
        log.info("refresh: %d new or reprocessed scenes -> version %d", len(new), version)
    else:
        s_hash = scenes_hash(all_units)
        if man is not None:
            if man.get("config_hash") == config_hash and man.get("scenes_hash") == s_hash and not overwrite:
                log.info("%s is up to date (same config and scenes): nothing to do", out / "manifest.json")
                shutil.rmtree(out / "_work", ignore_errors=True)  # killed after publishing, before clean-up
                summary.up_to_date = True
                summary.chips = man.get("summary", {}).get("chips", {})
                return
            if not overwrite:
                raise OutputError(
                    f"{str(out)!r} holds a dataset built with another config or scene set; "
                    "pass --overwrite to rebuild it (cubes are reused), use pipeline.refresh to add new scenes, "
                    "or choose another --output"
                )
        units, version = all_units, 1
    s_hash = scenes_hash(units)
    out.mkdir(parents=True, exist_ok=True)
    state = WorkState(out)
    if not state.matches(config_hash, s_hash, version):
        if state.data:
            log.info("discarding an unfinished build with another config/scene set in %s", state.dir)
        state.reset(config_hash, s_hash, version)
    else:
        log.info("resuming the unfinished build in %s", state.dir)
    if man is not None and not refresh:  # --overwrite: the old manifest must not describe new shards
        (out / "manifest.json").unlink(missing_ok=True)
        for spec_dir in man.get("datasets", {}):
            shutil.rmtree(out / spec_dir, ignore_errors=True)
        shutil.rmtree(out / "stats", ignore_errors=True)
        for old in (out / "cube").glob("v*"):
            if old.name != _vdir(1):
                shutil.rmtree(old, ignore_errors=True)
        man = None

    source = {"catalog": result.catalog, "collection": result.collection}
    if cfg.sign:
        patch_url = make_patch_url(cfg.sign, cfg.token_url)
    else:
        patch_url = make_patch_url(src.sign, src.token_url) if src else None
    failed: dict[str, str] = state.data.setdefault("failed", {})  # unit id -> reason, kept across resumes
    t_cubes = time.monotonic()
    gdal_env = {**GDAL_CLOUD_ENV, **(src.gdal_env if src else {})}
    with _dask_client(cfg):
        _clear_http_caches()  # a long-lived process must not answer from an earlier build's cache
        for u in tqdm(units, desc="cubes", unit="grid", disable=None):
            if u.id in failed:
                continue  # decided in an earlier attempt of this build: keep the enumeration stable
            path = cube_path(out, u, version)
            if existing_cube(path, u.cube_hash(cfg)) is not None:
                continue
            reason = _cube_with_retry(u, cfg, path, patch_url, gdal_env)
            _clear_http_caches()
            if reason:
                failed[u.id] = reason
                state.save()
                log.warning("skipping %s (%d scene(s)): %s", u.id, len(u.scenes), reason)
                if cfg.fail_fast:
                    raise ScenesFailed(f"{u.scenes[0].id}: {reason} (--fail-fast; run again without it to skip and go on)")
    _remove_stale_cubes(out, units, version)
    log.info("cubes: %d grid(s) in %.1f s", len(units), time.monotonic() - t_cubes)
    summary.failed = {sc.id: failed[u.id] for u in units if u.id in failed for sc in u.scenes}
    units = [u for u in units if u.id not in failed]

    # One thread per dataset: cube decoding, quality masks, histograms and sha256 release the
    # GIL, so the passes over the cubes overlap on the cores (each dataset's order is unchanged).
    t_tiles = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=max(1, min(len(cfg.tiling), cfg.workers or os.cpu_count() or 1))) as ex:
        futures = {spec.name: ex.submit(_write_dataset, out, spec, cfg, units, state, summary, source, version)
                   for spec in cfg.tiling}
        added: dict[str, Any] = {name: f.result() for name, f in futures.items()}
    log.info("tiles and shards: %d dataset(s) in %.1f s", len(added), time.monotonic() - t_tiles)
    summary.bytes = sum(sh["bytes"] for d in added.values() for sp in d["splits"].values() for sh in sp["shards"])
    manifest = _manifest(cfg, man if refresh else None, version, s_hash, result, units, added, summary, out)
    if not units:
        raise ScenesFailed(f"every scene failed ({len(summary.failed)}); nothing published; first: "
                           + next(iter(summary.failed.values()), "?"))
    write_json_atomic(out / "manifest.json", manifest)
    shutil.rmtree(state.dir, ignore_errors=True)
    summary.version = version


def _cube_with_retry(u: Unit, cfg: BuildConfig, path: Path, patch_url: Any, gdal_env: dict[str, Any]) -> str:
    """Build one grid's cube, retrying transient failures with exponential backoff.

    Returns '' on success, else the reason the grid's scenes are skipped. Contradictory
    metadata (`SceneError`) is not retried: it will not heal.
    """
    last: BaseException | None = None
    for attempt in range(cfg.retries + 1):
        try:
            for sc in u.scenes:
                check_scene_assets(sc, patch_url=patch_url, gdal_env=gdal_env)
            write_cube(load_unit(u, cfg, patch_url=patch_url, gdal_env=gdal_env), path, cfg)
            return ""
        except SceneError as e:
            return e.reason
        except Exception as e:  # HTTP errors, resets, truncated files: GDAL/odc-stac raise many types
            last = e
            signer = getattr(patch_url, "__self__", None)
            if signer is not None:
                # an expired or revoked signature (HTTP 403) often reaches us wrapped by Dask as a
                # bare "read failed": sign again before every retry, it costs one token request
                signer.token(force=True)
            _clear_http_caches()
            if attempt < cfg.retries:
                delay = cfg.retry_backoff_s * 2**attempt
                log.info("%s: attempt %d failed (%s); retrying in %.1f s", u.id, attempt + 1, _short(e), delay)
                time.sleep(delay)
    return f"read failed after {cfg.retries + 1} attempts: {_short(last)}"


def _clear_http_caches() -> None:
    """Close cached COG handles and clear GDAL's HTTP cache, here and on every Dask worker
    (before a retry, and after each grid so memory does not grow with the scene count)."""
    from pipeline.native_read import close_all

    def clear() -> None:
        close_all()
        clear_gdal_http_cache()
        trim_heap()

    clear()
    try:
        from distributed import get_client

        get_client().run(clear)
    except (ValueError, OSError):  # no client, or workers in this process already cleared
        pass


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`).

    A grid's blocks (~28 MB each) fall under glibc's adaptive mmap threshold once one has
    been freed, so they come from per-thread arenas that keep the pages after `free`;
    without trimming, the process's RSS crept up by ~90 MB per doubling of the scene count
    (benchmark 2). A no-op where glibc is not the allocator.
    """
    import ctypes

    from pipeline.zarr_chunks import release_recycled

    release_recycled()  # the tiling's recycled block buffers go first
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _short(e: BaseException | None) -> str:
    from pipeline.signing import strip_query

    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    # never let a signed URL (token in the query) reach a log or the manifest
    return re.sub(r"https?://\S+", lambda m: strip_query(m.group(0)), text)


def _vdir(version: int) -> str:
    return f"v{version:04d}"


def _check_scheduler(address: str) -> None:
    from distributed import Client

    try:
        Client(address, timeout="10s").close()
    except OSError as e:
        raise OutputError(f"cannot reach the Dask scheduler {address!r}: {e}") from None


@contextlib.contextmanager
def _dask_client(cfg: BuildConfig) -> Iterator[Any]:
    """A Dask client for the cube stage: an existing cluster (`scheduler`), or a LocalCluster
    sized to the machine (threads in this process: GDAL releases the GIL, and no pickling of
    chunks between processes). GDAL settings travel with each read task (`load_unit`)."""
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="20s")
        except OSError as e:
            raise OutputError(f"cannot reach the Dask scheduler {cfg.scheduler!r}: {e}") from None
        log.info("Dask: using the cluster at %s (%d workers)", cfg.scheduler, len(client.scheduler_info()["workers"]))
        cluster = None
    else:
        import dask

        threads = cfg.workers or os.cpu_count() or 1
        # No statistical profiler on our own cluster: it samples every thread's stack each
        # 10 ms for a dashboard nobody sees here (measured: ~1 CPU-s less per full scene)
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _remove_stale_cubes(out: Path, units: list[Unit], version: int) -> None:
    keep = {cube_path(out, u, version).name for u in units}
    for p in (out / "cube" / _vdir(version)).glob("*.zarr*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _write_dataset(
    out: Path, spec: TilingSpec, cfg: BuildConfig, units: list[Unit], state: WorkState,
    summary: BuildSummary, source: dict[str, Any], version: int,
) -> dict[str, Any]:
    """Tile every unit for one spec and write its shards, resumably."""
    import xarray as xr

    with state.lock:
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
                save_hist(hp, hist)
            with state.lock:
                w = ds_state["writers"][split]
                w["shards"].append(rec.to_json())
                w["index"] = writers[split].index
                w["start"] = list(pos)  # the sample being written now opens the next shard
                state.save()
        return on_close

    for split in SPLITS:
        w = ds_state["writers"][split]
        writers[split] = ShardWriter(
            out, spec.name, f"{split}-{_vdir(version)}", cfg.shards.max_bytes, cfg.shards.max_samples,
            index=w["index"], with_hist=(split == "train"), on_close=make_on_close(split),
        )
    if not ds_state["done"]:
        # remove shards beyond the checkpoint (written after it, before a kill) and temp files
        for split in SPLITS:
            d = out / spec.name
            for p in d.glob(f"{split}-{_vdir(version)}-*.tar*") if d.exists() else []:
                idx = int(p.name.split("-")[-1].split(".")[0])
                if p.name.endswith(".tmp") or idx >= ds_state["writers"][split]["index"]:
                    p.unlink()
        restart_unit = min(tuple(ds_state["writers"][s]["start"]) for s in SPLITS)[0]
        unit_dropped: dict[str, dict[str, int]] = ds_state["unit_dropped"]
        for ui in tqdm(range(restart_unit, len(units)), desc=spec.name, unit="grid", disable=None):
            u = units[ui]
            cube = xr.open_zarr(cube_path(out, u, version), consolidated=False)
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
            with state.lock:
                unit_dropped[str(ui)] = dict(dropped)
            del cube
            trim_heap()
        pos[0], pos[1] = len(units), 0
        for split in SPLITS:
            writers[split].close_shard()
        with state.lock:
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
    hist = np.zeros((len(sensor().band_names), N_BINS), dtype=np.int64)
    for sh in splits["train"]["shards"]:
        hist += load_hist(state.hist_path(sh["path"]))
    # this version's train histogram is kept: statistics of any version = sum of versions <= it
    hp = out / "stats" / f"{spec.name}-{_vdir(version)}.npz"
    hp.parent.mkdir(parents=True, exist_ok=True)
    save_hist(hp, hist)
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
        "dropped": dict(dropped_total),
    }


def _manifest(
    cfg: BuildConfig, prev: dict[str, Any] | None, version: int, s_hash: str, result: SearchResult,
    units: list[Unit], added: dict[str, Any], summary: BuildSummary, out: Path,
) -> dict[str, Any]:
    """The new manifest: the previous versions plus this one, and the cumulative view.

    `datasets` (what the trainer reads by default) holds every shard of every version and
    the statistics over all of them; `versions[i]` lists what version i added, with the
    statistics as of that version, so a trainer can pin one.
    """
    s = sensor()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    grid_of = {sc.id: u.id for u in units for sc in u.scenes}
    new_items = [
        {
            "id": sc.id,
            "collection": sc.collection,
            "datetime": sc.datetime,
            "tile": sc.tile,
            "crs": f"EPSG:{sc.epsg}",
            "processing_baseline": sc.harmonisation.processing_baseline,
            "rule": sc.harmonisation.rule,
            "scl": sc.has_scl,
            "used": sc.id in grid_of,
            "grid": grid_of.get(sc.id),
            "version": version,
        }
        for sc in result.scenes
        if sc.id in grid_of or sc.id in summary.failed or prev is None
    ]
    for it in new_items:
        if it["id"] in summary.failed:
            it["failed"] = summary.failed[it["id"]]
    versions = list(prev.get("versions", [])) if prev else []
    entry: dict[str, Any] = {
        "version": version,
        "created": now,
        "config_hash": cfg.hash(),
        "scenes_hash": s_hash,
        "items": sorted(grid_of),
        "failed": [{"id": k, "reason": v} for k, v in sorted(summary.failed.items())],
        "datasets": {},
    }
    for name, d in added.items():
        stats = _stats_upto(out, name, version)
        entry["datasets"][name] = {
            "splits": d["splits"],
            "dropped": d["dropped"],
            "stats": stats,
        }
    versions.append(entry)
    datasets: dict[str, Any] = {}
    for name, d in added.items():
        splits = {sp: {"num_samples": 0, "shards": []} for sp in SPLITS}
        dropped: Counter[str] = Counter()
        for v in versions:
            vd = v["datasets"].get(name)
            if vd is None:
                continue
            dropped.update(vd.get("dropped", {}))
            for sp in SPLITS:
                splits[sp]["shards"] += vd["splits"][sp]["shards"]
                splits[sp]["num_samples"] += vd["splits"][sp]["num_samples"]
        datasets[name] = {
            **{k: v for k, v in d.items() if k not in ("splits", "dropped")},
            "splits": splits,
            "stats": entry["datasets"][name]["stats"],
            "dropped": dict(dropped),
        }
    items = (list(prev.get("items", [])) if prev else []) + new_items
    used_ids = [it["id"] for it in items if it.get("used")]
    chips = {name: {sp: d["splits"][sp]["num_samples"] for sp in SPLITS} for name, d in datasets.items()}
    return {
        "format": FORMAT,
        "software_version": __version__,
        "created": (prev or {}).get("created", now),
        "updated": now,
        "latest_version": version,
        "config": cfg.recorded(),
        "config_hash": cfg.hash(),
        "layout_hash": cfg.layout_hash(),
        "scenes_hash": scenes_hash(ids=used_ids),
        "bands": s.band_names,
        "dtype": "uint16",
        "value_scale": s.scale,
        "nodata": s.nodata,
        "source": {"catalog": result.catalog, "collection": result.collection},
        "datasets": datasets,
        "versions": versions,
        "scenes": {
            "found": summary.found,
            "used": summary.used - len(summary.failed),
            "rejected": dict(summary.rejected),
            "failed": len(summary.failed),
        },
        "items": items,
        "summary": {"chips": chips, "bytes": summary.bytes, "seconds": round(time.monotonic() - summary.t0, 2)},
    }


def _stats_upto(out: Path, name: str, version: int) -> dict[str, Any] | None:
    hist = None
    for v in range(1, version + 1):
        p = out / "stats" / f"{name}-{_vdir(v)}.npz"
        if p.is_file():
            h = load_hist(p)
            hist = h if hist is None else hist + h
    if hist is None or hist.sum() == 0:
        return None
    return stats_from_histogram(hist)


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
