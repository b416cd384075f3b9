"""The unit of work, and the task that runs it end to end on one Dask worker.

A unit is one grid (an MGRS tile with all its dates) or several small grids packed together
(up to `BuildConfig.pack_pixels` pixel-dates). Its task, `run_unit`:

    header checks -> read the COGs by URL, harmonise -> each grid's cube, written to the
    output location (local path or URL) -> tile every dataset spec (quality fractions,
    split) -> the unit's shards, written straight to the output location -> histograms
    -> the unit's completion record, written last -> a small record back to the client

Everything a unit writes is named from the unit (`<dataset>/<split>-v<N>-<tag>-<unit>-NNNNNN.tar`),
so units are independent and idempotent: a unit run twice (its worker killed, the client
restarted) writes the same bytes under the same names. Nothing goes through the client's
disk; the client gets shard names, sizes, sha256, counts, sparse histograms and failures.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BuildConfig, TilingSpec
from pipeline.cube import (
    Grid, check_scene_assets, clear_gdal_http_cache, cube_is_complete, cube_rel, cube_row_chunks, load_grid,
    open_cube, publish_cube, write_cube, write_cube_streaming,
)
from pipeline.errors import DiskFull, SceneError, disk_full_in
from pipeline.location import Location
from pipeline.shards import N_BINS, ShardRecord, ShardWriter
from pipeline.tiling import LIVE, Chip, Dropped, LiveFeed, iter_chips

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_UNREADABLE = "every chip position is nodata: its COGs could not be read or do not cover the grid"


@dataclass(frozen=True)
class WorkUnit:
    """One task's worth of grids, in id order; `id` names everything the unit writes."""

    id: str
    grids: tuple[Grid, ...]

    @property
    def scenes(self) -> tuple[Any, ...]:
        return tuple(sc for g in self.grids for sc in g.scenes)


