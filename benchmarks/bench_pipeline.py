"""Benchmarks 1 and 2: `build_shards` on full-format scenes against the floor, and scaling.

1. One scene, search to finished shards (all 12 bands at 10 m, default chip sizes), run as
   the user runs it (`python -m pipeline.build_shards`, a subprocess: imports and the
   loopback STAC server included), divided by the floor measured in the same run (decode
   every band COG on all cores + write the finished dataset's bytes with fsync). A plain
   hand-written rasterio chipper is timed the same way as a reference.
2. The same for 1, 2 and 4 scenes: seconds per scene and the peak RSS of the whole process
   tree (build process + STAC server), which must not grow with the number of scenes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import Run, cog_files, decode_seconds, python, run_tree, tree_bytes, write_seconds

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Scenes:
    """Generated scenes: the catalog, each item's JSON path and its folder of COGs."""

    catalog: Path
    items: list[Path]
    seconds: float

    def dirs(self, n: int | None = None) -> list[Path]:
        return [p.parent for p in self.items[:n]]


def generate(out: Path, n_scenes: int, size: int, seed: int = 0) -> Scenes:
    from tools.synth import generate_scenes

    t = time.perf_counter()
    cat = generate_scenes(out, n_scenes, size, seed)
    seconds = time.perf_counter() - t
    coll = json.loads((cat.parent / "sentinel-2-c1-l2a" / "collection.json").read_text())
    items = [(cat.parent / "sentinel-2-c1-l2a" / link["href"]).resolve() for link in coll["links"] if link["rel"] == "item"]
    return Scenes(cat, items, seconds)


def subset_catalog(scenes: Scenes, n: int, out: Path) -> tuple[Path, list[float]]:
    """A static catalog of the first `n` scenes (asset hrefs absolute, pointing at the same COGs)
    and a lon/lat bbox covering them."""
    from tools.sample_catalog import collection_extent, write_static_catalog

    items = []
    for p in scenes.items[:n]:
        it = json.loads(p.read_text())
        it["links"] = []
        for a in it["assets"].values():
            a["href"] = str((p.parent / a["href"]).resolve())
        items.append(it)
    coll = json.loads((scenes.catalog.parent / "sentinel-2-c1-l2a" / "collection.json").read_text())
    coll["links"] = []
    coll["extent"] = collection_extent(items)
    cat = {k: v for k, v in json.loads(scenes.catalog.read_text()).items() if k != "links"}
    path = write_static_catalog(out, cat, [(coll, items)])
    return path, covering_bbox(items)


def covering_bbox(items: Sequence[dict[str, Any]], margin: float = 0.01) -> list[float]:
    b = np.array([it["bbox"] for it in items], dtype=float)
    return [b[:, 0].min() - margin, b[:, 1].min() - margin, b[:, 2].max() + margin, b[:, 3].max() + margin]


def build_command(catalog: Path, bbox: Sequence[float], output: Path) -> list[str]:
    return [
        python(), "-m", "pipeline.build_shards", "--catalog", str(catalog),
        "--bbox", ",".join(f"{v:.6f}" for v in bbox), "--output", str(output), "--max-cloud", "100",
    ]


