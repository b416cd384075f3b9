"""Benchmarks 3-5: the training loader against the trainer, the trainer itself, shard I/O.

3. Samples/s the training loader delivers (`training.data`: decode, normalise, random
   resized crop, flip; DataLoader workers as configured) over the shards of benchmark 1,
   divided by the samples/s the `tiny` and `base` models consume (forward + backward +
   optimiser step). Reference: 128 px 12-band chips read on the fly from the COGs with
   TorchGeo's RasterDataset + GridGeoSampler (2 workers; `bench_torchgeo.py`, run with a
   separate interpreter that has TorchGeo, which the project does not depend on) and lean
   rasterio windowed reads in 2 worker processes (the same pattern without TorchGeo).
4. Trainer throughput: tokens/s (and MFU on a GPU) for `base` at 96 and 128 px, bf16.
5. Shard I/O: bytes per sample; read MB/s against plain sequential reading of the same tars.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import sequential_read_mb_s

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loader


def shard_paths(manifest: Path, dataset: str, split: str = "train") -> list[Path]:
    man = json.loads(manifest.read_text())
    return [manifest.parent / s["path"] for s in man["datasets"][dataset]["splits"][split]["shards"]]


def loader_samples_per_s(manifest: Path, dataset: str, img_size: int, *, workers: int = 2, batch: int = 16,
                         seconds: float = 15.0, augment: bool = True, dates: int = 1) -> float:
    """Samples/s out of `training.data.make_loader` (the trainer's own loader), after warm-up.

    ``augment=False`` replaces the stream's transform (normalise, random resized crop, flip)
    by a plain cast to float32: the loader's read path (resampled shards, integrity checks,
    shuffle buffer, `.npy` decode, collate across worker processes), i.e. the same work a
    TorchGeo RasterDataset + DataLoader does per chip. ``dates``: T of a time-stack dataset
    (a sample is then a ``[T, 12, S, S]`` stack).
    """
    from training.config import config_from_dict
    from training.data import DataPosition, make_loader, read_shard_set

    run = config_from_dict({
        "name": "bench", "manifest": str(manifest), "model": {"preset": "tiny"},
        "micro_batch": batch, "global_batch": batch, "num_workers": workers,
        "stages": [{"name": "bench", "dataset": dataset, "img_size": img_size, "dates": dates,
                    "samples": 10**9}],
    })
    stage = run.stages[0]
    shard_set = read_shard_set(manifest, dataset, "train", run.model_for(stage))
    stream_cls = _stream_class(augment)
    stream = stream_cls(shard_set, run, stage, stage_index=0, rank=0, world_size=1,
                        position=DataPosition.start(1, workers))
    loader = make_loader(stream, micro_batch=batch, num_workers=workers, num_batches=10**9)
    it = iter(loader)
    for _ in range(2 * max(workers, 1)):  # worker start-up and shuffle-buffer fill
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["image"])
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def _stream_class(augment: bool) -> type:
    from training.data import ShardStream

    if augment:
        return ShardStream

    class ReadOnlyStream(ShardStream):  # defined here: benchmarks only
        def transform(self, sample: dict[str, Any], worker: int, index: int) -> dict[str, Any]:
            import torch

            return {"image": torch.from_numpy(sample["chip"].astype(np.float32)), "worker": worker,
                    "index": index, "key": sample["__key__"]}

    return ReadOnlyStream


def torchgeo_chips_per_s(python: str, scene_dir: Path, *, seconds: float = 15.0) -> dict[str, Any]:
    """Run `benchmarks/bench_torchgeo.py` with ``python`` (an interpreter that has TorchGeo)."""
    import subprocess

    script = Path(__file__).resolve().parent / "bench_torchgeo.py"
    try:
        proc = subprocess.run([python, str(script), str(scene_dir), "--seconds", str(seconds)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except (OSError, subprocess.TimeoutExpired) as e:  # no such interpreter, or it hung
        print(f"TorchGeo benchmark failed with {python}: {e}", file=sys.stderr)
        return {}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"TorchGeo benchmark failed with {python}: {tail}", file=sys.stderr)
        return {}
    return dict(json.loads(lines[-1]))


def decode_only_mb_s(shards: Sequence[Path]) -> tuple[float, float]:
    """One process, the trainer's tar reader + `.npy` decode + `.json` parse, no augmentation:
    (MB/s of tar, samples/s)."""
    from training.data import decode_chip, tar_samples

    n_bytes = sum(p.stat().st_size for p in shards)
    n = 0
    t = time.perf_counter()
    for p in shards:
        with p.open("rb") as fh:
            for _, members in tar_samples(fh):
                meta = json.loads(members["json"])
                decode_chip(members["npy"], tuple(meta["shape"]))
                n += 1
    dt = time.perf_counter() - t
    return n_bytes / 1e6 / dt, n / dt


# --------------------------------------------------------------------------- COG windows reference


def _cog_worker(args: tuple[list[str], list[int], int, int, float, int]) -> int:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    paths, factors, size, chip, seconds, seed = args
    rng = random.Random(seed)
    srcs = [rasterio.open(p) for p in paths]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        # grid positions in random order, as a GridGeoSampler over a shuffled index
        r = rng.randrange(0, size // chip) * chip
        c = rng.randrange(0, size // chip) * chip
        out = np.empty((len(srcs), chip, chip), np.uint16)
        for i, (s, f) in enumerate(zip(srcs, factors)):
            w = Window(c / f, r / f, chip / f, chip / f)
            out[i] = s.read(1, window=w, out_shape=(chip, chip), resampling=Resampling.nearest, boundless=False)
        n += 1
    for s in srcs:
        s.close()
    return n


def cog_window_chips_per_s(scene_dir: Path, size: int, *, chip: int = 128, workers: int = 2, seconds: float = 10.0) -> float:
    """128 px, 12-band chips read on the fly from the COGs with windowed reads, `workers` processes."""
    from pipeline.catalogs import sensor

    bands = sensor().bands
    paths = [str(scene_dir / f"{b.name}.tif") for b in bands]
    factors = [int(b.gsd) // 10 for b in bands]
    with mp.get_context("spawn").Pool(workers) as pool:
        counts = pool.map(_cog_worker, [(paths, factors, size, chip, seconds, k) for k in range(workers)])
    return sum(counts) / seconds


# --------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class TrainerPoint:
    preset: str
    img_size: int
    batch: int
    samples_per_s: float
    tokens_per_s: float
    mfu: float | None
    source: str  # what measured it


def trainer_throughput(preset: str, img_size: int, *, batch: int, steps: int, warmup: int = 1) -> TrainerPoint:
    """Samples/s and tokens/s a model consumes in training (forward + backward + AdamW step).

    Uses `benchmarks.bench_trainer.bench` (the trainer's own benchmark: one rank's
    micro-batch step; bf16 + MFU on CUDA, fp32 on CPU) when it exists; otherwise this
    plain-torch loop, labelled as such: bf16 autocast
    on a GPU, fp32 on a CPU without native bf16 (AVX2-only CPUs emulate bf16 matmuls, about
    3x slower than fp32 here, which would flatter the loader ratio). Tokens are all 3D tokens
    of the image (4 spectral groups x (S/8)^2), masked or not.
    """
    import torch

    cuda = torch.cuda.is_available()
    try:
        from benchmarks import bench_trainer  # owned by the trainer engineer
    except ImportError:
        bench_trainer = None  # type: ignore[assignment]
    if bench_trainer is not None and hasattr(bench_trainer, "bench"):
        r = bench_trainer.bench(preset, img_size, batch, steps, torch.device("cuda" if cuda else "cpu"), cuda)
        how = "CUDA bf16" if cuda else "CPU fp32"
        return TrainerPoint(preset, img_size, batch, float(r["samples_per_s"]), float(r["tokens_per_s"]),
                            r.get("mfu"), f"benchmarks/bench_trainer.py bench(), {how}, batch {batch}")
    from training.models.spectral_mae import build_model

    torch.manual_seed(0)
    model = build_model(preset, img_size=img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    x = torch.randn(batch, 12, img_size, img_size, device=device)
    tokens = model.cfg.num_tokens
    bf16 = device == "cuda"

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if bf16:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if bf16:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    sps = batch * steps / dt
    how = "bf16 autocast" if bf16 else "fp32 (CPU has no native bf16)"
    return TrainerPoint(preset, img_size, batch, sps, sps * tokens, None,
                        f"fallback: plain torch, AdamW, {how}, batch {batch}, no DeepSpeed (bench_trainer.bench absent)")

