"""The build: the client plans and publishes, the Dask workers do the work.

    client:  search -> group scenes by grid -> plan units -> pre-flight on the workers
             -> submit one task per unit (bounded window) -> collect small records
             -> statistics from the units' histograms -> manifest.json (last, atomic)
    worker:  `units.run_unit`: COGs by URL -> cubes and shards written to the output
             location -> a completion record there -> a small record back

The same code runs on a `LocalCluster` (the default: one in-process worker on 127.0.0.1,
each unit using all cores) and on any existing cluster (`--scheduler`). The client stages
nothing and shares no disk with the workers: it reads records, never shards.

Resume: every finished unit leaves `_work/v<N>/units/<unit>.json` in the output; a run
killed at any moment is started again and submits only the units without a record. A
unit is idempotent, so a re-run one rewrites the same bytes under the same names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import __version__
from pipeline.catalogs import Source, sensor
from pipeline.config import BuildConfig
from pipeline.contract import FORMAT_ID
from pipeline.cube import GDAL_CLOUD_ENV, Grid, group_grids
from pipeline.errors import DiskFull, NoScenesFound, OutputError, ScenesFailed, disk_full_in
from pipeline.location import Location, is_url
from pipeline.locking import dataset_lock
from pipeline.names import is_safe_name
from pipeline.search import SearchResult, open_catalog, search
from pipeline.shards import N_BINS, stats_from_histogram
from pipeline.signing import make_patch_url
from pipeline import storage
from pipeline.tiling import positions, small_scene_shape
from pipeline.units import (
    SHARD_NAME, SPLITS, UnitJob, UnitRecord, WorkUnit, load_record, plan_units, probe_worker, record_rel, run_unit,
)

log = logging.getLogger(__name__)

FORMAT = FORMAT_ID
DRY_RUN_SCENES = 50  # scenes a dry run lists at the default verbosity


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
    units: int = 0  # units this run submitted (resumed units excluded)
    t0: float = field(default_factory=time.monotonic)


# -- output checks ------------------------------------------------------------------


def check_output(cfg: BuildConfig, overwrite: bool) -> Path:
    """Validate a local output location before any work; writes nothing.

    Refused: `/` and the home folder (also through a link), and a non-empty folder that holds
    no dataset of ours (no `manifest.json` of our format, no unfinished build's
    `_work/state.json`), unless `force`: a build creates, renames and deletes inside it."""
    out = cfg.output_path
    resolved = out.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise OutputError(f"--output {str(out)!r} is {str(resolved)!r}: give a folder for the dataset, not / or the home folder")
    if out.is_dir() and not _holds_our_dataset(out) and any(p.name != ".lock" for p in out.iterdir()):
        if not cfg.force:
            raise OutputError(f"--output {str(out)!r} is not empty and holds no dataset of ours (no manifest.json): "
                              "choose a new or empty folder, or pass --force to write into it anyway")
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


def _holds_our_dataset(out: Path) -> bool:
    """A manifest of our format, an unfinished build's state, or only folders a build makes
    before its manifest (cubes, statistics, the lock)."""
    from pipeline.contract import READABLE_FORMATS

    if {p.name for p in out.iterdir()} <= {"cube", "stats", "_work", ".lock"}:
        return True
    man = Location(str(out)).read_json("manifest.json")
    if isinstance(man, dict) and man.get("format") in READABLE_FORMATS:
        return True
    state = Location(str(out)).read_json("_work/state.json")
    return isinstance(state, dict) and "config_hash" in state


def scenes_hash(grids: list[Grid] | None = None, ids: list[str] | None = None) -> str:
    """Identity of a set of used scenes (sorted ids)."""
    all_ids = sorted(ids if ids is not None else [s.id for g in grids or [] for s in g.scenes])
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
    else:
        check_output(cfg, overwrite)
    loc = Location(target)
    summary = BuildSummary(output=target if remote else Path(target), dry_run=dry_run)
    if not dry_run and not cfg.scheduler:
        _warm_imports()  # for the in-process worker; a client of a remote cluster needs none of it
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
    grids, dup = group_grids(result.scenes)
    for _, reason in dup:
        summary.rejected[reason] += 1
    summary.used = sum(len(g.scenes) for g in grids)
    log.info(
        "search: %d items found, %d scenes used on %d grids, %d rejected%s",
        result.found, summary.used, len(grids), sum(summary.rejected.values()),
        "".join(f"; {n} {r}" for r, n in summary.rejected.most_common()),
    )
    if dry_run:
        _dry_run_report(cfg, grids, summary)
        summary.seconds = time.monotonic() - summary.t0
        return summary
    if cfg.scheduler:
        _check_scheduler(cfg.scheduler)  # before anything is written
    # the lock lives beside a local dataset; for a URL, in this machine's cache (one client per dataset)
    lock_dir = storage.lock_dir(target) if remote else loc.local_root
    created = not remote and not loc.local_root.exists()  # then everything in it is this run's own
    try:
        _locked_build(cfg, loc, lock_dir, result, grids, src, summary, overwrite=overwrite, refresh=refresh, wait=wait)
    except NothingWritten:
        if created:
            shutil.rmtree(loc.local_root, ignore_errors=True)  # the lock and empty folders: "nothing is written"
        raise
    summary.seconds = time.monotonic() - summary.t0
    return summary


class NothingWritten(ScenesFailed):
    """Every scene failed: nothing was published, and a folder this run created is removed."""


def _locked_build(cfg: BuildConfig, loc: Location, lock_dir: Path, result: SearchResult, grids: list[Grid],
                  src: Source | None, summary: BuildSummary, *, overwrite: bool, refresh: bool, wait: bool) -> None:
    target = loc.target
    remote = loc.remote
    with dataset_lock(lock_dir, wait=wait):
        try:
            _build_locked(cfg, loc, result, grids, src, summary, overwrite=overwrite, refresh=refresh)
        except (DiskFull, OSError) as e:
            full = disk_full_in(e) if not isinstance(e, DiskFull) else None
            if not isinstance(e, DiskFull) and full is None:
                raise
            free = ""
            if not remote:
                with contextlib.suppress(OSError):
                    free = f"; {shutil.disk_usage(loc.local_root).free / 1e6:.0f} MB free there now"
            text = str(e) if isinstance(e, DiskFull) else f"no space left on device writing {full.filename or target}"
            raise DiskFull(f"{text}{free}; nothing was published (the previous manifest, if any, is unchanged); "
                           "free space and run again to resume (finished units are kept)") from None


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
    cfg: BuildConfig, loc: Location, result: SearchResult, all_grids: list[Grid], src: Source | None,
    summary: BuildSummary, *, overwrite: bool, refresh: bool,
) -> None:
    config_hash = cfg.hash()
    man = loc.read_json("manifest.json")
    if refresh and man is not None:
        if man.get("layout_hash") != cfg.layout_hash():
            raise OutputError(
                f"{loc.target!r} was built with other tiling/quality/split/shard settings; a refresh must use the "
                "dataset's settings (omit them, or pass the same --config), or rebuild with build_shards --overwrite"
            )
        known = {it["id"]: it.get("processing_baseline") for it in man.get("items", []) if it.get("used")}
        new = [
            sc for g in all_grids for sc in g.scenes
            if sc.id not in known or known[sc.id] != sc.harmonisation.processing_baseline
        ]
        if not new:
            log.info("refresh: nothing new in %r since version %d", result.catalog, man.get("latest_version", 1))
            summary.nothing_new = True
            summary.chips = man.get("summary", {}).get("chips", {})
            loc.remove_tree("_work")
            return
        grids, _ = group_grids(new)
        version = int(man.get("latest_version", 1)) + 1
        log.info("refresh: %d new or reprocessed scenes -> version %d", len(new), version)
    else:
        s_hash = scenes_hash(all_grids)
        if man is not None:
            if man.get("config_hash") == config_hash and man.get("scenes_hash") == s_hash and not overwrite:
                log.info("%s is up to date (same config and scenes): nothing to do", loc.url("manifest.json"))
                loc.remove_tree("_work")  # killed after publishing, before clean-up
                summary.up_to_date = True
                summary.chips = man.get("summary", {}).get("chips", {})
                return
            if not overwrite:
                raise OutputError(
                    f"{loc.target!r} holds a dataset built with another config or scene set; "
                    "pass --overwrite to rebuild it (cubes are reused), use pipeline.refresh to add new scenes, "
                    "or choose another --output"
                )
        grids, version = all_grids, 1
    s_hash = scenes_hash(grids)
    units = plan_units(grids, cfg.pack_pixels)
    tag = config_hash[:8]
    state = {"config_hash": config_hash, "scenes_hash": s_hash, "version": version}
    found = loc.read_json("_work/state.json")
    if found != state:
        ours = isinstance(found, dict) and "config_hash" in found
        # A `_work/` holding nothing but (a torn write of) our state file was made by a build
        # stopped between making the folder and renaming the state file into it (Ctrl-C).
        leftover = all(re.fullmatch(r"_work/state\.json\.tmp-\d+", f) for f in loc.list("_work"))
        if loc.exists("_work") and not ours and not leftover:
            # a `_work/` with other files and without our state file is someone else's: never deleted
            raise OutputError(f"{loc.url('_work')!r} exists and was not made by a build: move it away first")
        if loc.exists("_work"):
            log.info("discarding an unfinished build with another config/scene set in %s", loc.url("_work"))
        loc.remove_tree("_work")
        loc.write_json("_work/state.json", state)
    done = {u.id: rec for u in units if (rec := load_record(loc, version, u.id)) is not None}
    todo = [u for u in units if u.id not in done]
    log.info("units: %d planned (%d grids), %d finished by an earlier run, %d to run",
             len(units), len(grids), len(done), len(todo))

    source = {"catalog": result.catalog, "collection": result.collection}
    sign, token_url = (cfg.sign, cfg.token_url) if cfg.sign else ((src.sign, src.token_url) if src else ("none", None))
    patch_url = make_patch_url(sign or "none", token_url)
    gdal_env = {**GDAL_CLOUD_ENV, **(src.gdal_env if src else {})}
    jobs = [UnitJob(u, cfg, loc.target, version, tag, source, patch_url, gdal_env,
                    threads=(cfg.workers or os.cpu_count() or 1) if not cfg.scheduler else None) for u in todo]
    t_units = time.monotonic()
    records = dict(done)
    if jobs:
        with _dask_client(cfg) as client:
            _preflight(client, loc, _first_input(loc, todo, version), patch_url, gdal_env)
            records.update(_run_units(client, jobs, cfg.fail_fast))
    summary.units = len(jobs)
    log.info("units: %d run in %.1f s", len(jobs), time.monotonic() - t_units)

    failed_grids = {g: r for rec in records.values() for g, r in rec.failed.items()}
    ok = [g for g in grids if g.id not in failed_grids]
    summary.failed = {sc.id: failed_grids[g.id] for g in grids if g.id in failed_grids for sc in g.scenes}
    if not ok:
        loc.remove_tree("_work")  # nothing to resume: every unit ran and failed
        raise NothingWritten(f"every scene failed ({len(summary.failed)}); nothing published; first: "
                             + next(iter(summary.failed.values()), "?"))
    added = _merge_records(cfg, [records[u.id] for u in units], loc, version, summary)
    _remove_stale_cubes(loc, ok, version)
    manifest = _manifest(cfg, man if refresh else None, version, s_hash, result, ok, added, summary, loc)
    loc.write_json("manifest.json", manifest)  # the commit point: readers see the old or the new dataset
    replaced = man if overwrite and not refresh else None
    _remove_unlisted_shards(loc, manifest, version, old=replaced)
    if replaced is not None:  # the replaced dataset's later versions (names checked: the old manifest is input)
        last = replaced.get("latest_version", 1)
        for v in range(2, min(last, 9999) + 1 if isinstance(last, int) else 2):
            loc.remove_tree(f"cube/v{v:04d}")
            for spec in _own_dataset_names(replaced):
                for stale in loc.names("stats"):
                    if re.fullmatch(rf"{re.escape(spec)}-v{v:04d}(-[0-9a-f]{{8}})?\.npz", stale):
                        loc.remove(f"stats/{stale}")
    _remove_stale_stats(loc, manifest)
    loc.remove_tree("_work")
    summary.version = version


def _merge_records(cfg: BuildConfig, records: list[UnitRecord], loc: Location, version: int,
                   summary: BuildSummary) -> dict[str, Any]:
    """The datasets of this version from the unit records (in unit order): shards, counts,
    dropped reasons, and each dataset's train histogram (saved as `stats/<name>-v<N>.npz`)."""
    n_bands = len(sensor().band_names)
    added: dict[str, Any] = {}
    for spec in cfg.tiling:
        splits = {sp: {"num_samples": 0, "shards": []} for sp in SPLITS}
        dropped: Counter[str] = Counter()
        hist = np.zeros((n_bands, N_BINS), dtype=np.int64)
        for rec in records:
            d = rec.datasets.get(spec.name)
            if d is None:
                continue
            for sp in SPLITS:
                splits[sp]["shards"] += d["splits"][sp]["shards"]
                splits[sp]["num_samples"] += d["splits"][sp]["num_samples"]
            dropped.update(d.get("dropped", {}))
            hist += rec.dense_hist(spec.name, n_bands)
        # this version's train histogram is kept: statistics of any version = sum of versions <= it
        _save_hist(loc, stats_rel(spec.name, version, cfg.hash()[:8]), hist)
        summary.dropped[spec.name] = dict(dropped)
        summary.chips[spec.name] = {sp: splits[sp]["num_samples"] for sp in SPLITS}
        n = len(sensor().band_names)
        shape = [n, spec.size, spec.size] if spec.time_steps == 1 else [spec.time_steps, n, spec.size, spec.size]
        added[spec.name] = {
            "chip_size": spec.size, "gsd": spec.gsd, "time_steps": spec.time_steps, "overlap": spec.overlap,
            "layout": "CHW" if spec.time_steps == 1 else "TCHW", "shape": shape,
            "splits": splits, "dropped": dict(dropped),
        }
    summary.bytes = sum(sh["bytes"] for d in added.values() for sp in d["splits"].values() for sh in sp["shards"])
    return added


