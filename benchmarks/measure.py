"""Measuring tools shared by the benchmarks: the floor, process-tree memory, timing.

The *floor* of a build is what no implementation can avoid: decoding every pixel of the
scene's COGs (rasterio/GDAL on all cores) plus writing as many bytes as the finished
dataset holds, sequentially, with fsync (through the page cache; the same write with
O_DIRECT is measured too, as a stricter floor). Everything here measures; nothing here builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_S = 0.05  # process-tree RSS sampling period


def tree_rss(proc: psutil.Process) -> int:
    """Sum of the RSS of `proc` and all its descendants (bytes); vanished processes count 0."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


@dataclass(frozen=True)
class Run:
    """One timed subprocess: wall seconds, peak RSS of its whole process tree, exit code, output tail."""

    seconds: float
    peak_rss: int
    returncode: int
    output: str


def run_tree(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
             tail: int = 4000) -> Run:
    """Run `cmd`, polling the RSS of its process tree every 50 ms; wall time includes start-up.
    `output` keeps the last `tail` characters (0: all of it)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
    proc = psutil.Process(child.pid)
    peak = 0
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(child.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    child.wait()
    seconds = time.perf_counter() - t0
    reader.join(timeout=5)
    text = "".join(chunks)
    return Run(seconds, peak, child.returncode, text[-tail:] if tail else text)


def cog_files(scene_dirs: Iterable[Path]) -> list[Path]:
    """Every band COG of the scenes (12 bands + SCL each)."""
    return sorted(p for d in scene_dirs for p in Path(d).glob("*.tif"))


def decode_seconds(files: Sequence[Path], *, repeats: int = 3) -> tuple[float, int]:
    """Fastest of `repeats` full decodes of every file on all cores; returns (seconds, pixels).

    Two strategies, the faster one counts: a thread pool over files (GDAL releases the GIL),
    and files one by one with GDAL's own multi-threaded decoding (GDAL_NUM_THREADS=ALL_CPUS).
    """
    import rasterio

    def read(path: Path) -> int:
        with rasterio.open(path) as src:
            return int(src.read(1).size)

    best = float("inf")
    pixels = 0
    workers = os.cpu_count() or 1
    for _ in range(repeats):
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
            t = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                pixels = sum(pool.map(read, files))
            best = min(best, time.perf_counter() - t)
            t = time.perf_counter()
            pixels = sum(map(read, files))
            best = min(best, time.perf_counter() - t)
    return best, pixels


def write_seconds(n_bytes: int, directory: Path, *, direct: bool = False, block: int = 8 << 20) -> float:
    """Write `n_bytes` sequentially to a new file in `directory`, fsync, close; seconds taken.

    `direct=False` is the issue's floor: a plain write through the page cache. `direct=True`
    writes around the page cache (O_DIRECT), as the pipeline writes its shards: here 0.9 s
    per GB against 2.8 s buffered, where copying into fresh page-cache pages is slow; it is
    reported as a stricter floor. inf where the filesystem refuses O_DIRECT."""
    import mmap

    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(block))
    path = Path(directory) / f".floor-write-{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        t = time.perf_counter()
        fd = os.open(path, flags, 0o644)
        try:
            left = n_bytes
            while left > 0:  # whole blocks (O_DIRECT lengths must be aligned), trimmed below
                left -= os.write(fd, buf)
            os.ftruncate(fd, n_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t
    except OSError:
        if direct:
            return float("inf")
        raise
    finally:
        path.unlink(missing_ok=True)


def tree_bytes(root: Path) -> int:
    """Bytes of every file under `root` (the finished dataset: shards, cube, manifest)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def sequential_read_mb_s(files: Sequence[Path], *, block: int = 8 << 20) -> float:
    """Plain sequential read of `files` (page cache as it is), MB/s: the shard-reading floor."""
    n = 0
    t = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(block):
                n += len(chunk)
    return n / 1e6 / (time.perf_counter() - t)


def python() -> str:
    return sys.executable
