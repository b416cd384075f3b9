"""Benchmarks of the scale-out issue: client share of the work, planning at scale, one machine.

1. **Client share**: a 4-grid build on a real cluster (a `dask scheduler` and 2 `dask worker`
   processes on this machine, 1 thread each) with `--scheduler`: CPU-seconds of the client's
   process tree (the build command and its loopback STAC server) / CPU-seconds of client +
   workers, and the speed-up that share allows at 100 workers (Amdahl: 1 / (s + (1 - s) / 100)).
2. **Planning at scale**: `--dry-run` over 1,000 grids x 10 dates of synthetic items served by a
   STAC API on loopback (`tools.stac_api`): the client's peak RSS, the units planned, and the
   tasks per unit (one `run_unit` task each: the unit's own work runs inside it).
3. **One machine**: a quarter scene at one chip size (128 px), wall time of `build_shards` against
   the plain hand-written chipper (`bench_pipeline.reference_chipper`), three alternating pairs,
   the median of their ratios.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.bench_pipeline import REPO, Scenes, build_command, reference_chipper, run_build, subset_catalog
from benchmarks.measure import python, run_tree

log = logging.getLogger(__name__)


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ClientShare:
    client_cpu_s: float
    worker_cpu_s: float
    scheduler_cpu_s: float
    seconds: float
    grids: int

    @property
    def share(self) -> float:
        return self.client_cpu_s / (self.client_cpu_s + self.worker_cpu_s)

    @property
    def speedup_bound_100(self) -> float:
        return 1.0 / (self.share + (1.0 - self.share) / 100.0)


def client_share(scenes: Scenes, work: Path, n_grids: int = 4) -> ClientShare:
    """Benchmark 1 (see the module docstring); local output on this machine's disk."""
    dask = str(Path(python()).parent / "dask")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    logs = work / "cluster-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env, stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    for i in range(2):
        procs.append(subprocess.Popen(
            [dask, "worker", addr, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}",
             "--local-directory", str(logs / f"w{i}")], env=env, stdout=open(logs / f"w{i}.log", "w"),
            stderr=subprocess.STDOUT))
    try:
        from distributed import Client

        with Client(addr, timeout="60s", set_as_default=False) as c:
            c.wait_for_workers(2, timeout=120)
        cat, bbox = subset_catalog(scenes, n_grids, work / f"catalog-{n_grids}")
        out = work / "client-share"
        cpu_workers0 = {p.pid: _cpu_of(p.pid) for p in procs[1:]}
        cpu_sched0 = _cpu_of(procs[0].pid)
        cpu_client0 = _cpu_children()
        t = time.perf_counter()
        cmd = [*build_command(cat, bbox, out), "--scheduler", addr]
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"cluster build failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        client = _cpu_children() - cpu_client0  # the build command and its waited-for STAC server
        workers = sum(_cpu_of(pid) - c0 for pid, c0 in cpu_workers0.items())
        sched = _cpu_of(procs[0].pid) - cpu_sched0
        shutil.rmtree(out, ignore_errors=True)
        return ClientShare(client, workers, sched, seconds, n_grids)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Planning:
    items: int
    grids: int
    units: int
    tasks_per_unit: int
    peak_rss: int
    seconds: float


def planning(work: Path, n_grids: int = 1000, n_dates: int = 10) -> Planning:
    """Benchmark 2: a dry run over synthetic items served on loopback (nothing is read)."""
    from tools.stac_api import COLLECTION, serve_items, synthetic_items

    items = synthetic_items(n_grids, n_dates)
    with serve_items(items) as url:
        cmd = [python(), "-m", "pipeline.build_shards", "--catalog", url, "--collection", COLLECTION,
               "--bbox", "-20,30,45,75", "--max-cloud", "100", "--dry-run", "--output", str(work / "plan")]
        run = run_tree(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, tail=0)
    if run.returncode != 0:
        raise RuntimeError(f"dry run failed (exit {run.returncode}):\n{run.output[-4000:]}")
    m = re.search(r"plan: (\d+) units of work for (\d+) grids \(one task per unit", run.output)
    if not m:
        raise RuntimeError(f"no plan line in the dry run's log:\n{run.output[-4000:]}")
    # one task per unit: `stages._run_units` submits `units.run_unit` once per unit, and the
    # unit's reads and writes run inside that task on the worker's own threads
    return Planning(len(items), int(m.group(2)), int(m.group(1)), 1, run.peak_rss, run.seconds)


@dataclass
class OneMachine:
    pipeline_s: list[float]
    chipper_s: list[float]  # the chipper as a command, like the build (interpreter start and imports included)
    chipper_inprocess_s: list[float]  # the chipper's function alone, timed inside this process
    chips: int

    @property
    def ratios(self) -> list[float]:
        return [p / c for p, c in zip(self.pipeline_s, self.chipper_s)]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def median_ratio_inprocess(self) -> float:
        return statistics.median(p / c for p, c in zip(self.pipeline_s, self.chipper_inprocess_s))


_CHIPPER = ("import sys, time; from pathlib import Path; from benchmarks.bench_pipeline import reference_chipper; "
            "t = time.perf_counter(); n = reference_chipper(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])); "
            "print(n, time.perf_counter() - t)")


def one_machine(scenes: Scenes, work: Path, size: int, pairs: int = 3) -> OneMachine:
    """Benchmark 3: one scene, 128 px chips only, against the reference chipper, alternating.

    Both are timed the same way, as commands a user runs (a fresh interpreter each); the
    chipper's own function time is reported beside it."""
    cat, bbox = subset_catalog(scenes, 1, work / "catalog-1")
    cfg = work / "one-size.yaml"
    cfg.write_text("tiling: [128]\n")
    pipe, chip, inproc = [], [], []
    n = 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for i in range(pairs):
        out = work / "one-size"
        shutil.rmtree(out, ignore_errors=True)
        run = run_build(cat, bbox, out, extra=["--config", str(cfg)])
        pipe.append(run.seconds)
        shutil.rmtree(out, ignore_errors=True)
        ref = work / "reference-128"
        t = time.perf_counter()
        done = subprocess.run([python(), "-c", _CHIPPER, str(scenes.dirs(1)[0]), str(size), str(ref)],
                              env=env, cwd=REPO, capture_output=True, text=True, check=True)
        chip.append(time.perf_counter() - t)
        n_text, inner = done.stdout.split()
        n, _ = int(n_text), inproc.append(float(inner))
        shutil.rmtree(ref, ignore_errors=True)
        log.info("one machine, pair %d: build_shards %.2f s, chipper %.2f s (%.2f s in its function)",
                 i + 1, pipe[-1], chip[-1], inproc[-1])
    return OneMachine(pipe, chip, inproc, n)


def median_pipeline_vs_floor(first_seconds: float, scenes: Scenes, work: Path, floor_seconds: float,
                             runs: int = 3) -> tuple[float, list[float]]:
    """`pipeline_vs_floor` as the median of `runs` builds (the first is benchmark 1's own)."""
    cat, bbox = subset_catalog(scenes, 1, work / "catalog-1")
    times = [first_seconds]
    for _ in range(runs - 1):
        out = work / "again"
        times.append(run_build(cat, bbox, out).seconds)
        shutil.rmtree(out, ignore_errors=True)
    return statistics.median(times) / floor_seconds, times