def plan_units(grids: list[Grid], max_pixels: int) -> list[WorkUnit]:
    """Grids -> units, deterministically: a grid of at least `max_pixels` pixel-dates
    (`BuildConfig.pack_pixels`, one full MGRS tile-date by default) is its own unit; smaller
    ones are packed in id order up to that bound, so thousands of 1.2 km grids become a few
    tasks (a pack is named `pack-<hash of its grid ids>`, a unit of one grid by the grid)."""
    units: list[WorkUnit] = []
    pack: list[Grid] = []
    size = 0

    def flush() -> None:
        if pack:
            ids = [g.id for g in pack]
            name = ids[0] if len(ids) == 1 else "pack-" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:8]
            units.append(WorkUnit(name, tuple(pack)))

    for g in sorted(grids, key=lambda g: g.id):
        px = g.shape[0] * g.shape[1] * len(g.scenes)
        if px >= max_pixels:
            units.append(WorkUnit(g.id, (g,)))
            continue
        if pack and size + px > max_pixels:
            flush()
            pack, size = [], 0
        pack.append(g)
        size += px
    flush()
    return sorted(units, key=lambda u: u.id)


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs to run one unit (pickled to it; no handle on the client)."""

    unit: WorkUnit
    cfg: BuildConfig
    target: str  # the dataset's location: a local path every worker sees, or a URL
    version: int
    tag: str  # the build's tag in shard names (its config hash): an --overwrite never reuses a name
    source: dict[str, Any]  # recorded in every sample
    patch_url: Any = None  # href signer (Planetary Computer), or None
    gdal_env: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None  # local threads for the unit's own work; None: this worker's share of its machine


@dataclass
class UnitRecord:
    """What a unit returns to the client (and records as its completion in the output)."""

    unit: str
    datasets: dict[str, dict[str, Any]]  # name -> {"splits": {split: {num_samples, shards}}, "dropped": {reason: n}}
    hist: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # name -> sparse train histogram (band, value, count)
    failed: dict[str, str]  # grid id -> reason
    seconds: float = 0.0

    def dense_hist(self, name: str, n_bands: int) -> np.ndarray:
        out = np.zeros((n_bands, N_BINS), dtype=np.int64)
        if name in self.hist:
            b, v, c = self.hist[name]
            out[b.astype(np.int64), v.astype(np.int64)] = c
        return out


def record_rel(version: int, unit_id: str) -> str:
    return f"_work/v{version:04d}/units/{unit_id}.json"


def shard_prefix(split: str, version: int, tag: str, unit_id: str) -> str:
    return f"{split}-v{version:04d}-{tag}-{unit_id}"


#: what `shard_prefix` names, with its index and temporary suffixes (the clean-up's pattern)
SHARD_NAME = re.compile(r"^(train|val)-v(\d{4})-([0-9a-f]{8})-(.+)-(\d{6})\.tar(\.tmp-\d+)?$")


# -- the task ---------------------------------------------------------------------------


def run_unit(job: UnitJob) -> UnitRecord:
    """Build one unit end to end on this worker; see the module docstring.

    Raises `DiskFull` (ENOSPC where it writes: the whole build stops, it will not heal by
    retrying); every other failure of a grid is retried, then recorded in the record."""
    try:
        return _run_unit(job)
    except BaseException as e:
        full = disk_full_in(e)
        if full is None:
            raise
        where = full.filename or job.target
        raise DiskFull(f"no space left on device writing {where} (unit {job.unit.id})") from None


def _run_unit(job: UnitJob) -> UnitRecord:
    t0 = time.monotonic()
    loc = Location(job.target)
    threads = job.threads or _worker_share()
    scratch = Path(tempfile.mkdtemp(prefix=f"spectralgpt-{job.unit.id[:40]}-")) if loc.remote else None
    try:
        if _streamable(job, loc):
            try:
                datasets, hists, empty = _run_streamed(job, loc, scratch, threads)
                failed = {g: _UNREADABLE for g in empty}
                rec = UnitRecord(job.unit.id, datasets, hists, failed, round(time.monotonic() - t0, 2))
                save_record(loc, job.version, rec)
                return rec
            except SceneError:
                pass  # contradictory metadata: the path below records it without retrying
            except Exception as e:  # a read failed mid-way: the path below retries from scratch
                if disk_full_in(e):
                    raise
                log.info("%s: %s; retrying the grid", job.unit.id, short_error(e))
                clear_caches()
        failed: dict[str, str] = {}
        cubes: list[tuple[Grid, str]] = []
        for grid in job.unit.grids:
            reason, url = _ensure_cube(grid, job, loc, scratch, threads)
            release_memory()
            if reason:
                failed[grid.id] = reason
                log.warning("skipping %s (%d scene(s)): %s", grid.id, len(grid.scenes), reason)
                if job.cfg.fail_fast:
                    break
                continue
            cubes.append((grid, url))
        if job.cfg.fail_fast and failed:
            datasets: dict[str, dict[str, Any]] = {}
            hists: dict[str, Any] = {}
        else:
            datasets, hists, empty = _tile_unit(cubes, job, loc, scratch)
            for grid_id in empty:  # read "successfully", but nothing in it: never a quiet success
                failed[grid_id] = _UNREADABLE
        rec = UnitRecord(job.unit.id, datasets, hists, failed, round(time.monotonic() - t0, 2))
        save_record(loc, job.version, rec)
        return rec
    finally:
        release_memory()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _worker_share() -> int:
    """Threads for one unit on this worker: the machine's cores divided among the units the
    worker runs at once (its thread count), so a 4-thread worker on 8 cores gives each 2."""
    cores = os.cpu_count() or 1
    try:
        from distributed import get_worker

        return max(1, cores // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError):
        return cores


def _streamable(job: UnitJob, loc: Location) -> bool:
    """Whether the unit's cube is written and tiled at once (`_run_streamed`): one grid of
    several chunk-row blocks, single-date datasets only (they walk the cube date by date, in
    the order it is written), no chip bigger than the grid, and no finished cube to reuse."""
    cfg = job.cfg
    if len(job.unit.grids) != 1 or any(s.time_steps != 1 for s in cfg.tiling):
        return False
    grid = job.unit.grids[0]
    if grid.shape[0] <= cube_row_chunks(cfg)[1]:
        return False
    if any(min(grid.shape) < s.size * s.factor for s in cfg.tiling):
        return False
    return not cube_is_complete(loc, cube_rel(grid, job.version), grid.cube_hash(cfg))


def _run_streamed(job: UnitJob, loc: Location, scratch: Path | None,
                  threads: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any], list[str]]:
    """One grid's cube written chunk row by chunk row while its tiling consumes the rows from
    memory (`tiling.LiveFeed`): the cube is not read back, and the tiling overlaps the reads.
    The cube is published (renamed or uploaded, marker last) once both are done."""
    cfg = job.cfg
    grid = job.unit.grids[0]
    rel = cube_rel(grid, job.version)
    store = (scratch / rel) if scratch is not None else loc.local_root / f"{rel}.tmp-{os.getpid()}"
    for sc in grid.scenes:
        check_scene_assets(sc, patch_url=job.patch_url, gdal_env=job.gdal_env)
    ych, load_y = cube_row_chunks(cfg)
    log.debug("%s: cube written and tiled at once (rows from memory)", grid.id)
    feed = LiveFeed(max_pending=max(2, 2 * load_y // ych))  # two row blocks of the writer
    LIVE[str(store)] = feed
    tiler: cf.Future[Any] | None = None
    try:
        with cf.ThreadPoolExecutor(1, thread_name_prefix="tile-live") as ex:
            def start() -> None:
                nonlocal tiler
                tiler = ex.submit(_tile_unit, [(grid, str(store))], job, loc, scratch)
                tiler.add_done_callback(lambda _: feed.close())  # a failed tiling must not block the writer
            try:
                counts = write_cube_streaming(load_grid(grid, cfg, patch_url=job.patch_url, gdal_env=job.gdal_env),
                                              store, cfg, threads, feed, on_ready=start)
                feed.finish()
            except BaseException as e:
                feed.fail(e)
                if tiler is not None:
                    with contextlib.suppress(BaseException):
                        tiler.result()
                raise
            assert tiler is not None
            result = tiler.result()
    except BaseException:
        shutil.rmtree(store, ignore_errors=True)
        raise
    finally:
        LIVE.pop(str(store), None)
        feed.close()
    publish_cube(loc, rel, store, grid.cube_hash(cfg), counts)
    return result


def _ensure_cube(grid: Grid, job: UnitJob, loc: Location, scratch: Path | None, threads: int) -> tuple[str, str]:
    """('', cube URL to tile from) once the grid's cube is complete in the output (reused when
    verified, else built with retries); (reason, '') when the grid's scenes are skipped.

    Contradictory metadata (`SceneError`) is not retried: it will not heal."""
    cfg = job.cfg
    rel = cube_rel(grid, job.version)
    cube_hash = grid.cube_hash(cfg)
    if cube_is_complete(loc, rel, cube_hash):
        return "", loc.url(rel)
    last: BaseException | None = None
    for attempt in range(cfg.retries + 1):
        store = (scratch / rel) if scratch is not None else loc.local_root / f"{rel}.tmp-{os.getpid()}"
        try:
            for sc in grid.scenes:
                check_scene_assets(sc, patch_url=job.patch_url, gdal_env=job.gdal_env)
            counts = write_cube(load_grid(grid, cfg, patch_url=job.patch_url, gdal_env=job.gdal_env), store, cfg, threads)
            publish_cube(loc, rel, store, cube_hash, counts)
            # remote: tile from the worker's own copy (already uploaded); local: from the output
            return "", str(store) if scratch is not None else loc.url(rel)
        except SceneError as e:
            return e.reason, ""
        except Exception as e:  # HTTP errors, resets, truncated files: GDAL/odc-stac raise many types
            last = e
            shutil.rmtree(store, ignore_errors=True)
            if disk_full_in(e):
                raise
            signer = getattr(job.patch_url, "__self__", None)
            if permanent_error(e) and not (signer is not None and "403" in str(e)):
                return f"unreadable (permanent, not retried): {short_error(e)}", ""
            if signer is not None:
                # an expired or revoked signature (HTTP 403) often reaches us as a bare
                # "read failed": sign again before every retry, it costs one token request
                signer.token(force=True)
            clear_caches()
            if attempt < cfg.retries:
                delay = cfg.retry_backoff_s * 2**attempt
                log.info("%s: attempt %d failed (%s); retrying in %.1f s", grid.id, attempt + 1, short_error(e), delay)
                time.sleep(delay)
    return f"read failed after {cfg.retries + 1} attempts: {short_error(last)}", ""


def _tile_unit(
    cubes: list[tuple[Grid, str]], job: UnitJob, loc: Location, scratch: Path | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], list[str]]:
    """Every dataset spec tiled over the unit's cubes, one thread per spec (cube decoding,
    masks, histograms and sha256 release the GIL; the specs share decoded chunk rows)."""
    specs = list(job.cfg.tiling)
    with cf.ThreadPoolExecutor(max_workers=max(1, len(specs)), thread_name_prefix="tile") as ex:
        results = list(ex.map(lambda spec: _tile_spec(spec, cubes, job, loc, scratch), specs))
    datasets = {spec.name: r[0] for spec, r in zip(specs, results)}
    hists = {spec.name: r[1] for spec, r in zip(specs, results) if r[1] is not None}
    # a grid is unreadable when, for every spec, it had positions and all of them were empty
    empty = [g.id for g, _ in cubes if all(r[2].get(g.id) for r in results)]
    return datasets, hists, empty


def _tile_spec(
    spec: TilingSpec, cubes: list[tuple[Grid, str]], job: UnitJob, loc: Location, scratch: Path | None,
) -> tuple[dict[str, Any], Any, dict[str, bool]]:
    """One spec over the unit's cubes: (dataset entry, sparse train histogram, grid id ->
    "every position was entirely nodata")."""
    cfg = job.cfg
    hist: np.ndarray | None = None
    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}

    def on_close(split: str) -> Any:
        def record(rec: ShardRecord, h: np.ndarray | None) -> None:
            nonlocal hist
            shards[split].append(rec.to_json())
            if h is not None:
                hist = h if hist is None else hist + h
        return record

    writers = {
        split: ShardWriter(loc, spec.name, shard_prefix(split, job.version, job.tag, job.unit.id),
                           cfg.shards.max_bytes, cfg.shards.max_samples, with_hist=(split == "train"),
                           on_close=on_close(split), scratch=scratch)
        for split in SPLITS
    }
    dropped: Counter[str] = Counter()
    all_empty: dict[str, bool] = {}
    try:
        for grid, url in cubes:
            cube = open_cube(url)
            positions = empty = 0
            for item in iter_chips(cube, spec, cfg, job.source):
                positions += 1
                if isinstance(item, Dropped):
                    dropped[item.reason] += 1
                    empty += item.empty
                    continue
                assert isinstance(item, Chip)
                writers[item.split].write(item.key, item.data, item.meta)
            all_empty[grid.id] = positions > 0 and empty == positions
            del cube
        for w in writers.values():
            w.close_shard()
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise
    entry = {
        "splits": {s: {"num_samples": sum(r["num_samples"] for r in shards[s]), "shards": shards[s]} for s in SPLITS},
        "dropped": dict(dropped),
    }
    sparse = None
    if hist is not None:
        hist[:, 0] = 0  # 0 = nodata
        nz = np.nonzero(hist)
        sparse = (nz[0].astype(np.int16), nz[1].astype(np.uint16), hist[nz])
    return entry, sparse, all_empty


# -- completion records -------------------------------------------------------------------


def save_record(loc: Location, version: int, rec: UnitRecord) -> None:
    """The unit's histograms, then its JSON record: the record's presence means complete."""
    rel = record_rel(version, rec.unit)
    for name, (b, v, c) in rec.hist.items():
        buf = io.BytesIO()
        np.savez(buf, band=b, value=v, count=c)
        loc.write_bytes(rel.replace(".json", f".{name}.npz"), buf.getvalue())
    loc.write_json(rel, {"unit": rec.unit, "datasets": rec.datasets, "failed": rec.failed,
                         "seconds": rec.seconds, "hist": sorted(rec.hist)})


def load_record(loc: Location, version: int, unit_id: str) -> UnitRecord | None:
    """The completion record of a unit finished by an earlier (killed) run, or None."""
    rel = record_rel(version, unit_id)
    data = loc.read_json(rel)
    if not isinstance(data, dict) or data.get("unit") != unit_id:
        return None
    hists = {}
    try:
        for name in data.get("hist", []):
            with np.load(io.BytesIO(loc.read_bytes(rel.replace(".json", f".{name}.npz"))), allow_pickle=False) as z:
                hists[name] = (z["band"], z["value"], z["count"])
    except (FileNotFoundError, ValueError, OSError):
        return None
    return UnitRecord(unit_id, data["datasets"], hists, data.get("failed", {}), data.get("seconds", 0.0))


# -- pre-flight -----------------------------------------------------------------------------


def probe_worker(target: str, client_probe: str, token: str, href: str | None, patch_url: Any,
                 gdal_env: dict[str, Any], dask_worker: Any = None) -> str:
    """Run on every worker before any work: '' when it can see the client's probe at the
    output, write and read back its own, and open one input asset; else what it cannot do."""
    import rasterio

    from pipeline.signing import strip_query

    loc = Location(target)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(getattr(dask_worker, "name", "") or os.getpid()))[:64]
    try:
        if loc.read_bytes(client_probe) != token.encode():
            return f"sees another file at {loc.url(client_probe)} than the client wrote"
    except FileNotFoundError:
        return (f"cannot see the output {target!r} (the client's probe file is not there: the workers do not "
                "share the client's disk); give a URL every worker can reach (s3://...) or a shared filesystem")
    except Exception as e:
        return f"cannot read the output {target!r}: {short_error(e)}"
    mine = f"{client_probe}.{name}"
    try:
        loc.write_bytes(mine, token.encode())
        if loc.read_bytes(mine) != token.encode():
            return f"cannot read back what it writes at {target!r}"
    except Exception as e:
        return f"cannot write to the output {target!r}: {short_error(e)}"
    if href:
        try:
            with rasterio.Env(**gdal_env), rasterio.open(patch_url(href) if patch_url else href):
                pass
        except Exception as e:
            return f"cannot open the input {strip_query(href)}: {short_error(e)}"
    return ""


# -- memory and caches between grids --------------------------------------------------------


def clear_caches() -> None:
    """Close cached COG handles and clear GDAL's HTTP cache in this process (before a retry,
    and after each grid so memory does not grow with the scene count)."""
    from pipeline.native_read import close_all

    close_all()
    clear_gdal_http_cache()


def release_memory() -> None:
    """Caches cleared, recycled tiling buffers dropped, freed heap handed back to the OS."""
    clear_caches()
    trim_heap()


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


#: What GDAL and the HTTP stack say when an input will not heal by asking again: a missing
#: file or object (404, no such file), or a file that is not a GeoTIFF at all
_PERMANENT = re.compile(
    r"no such file|does not exist|not recognized as (a supported|being in a supported) file format|"
    r"not a tiff|not a valid tiff|http response code: 40[0134]\b|\b40[34] (not found|forbidden)", re.I)


def permanent_error(e: BaseException) -> bool:
    """True for read errors that retrying cannot fix (see `_PERMANENT`). An HTTP 403 is not
    permanent when a signer is in play (an expired signature): the caller re-signs first."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, FileNotFoundError) or _PERMANENT.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def short_error(e: BaseException | None) -> str:
    from pipeline.signing import strip_query

    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    # never let a signed URL (token in the query) reach a log or the manifest
    return re.sub(r"https?://\S+", lambda m: strip_query(m.group(0)), text)