def _save_hist(loc: Location, rel: str, hist: np.ndarray) -> None:
    """A [C, 65536] histogram, stored sparsely (a few thousand non-zero bins; 6 MB dense)."""
    nz = np.nonzero(hist)
    buf = io.BytesIO()
    np.savez(buf, shape=np.array(hist.shape), band=nz[0].astype(np.int16), value=nz[1].astype(np.uint16), count=hist[nz])
    loc.write_bytes(rel, buf.getvalue())


def _load_hist(loc: Location, rel: str) -> np.ndarray | None:
    try:
        data = loc.read_bytes(rel)
    except FileNotFoundError:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        hist = np.zeros(tuple(z["shape"]), dtype=np.int64)
        hist[z["band"].astype(np.int64), z["value"].astype(np.int64)] = z["count"]
    return hist


def _run_units(client: Any, jobs: list[UnitJob], fail_fast: bool) -> dict[str, UnitRecord]:
    """Submit the unit tasks (at most two per worker thread in flight, more as they finish)
    and collect their records. A task that fails outright (its worker lost more than Dask
    allows, a bug) becomes a failed record: the build then exits 5, never 0."""
    from distributed import as_completed

    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()) or 1
    window = max(2, 2 * threads)
    queue = iter(jobs)
    by_key: dict[str, UnitJob] = {}

    def submit(job: UnitJob) -> Any:
        key = f"unit-{job.unit.id}-v{job.version:04d}-{job.tag}"
        by_key[key] = job
        # retries: a unit that raised (a lost connection mid-upload) runs once more; a lost
        # worker is Dask's own business (its tasks are rescheduled on the others)
        return client.submit(run_unit, job, key=key, retries=1, pure=False)

    inflight = as_completed([submit(j) for j in (next(queue) for _ in range(min(window, len(jobs))))],
                            loop=client.loop)
    records: dict[str, UnitRecord] = {}
    bar = tqdm(total=len(jobs), desc="units", unit="unit", disable=None)
    try:
        for fut in inflight:
            job = by_key[fut.key]
            try:
                rec = fut.result()
            except DiskFull:
                raise  # every other unit would fail the same way: stop (the caller says so, once)
            except Exception as e:  # the task itself failed: record it, never a quiet success
                from pipeline.units import short_error

                reason = f"unit task failed: {short_error(e)}"
                log.warning("%s: %s", job.unit.id, reason)
                rec = UnitRecord(job.unit.id, {}, {}, {g.id: reason for g in job.unit.grids})
            records[rec.unit] = rec
            bar.update(1)
            if fail_fast and rec.failed:
                grid_id, reason = next(iter(rec.failed.items()))
                scene = next(g for g in job.unit.grids if g.id == grid_id).scenes[0].id
                raise ScenesFailed(f"{scene}: {reason} (--fail-fast; run again without it to skip and go on)")
            nxt = next(queue, None)
            if nxt is not None:
                inflight.add(submit(nxt))
    finally:
        bar.close()
        for fut in list(inflight.futures):
            fut.cancel()
    return records


