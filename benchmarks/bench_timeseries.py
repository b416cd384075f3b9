"""Time stacks: model throughput and memory at T = 1 and T = 3, and the loader against the
trainer on stacks.

Not a test. Writes ``benchmarks/RESULTS_timeseries.md`` (and prints the figures):

* ``tokens_per_s`` / ``samples_per_s`` of one rank's training step (forward with the
  default masking, backward, AdamW; `benchmarks/bench_trainer.py` ``bench``) for tiny and
  base at 96 px, T = 1 and T = 3, each in a fresh process whose peak RSS is the memory
  figure (CPU: the model, optimizer state and activations; on CUDA also the GPU peak);
* the trainer's own loader (`training.data`, 2 workers, crop + flip + normalise) on the
  `s96_g10m_t3` stacks of a 3-date synthetic tile built here by the pipeline, against the
  base model's samples/s at T = 3 measured in the same run. Required: >= 3.

Usage (repository root)::

    python -m benchmarks.bench_timeseries            # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

#: (preset, batch, timed steps) on CPU; the same batch at T = 1 and T = 3
PLAN = [("tiny", 8, 4), ("base", 2, 2)]
_CHILD = ("import json, resource, sys, torch; from benchmarks.bench_trainer import bench; "
          "p, b, s, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]); "
          "cuda = torch.cuda.is_available(); "
          "r = bench(p, 96, b, s, torch.device('cuda' if cuda else 'cpu'), cuda, dates=t); "
          "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
          "print(json.dumps(r))")


def model_point(preset: str, batch: int, steps: int, dates: int) -> dict[str, float]:
    """`bench_trainer.bench` in a fresh interpreter, with its own peak RSS (MB)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, preset, str(batch), str(steps), str(dates)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_stacks(work: Path) -> Path:
    """The 3-date synthetic tile of the run book, tiled by the pipeline; its manifest."""
    from pipeline.build_shards import main as build
    from tools.synth import generate_scenes

    catalog = generate_scenes(work / "scenes", 13, 768, 0)
    out = work / "ds"
    rc = build(["--catalog", str(catalog), "--bbox=26.99,-7.31,27.07,-7.23", "--max-cloud", "100",
                "--config", "timeseries", "--output", str(out)])
    if rc != 0:
        raise RuntimeError(f"the pipeline failed (exit {rc})")
    return out / "manifest.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS_timeseries.md")
    ap.add_argument("--loader-seconds", type=float, default=15.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from benchmarks import bench_loader

    t0 = time.perf_counter()
    rows: list[tuple[str, str, str]] = []
    points: dict[tuple[str, int], dict[str, float]] = {}
    for preset, batch, steps in PLAN:
        for dates in (1, 3):
            log.info("model: %s at 96 px, T = %d, batch %d", preset, dates, batch)
            points[(preset, dates)] = model_point(preset, batch, steps, dates)
    for preset, batch, _ in PLAN:
        one, three = points[(preset, 1)], points[(preset, 3)]
        for dates, p in ((1, one), (3, three)):
            rows.append((f"{preset}_96_t{dates}_tokens_per_s", f"{p['tokens_per_s']:.4g}",
                         f"batch {batch}; {p['samples_per_s']:.3g} samples/s"))
            gpu = f"; GPU peak {p['max_mem_gib']:.2f} GiB" if "max_mem_gib" in p else ""
            rows.append((f"{preset}_96_t{dates}_peak_rss_mb", f"{p['peak_rss_mb']:.0f}",
                         f"the benchmark's own process (interpreter and torch included){gpu}"))
        rows.append((f"{preset}_96_t3_vs_t1_tokens_per_s", f"{three['tokens_per_s'] / one['tokens_per_s']:.3g}",
                     "T = 3 has 3x the tokens (attention over all of them)"))
    with tempfile.TemporaryDirectory(prefix="bench-ts-") as tmp:
        manifest = build_stacks(Path(tmp))
        log.info("loader: s96_g10m_t3, 2 workers, %.0f s", args.loader_seconds)
        loader = bench_loader.loader_samples_per_s(manifest, "s96_g10m_t3", 96, dates=3, batch=8,
                                                   seconds=args.loader_seconds)
    rows.append(("loader_samples_per_s_96_t3", f"{loader:.4g}",
                 "training.data loader, 2 workers, crop + flip + normalise of [3, 12, 96, 96] stacks"))
    ratio = loader / points[("base", 3)]["samples_per_s"]
    rows.append(("loader_vs_trainer_base_96_t3", f"{ratio:.3g}", "required >= 3: " + ("pass" if ratio >= 3 else "FAIL")))
    elapsed = time.perf_counter() - t0
    import platform

    import torch

    text = ["# Time-stack benchmark", "",
            "Generated by `python -m benchmarks.bench_timeseries` (repository root); do not edit by hand.", "",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Machine: {os.cpu_count()} logical cores, {platform.machine()}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {'CUDA bf16' if torch.cuda.is_available() else 'CPU fp32'}",
            f"- Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
            f"- Total: {elapsed / 60:.1f} min", "",
            "| Figure | Value | Notes |", "|---|---|---|",
            *[f"| `{k}` | {v} | {n} |" for k, v, n in rows], ""]
    args.results.write_text("\n".join(text))
    for k, v, n in rows:
        print(f"{k}: {v}  ({n})")
    return 0 if ratio >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
