"""Embeddings: does the data path keep the model busy, how fast is the GeoParquet writer, and
how good is the approximate index?

Not a test. Writes ``benchmarks/RESULTS_embed.md`` (and prints the figures):

* ``embed_rows_per_s_<preset>``: ``training.embed.embed`` (shards -> decode -> normalise ->
  encoder -> GeoParquet parts) on 128 px chips that the pipeline tiled from synthetic scenes,
  one process on this machine's CPU, against ``forward_rows_per_s_<preset>``: the same
  ``Embedder`` on in-memory normalised tensors of the same batch size, measured in the same
  run, in alternating pairs (3 for tiny, 1 for base): ``embed_vs_forward_<preset>`` is the
  median pair's ratio; required >= 0.8 (the data path must not starve the model);
* ``writer_rows_per_s`` and ``writer_bytes_per_row``: building the Arrow rows (footprints
  reprojected with PROJ, WKB) and writing one zstd part, for base-width (768) float32 vectors;
* ``hnsw_recall_at_10``: faiss HNSW (``training.embed.hnsw_top_k``) against exact numpy search
  on clustered synthetic vectors, with the build and query times of both.

Usage (repository root)::

    python -m benchmarks.bench_embed            # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

#: preset -> (batch size of both the embed run and the forward-only baseline, synthetic 1024 px
#: scenes tiled: 64 chips of 128 px each). Base runs at ~1 sample/s on 2 CPU cores: 1 scene.
PRESETS = {"tiny": (32, 8), "base": (8, 1)}
#: alternating (forward-only, embed) pairs per preset; the median pair's ratio is reported
PAIRS = {"tiny": 3, "base": 1}


def build_chips(work: Path, scenes: int = 8, size: int = 1024) -> Path:
    """128 px chips of synthetic scenes tiled by the pipeline (every chip kept); the manifest."""
    from pipeline.build_shards import main as build
    from tools.synth import generate_scenes

    work.mkdir(parents=True, exist_ok=True)
    catalog = generate_scenes(work / "scenes", scenes, size, 0)
    cfg = work / "build.yaml"
    cfg.write_text(json.dumps({"tiling": [{"size": 128, "gsd": 10}], "split": {"val_fraction": 0.0},
                               "quality": {"max_invalid": 1.0, "max_cloud": 1.0}}))
    out = work / "ds"
    rc = build(["--catalog", str(catalog), "--bbox=-180,-85,180,85", "--max-cloud", "100", "--config", str(cfg),
                "--output", str(out)])
    if rc != 0:
        raise SystemExit(f"the benchmark's dataset build failed (exit {rc})")
    return out / "manifest.json"


def forward_rate(ckpt_path: Path, batch: int, rows: int) -> float:
    """Rows/s of the Embedder alone on in-memory tensors ``[batch, 12, 128, 128]``."""
    import torch

    from training.evaluation.checkpoints import build_mae, load_checkpoint
    from training.evaluation.heads import Embedder, Encoder

    model = Embedder(Encoder(build_mae(load_checkpoint(ckpt_path), 128))).eval()
    x = torch.rand(batch, 12, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations
        t0 = time.perf_counter()
        done = 0
        while done < rows:
            model(x)
            done += batch
    return done / (time.perf_counter() - t0)


def embed_rate(ckpt_path: Path, manifest: Path, out: Path, batch: int) -> tuple[float, int]:
    from training.embed import EmbedConfig, embed

    record = embed(EmbedConfig(str(ckpt_path), str(manifest), "s128_g10m", str(out), batch_size=batch))
    rows = sum(record["rows"].values())
    return rows / record["seconds"], rows


def writer_figures(work: Path, rows: int = 20000, width: int = 768) -> dict[str, float]:
    """Rows/s and bytes/row of building and writing one part of ``rows`` rows."""
    import pyarrow.parquet as pq

    from training.embed import Part, _table

    rng = np.random.default_rng(0)
    metas = [{"key": f"32UPU_20200601_0000000{i % 10}_s128_g10m_{i // 80 * 128:05d}_{i % 80 * 128:05d}",
              "crs": "EPSG:32632", "transform": [10.0, 0.0, 300000.0 + (i % 80) * 1280, 0.0, -10.0,
                                                 5000000.0 - (i // 80) * 1280],
              "datetimes": ["2020-06-01T10:30:31Z"], "scene_ids": ["S2B_MSIL2A_20200601T103031_N0214"],
              "tile": "32UPU", "gsd": 10.0,
              "quality": {"nodata": 0.0, "invalid": 0.01, "cloud": 0.0, "shadow": 0.0, "cirrus": 0.0,
                          "snow": 0.0, "scl": True}} for i in range(rows)]
    vectors = rng.standard_normal((rows, width)).astype(np.float32)
    part = Part(0, "train", "x.tar", "s128_g10m/x.tar", rows, "s128_g10m/train/x.parquet", 1)
    t0 = time.perf_counter()
    table = _table(part, metas, vectors, 128, "s128_g10m", "float32")
    path = work / "writer.parquet"
    pq.write_table(table, path, compression="zstd", row_group_size=rows)
    seconds = time.perf_counter() - t0
    return {"writer_rows_per_s": rows / seconds, "writer_bytes_per_row": path.stat().st_size / rows,
            "writer_vector_bytes_per_row": width * 4}


def recall_figures(n: int = 100_000, dim: int = 256, queries: int = 100, k: int = 10) -> dict[str, float]:
    """Recall@k of HNSW against exact search on clustered unit vectors."""
    import faiss

    from training.embed import exact_top_k

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    vec = centres[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 128
    index.add(unit)
    build_s = time.perf_counter() - t0
    picks = rng.choice(n, queries, replace=False)
    t0 = time.perf_counter()
    _, approx = index.search(unit[picks], k)
    hnsw_s = (time.perf_counter() - t0) / queries
    t0 = time.perf_counter()
    exact = [exact_top_k(unit, unit[q], k)[0] for q in picks]
    exact_s = (time.perf_counter() - t0) / queries
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return {"hnsw_rows": n, "hnsw_dim": dim, "hnsw_recall_at_10": hits / (queries * k),
            "hnsw_build_s": build_s, "hnsw_query_ms": hnsw_s * 1e3, "exact_query_ms": exact_s * 1e3}


def run(work: Path) -> dict[str, Any]:
    from tests.helpers.eval_fixtures import write_checkpoints

    figures: dict[str, Any] = {}
    for preset, (batch, scenes) in PRESETS.items():
        manifest = build_chips(work / preset, scenes=scenes)
        ckpt = write_checkpoints(work / f"ckpt_{preset}", img_size=128, preset=preset)["safetensors"]
        pairs = []
        for i in range(PAIRS[preset]):  # alternating, so that a slow moment of the machine hits both
            fwd = forward_rate(ckpt, batch, 64 * scenes)
            rate, rows = embed_rate(ckpt, manifest, work / f"out_{preset}_{i}", batch)
            pairs.append((rate / fwd, rate, fwd))
        ratio, rate, fwd = sorted(pairs)[len(pairs) // 2]  # the median pair
        figures |= {f"embed_rows_{preset}": rows, f"embed_rows_per_s_{preset}": rate,
                    f"forward_rows_per_s_{preset}": fwd, f"embed_vs_forward_{preset}": ratio,
                    f"embed_vs_forward_pairs_{preset}": ", ".join(f"{r:.2f}" for r, _, _ in pairs)}
        log.info("%s: embed %.1f rows/s, forward alone %.1f rows/s, ratio %.2f (pairs %s)", preset, rate, fwd,
                 ratio, figures[f"embed_vs_forward_pairs_{preset}"])
    figures |= writer_figures(work)
    figures |= recall_figures()
    return figures


REQUIRED = {"embed_vs_forward_tiny": ">= 0.8", "embed_vs_forward_base": ">= 0.8"}


def write_results(figures: dict[str, Any], path: Path, seconds: float) -> None:
    import torch

    lines = ["# Embedding benchmark", "",
             "Generated by `python -m benchmarks.bench_embed` (repository root, the project's virtual "
             "environment); do not edit by hand.", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
             "- Data: 128 px chips tiled by the pipeline from synthetic 1024 px scenes (`tools.synth`; "
             "8 scenes, 512 chips, for tiny; 1 scene, 64 chips, for base); random-init checkpoints at "
             "128 px; one process, the CPU default of no DataLoader worker process; both rates include "
             "everything after planning (model build, first call, reading, writing the parts)",
             f"- Total benchmark time: {seconds / 60:.1f} min", "",
             "| Figure | Value | Requirement | Status |", "|---|---|---|---|"]
    for name, value in figures.items():
        need = REQUIRED.get(name, "")
        status = ("pass" if value >= float(need.split()[-1]) else "FAIL") if need else ""
        shown = f"{value:.3g}" if isinstance(value, float) and abs(value) < 100 else \
            (f"{value:.0f}" if isinstance(value, float) else str(value))
        lines.append(f"| `{name}` | {shown} | {need} | {status} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_embed", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS_embed.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        figures = run(Path(tmp))
    write_results(figures, args.out, time.monotonic() - t0)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