def _first_input(loc: Location, units: list[WorkUnit], version: int) -> str | None:
    """An input asset the workers will read: one of the first grid without a finished cube
    (one listing of the cube folder); None when every cube is there (re-tiling reads no COG)."""
    finished = set(loc.names(f"cube/v{version:04d}"))
    for u in units:
        for g in u.grids:
            if f"{g.id}.zarr.complete" not in finished:
                return sorted(g.scenes[0].hrefs.values())[0]
    return None


def _preflight(client: Any, loc: Location, href: str | None, patch_url: Any, gdal_env: dict[str, Any]) -> None:
    """Before any work: every worker must see what the client writes at the output, write
    and read back its own probe, and open one input asset; else one line naming what fails."""
    token = uuid.uuid4().hex
    probe = f"_work/probe-{token}"
    loc.write_bytes(probe, token.encode())
    try:
        answers = client.run(probe_worker, loc.target, probe, token, href, patch_url, gdal_env)
        problems = {w: a for w, a in answers.items() if a}
        if problems:
            worker, problem = sorted(problems.items())[0]
            raise OutputError(f"{len(problems)} of {len(answers)} Dask worker(s) cannot do the work: {worker} {problem}")
        if not answers:
            raise OutputError("the Dask cluster has no workers")
    finally:
        for rel in loc.list("_work"):
            if rel.startswith(probe):
                loc.remove(rel)