def run_build(catalog: Path, bbox: Sequence[float], output: Path, extra: Sequence[str] = ()) -> Run:
    if output.exists():
        shutil.rmtree(output)
    cmd = [*build_command(catalog, bbox, output), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = run_tree(cmd, env=env, cwd=REPO)
    if run.returncode != 0:
        raise RuntimeError(f"build failed (exit {run.returncode}): {' '.join(cmd)}\n{run.output}")
    return run


# --------------------------------------------------------------------------- reference chipper


def reference_chipper(scene_dir: Path, size: int, out: Path, *, chip: int = 128, shard_bytes: int = 512 << 20) -> int:
    """The plain hand-written baseline: read every band, repeat-upsample 20/60 m to 10 m, cut
    `chip` px chips of all 12 bands, write them as `.npy` members of tar shards (fsynced).
    No masking, statistics, zarr or resume. Works in row strips so memory stays bounded.
    Returns the number of chips written."""
    import rasterio
    from rasterio.windows import Window

    from pipeline.catalogs import sensor

    bands = sensor().bands
    strip = 1536  # rows per strip: a multiple of the chip (128), of 6 (60 m) and of 512 (COG tiles)
    out.mkdir(parents=True, exist_ok=True)
    srcs = {b.name: rasterio.open(scene_dir / f"{b.name}.tif") for b in bands}
    n_chips, shard, tar, raw = 0, 0, None, None

    def read(b: Any, r0: int, r1: int) -> np.ndarray:
        f = int(b.gsd) // 10
        src = srcs[b.name]
        a = src.read(1, window=Window(0, r0 // f, src.width, -(-r1 // f) - r0 // f))
        if f > 1:
            a = np.repeat(np.repeat(a, f, axis=0), f, axis=1)
        return a[: r1 - r0, :size]

    try:
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for r0 in range(0, size - chip + 1, strip):
                r1 = min(r0 + strip, size)
                cube = np.stack(list(pool.map(lambda b: read(b, r0, r1), bands)))  # [12, rows, size]
                for r in range(0, r1 - r0 - chip + 1, chip):
                    for c in range(0, size - chip + 1, chip):
                        if tar is None:
                            raw = open(out / f"ref-{shard:06d}.tar", "wb")
                            tar = tarfile.open(fileobj=raw, mode="w")
                        buf = io.BytesIO()
                        np.save(buf, np.ascontiguousarray(cube[:, r : r + chip, c : c + chip]))
                        ti = tarfile.TarInfo(f"{r0 + r:05d}_{c:05d}.npy")
                        ti.size = buf.tell()
                        buf.seek(0)
                        tar.addfile(ti, buf)
                        n_chips += 1
                        if raw.tell() > shard_bytes:  # type: ignore[union-attr]
                            tar.close()
                            os.fsync(raw.fileno())  # type: ignore[union-attr]
                            raw.close()  # type: ignore[union-attr]
                            tar, shard = None, shard + 1
    finally:
        if tar is not None:
            tar.close()
            os.fsync(raw.fileno())  # type: ignore[union-attr]
            raw.close()  # type: ignore[union-attr]
        for s in srcs.values():
            s.close()
    return n_chips


# --------------------------------------------------------------------------- benchmarks


@dataclass
class PipelineResult:
    size: int
    synth_seconds_per_scene: float
    decode_seconds: float
    decode_mpx_s: float
    dataset_bytes: int
    write_seconds: float
    write_direct_seconds: float
    build: Run
    reference_seconds: float
    reference_chips: int
    manifest: dict[str, Any] = field(repr=False)
    output: Path = field(repr=False)

    @property
    def floor_seconds(self) -> float:
        return self.decode_seconds + self.write_seconds

    @property
    def ratio(self) -> float:
        return self.build.seconds / self.floor_seconds

    @property
    def ratio_direct(self) -> float:
        """Against the stricter floor: the dataset's bytes written with O_DIRECT."""
        return self.build.seconds / (self.decode_seconds + min(self.write_seconds, self.write_direct_seconds))


def bench_pipeline_vs_floor(scenes: Scenes, work: Path) -> PipelineResult:
    """Benchmark 1 on the first scene of `scenes`; the dataset stays in `work/one` for later benchmarks."""
    cat, bbox = subset_catalog(scenes, 1, work / "catalog-1")
    out = work / "one"
    log.info("benchmark 1: build_shards on one scene")
    build = run_build(cat, bbox, out)
    n_bytes = tree_bytes(out)
    files = cog_files(scenes.dirs(1))
    dec, px = decode_seconds(files)
    wr = write_seconds(n_bytes, work)
    wr_direct = write_seconds(n_bytes, work, direct=True)
    size = int(json.loads(scenes.items[0].read_text())["properties"]["synth:size"])
    log.info("benchmark 1: reference chipper")
    ref_out = work / "reference"
    t = time.perf_counter()
    n_ref = reference_chipper(scenes.dirs(1)[0], size, ref_out)
    ref_s = time.perf_counter() - t
    shutil.rmtree(ref_out, ignore_errors=True)
    return PipelineResult(
        size=size, synth_seconds_per_scene=scenes.seconds / len(scenes.items), decode_seconds=dec,
        decode_mpx_s=px / dec / 1e6, dataset_bytes=n_bytes, write_seconds=wr,
        write_direct_seconds=wr_direct, build=build,
        reference_seconds=ref_s, reference_chips=n_ref,
        manifest=json.loads((out / "manifest.json").read_text()), output=out,
    )


@dataclass
class ScalingPoint:
    scenes: int
    build: Run
    floor_seconds: float

    @property
    def seconds_per_scene(self) -> float:
        return self.build.seconds / self.scenes


def bench_scaling(scenes: Scenes, counts: Sequence[int], work: Path, first: PipelineResult | None) -> list[ScalingPoint]:
    """Benchmark 2: builds of the first n scenes for each n in `counts` (n = 1 reuses benchmark 1)."""
    points = []
    for n in counts:
        if n == 1 and first is not None:
            points.append(ScalingPoint(1, first.build, first.floor_seconds))
            continue
        cat, bbox = subset_catalog(scenes, n, work / f"catalog-{n}")
        out = work / f"scaling-{n}"
        log.info("benchmark 2: build_shards on %d scenes", n)
        build = run_build(cat, bbox, out)
        dec, _ = decode_seconds(cog_files(scenes.dirs(n)), repeats=1)
        floor = dec + write_seconds(tree_bytes(out), work)
        shutil.rmtree(out, ignore_errors=True)
        points.append(ScalingPoint(n, build, floor))
    return points