def _check_scheduler(address: str) -> None:
    from distributed import Client

    try:
        Client(address, timeout="10s", set_as_default=False).close()
    except (OSError, ValueError, TypeError) as e:
        raise OutputError(f"cannot reach the Dask scheduler {address!r}: {str(e).splitlines()[0][:200]}") from None


@contextlib.contextmanager
def _dask_client(cfg: BuildConfig) -> Iterator[Any]:
    """A Dask client: an existing cluster (`scheduler`), or a LocalCluster on 127.0.0.1.

    The local cluster is one worker thread in this process (no pickling of records, no
    second interpreter to start); each unit uses `cfg.workers` (default all) cores for its
    own work, so one unit at a time keeps memory flat. No dashboard unless asked for; then
    it listens on 127.0.0.1 only."""
    import dask
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="20s", set_as_default=False)
        except OSError as e:
            raise OutputError(f"cannot reach the Dask scheduler {cfg.scheduler!r}: {e}") from None
        log.info("Dask: using the cluster at %s (%d workers)", cfg.scheduler, len(client.scheduler_info()["workers"]))
        cluster = None
    else:
        # No statistical profiler on our own cluster: it samples every thread's stack each
        # 10 ms for a dashboard nobody sees here (measured: ~1 CPU-s less per full scene)
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            # in-process: the scheduler and worker talk over inproc:// (no socket); the workers'
            # own HTTP servers are off, and the dashboard, when asked for, binds to loopback
            # (the scheduler always serves its HTTP routes, dashboard or not: on loopback, any port)
            cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                   dashboard_address="127.0.0.1:0" if cfg.dashboard else None,
                                   worker_dashboard_address="127.0.0.1:0",
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        client = Client(cluster, set_as_default=False)
        _quiet_task_failures()
        if cfg.dashboard:
            log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class _NoComputeFailed(logging.Filter):
    """Drops distributed's "Compute Failed" dump of a unit task: the build reports every
    failure itself, once, in one line (the dump repeats it with a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def _quiet_task_failures() -> None:
    worker_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _NoComputeFailed) for f in worker_log.filters):
        worker_log.addFilter(_NoComputeFailed())


def _remove_stale_cubes(loc: Location, grids: list[Grid], version: int) -> None:
    """Cubes of this version's folder that no grid of this build uses (an earlier config's)."""
    keep = {f"{g.id}.zarr" for g in grids} | {f"{g.id}.zarr.complete" for g in grids}
    base = f"cube/v{version:04d}"
    for name in loc.names(base):  # one level: a cube's chunk files are not listed
        if name.endswith((".zarr", ".zarr.complete")) and name not in keep or ".zarr.tmp-" in name:
            if name.endswith(".complete"):
                loc.remove(f"{base}/{name}")
            else:
                loc.remove_tree(f"{base}/{name}")


def _remove_stale_stats(loc: Location, manifest: dict[str, Any]) -> None:
    """Statistics files of our naming that no version of the manifest uses (a replaced
    build's, or an interrupted one's), after the manifest is written."""
    keep = {stats_rel(name, int(v["version"]), v.get("tag")).split("/", 1)[1]
            for v in manifest["versions"] for name in manifest["datasets"]}
    for name in loc.names("stats"):
        if name not in keep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-v\d{4}(-[0-9a-f]{8})?\.npz", name):
            loc.remove(f"stats/{name}")


def _own_dataset_names(man: dict[str, Any]) -> list[str]:
    """Dataset folder names an existing manifest gives that could be ours: plain names only
    (`names.is_safe_name`). A manifest is input: `../victim` or `/abs/path` never reaches a delete."""
    datasets = man.get("datasets")
    names = list(datasets) if isinstance(datasets, dict) else []
    bad = [n for n in names if not is_safe_name(n)]
    if bad:
        log.warning("the existing manifest names %d dataset(s) that are not plain folder names (e.g. %r): "
                    "they are left alone", len(bad), str(bad[0])[:60])
    return [n for n in names if is_safe_name(n)]


def _remove_unlisted_shards(loc: Location, manifest: dict[str, Any], version: int, old: dict[str, Any] | None) -> None:
    """After the manifest is written: this build's names that it does not list (a unit's
    extra shards from a killed earlier attempt, temporary files) and, for --overwrite, the
    replaced dataset's shards. Only names of our own pattern inside the dataset folders."""
    listed = {sh["path"] for d in manifest["datasets"].values() for sp in d["splits"].values() for sh in sp["shards"]}
    folders = set(manifest["datasets"]) | set(_own_dataset_names(old or {}))
    for folder in sorted(folders):
        for rel in loc.list(folder):
            name = rel.split("/")[-1]
            m = SHARD_NAME.match(name)
            if rel in listed or m is None or rel != f"{folder}/{name}":
                continue
            if int(m.group(2)) == version or old is not None or m.group(6):
                loc.remove(rel)


def _manifest(
    cfg: BuildConfig, prev: dict[str, Any] | None, version: int, s_hash: str, result: SearchResult,
    grids: list[Grid], added: dict[str, Any], summary: BuildSummary, loc: Location,
) -> dict[str, Any]:
    """The new manifest: the previous versions plus this one, and the cumulative view.

    `datasets` (what the trainer reads by default) holds every shard of every version and
    the statistics over all of them; `versions[i]` lists what version i added, with the
    statistics as of that version, so a trainer can pin one.
    """
    s = sensor()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    grid_of = {sc.id: g.id for g in grids for sc in g.scenes}
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
        "tag": cfg.hash()[:8],  # in this version's shard and statistics file names
        "created": now,
        "config_hash": cfg.hash(),
        "scenes_hash": s_hash,
        "items": sorted(grid_of),
        "failed": [{"id": k, "reason": v} for k, v in sorted(summary.failed.items())],
        "datasets": {},
    }
    for name, d in added.items():
        stats = _stats_upto(loc, name, [*versions, entry])
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
        "source": {"catalog": result.catalog, "collection": result.collection,
                   "max_items": result.max_items, "search_capped": result.capped},
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


def stats_rel(name: str, version: int, tag: str | None) -> str:
    """`stats/<dataset>-v<N>-<tag>.npz`: tagged by the build, so an --overwrite writes its
    statistics beside the old dataset's (untagged: datasets made before tags)."""
    return f"stats/{name}-v{version:04d}" + (f"-{tag}" if tag else "") + ".npz"


def _stats_upto(loc: Location, name: str, versions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Statistics as of the last of `versions`: the sum of every version's train histogram."""
    hist = None
    for v in versions:
        tag = v.get("tag") if isinstance(v.get("tag"), str) and is_safe_name(v.get("tag")) else None
        h = _load_hist(loc, stats_rel(name, int(v["version"]), tag))
        if h is not None:
            hist = h if hist is None else hist + h
    if hist is None or hist.sum() == 0:
        return None
    return stats_from_histogram(hist)


def _dry_run_report(cfg: BuildConfig, grids: list[Grid], summary: BuildSummary) -> None:
    """Scenes found, the units planned (one task each), and the chip positions each dataset
    would have (before quality/split)."""
    units = plan_units(grids, cfg.pack_pixels)
    summary.units = len(units)
    log.info("plan: %d units of work for %d grids (one task per unit; the largest holds %d grid(s))",
             len(units), len(grids), max((len(u.grids) for u in units), default=0))
    shown = 0
    for g in grids:
        for sc in g.scenes:
            shown += 1
            # a continent's dry run lists thousands of scenes: the first ones, the rest with -v
            log.log(
                logging.INFO if shown <= DRY_RUN_SCENES else logging.DEBUG,
                "scene %s  %s  tile %s  EPSG:%d  baseline %s  rule %s  SCL %s",
                sc.id, sc.datetime, sc.tile or "?", sc.epsg, sc.harmonisation.processing_baseline,
                sc.harmonisation.rule, "yes" if sc.has_scl else "no",
            )
    if shown > DRY_RUN_SCENES:
        log.info("... and %d more scenes (-v lists them all)", shown - DRY_RUN_SCENES)
    for spec in cfg.tiling:
        n = 0
        for u in grids:
            h, w = u.shape[0] // spec.factor, u.shape[1] // spec.factor
            shape = small_scene_shape(h, w, spec.size, cfg.small_scene) or (h, w)
            stride = spec.size - spec.overlap
            per_date = len(positions(shape[0], spec.size, stride)) * len(positions(shape[1], spec.size, stride))
            n += per_date * (len(u.scenes) // spec.time_steps)
        summary.chips[spec.name] = {"positions": n}
        log.info("dataset %s: would cut up to %d chips (before quality filtering and split)", spec.name, n)
