"""Streaming WebDataset input driven by the pipeline's ``manifest.json``.

Contract: ``docs/DATASET_FORMAT.md`` (format ``spectralgpt-shards/1``): samples are
``<key>.npy`` uint16 ``[C, H, W]`` (reflectance = value / 10000, 0 = nodata) plus
``<key>.json``; the manifest lists data sets -> splits -> shards and per-band statistics.

Each training process (rank) runs ``num_workers`` DataLoader workers; every (rank, worker)
pair is one *stream*:

* shards are split by node and by worker (stream ``s`` of ``S`` takes ``shards[s::S]``) when
  there are at least as many shards as streams, otherwise every stream draws from all
  shards (tiny data sets) with its own seed;
* the stream resamples shards with replacement (``wds.ResampledShards``, infinite, so
  every rank sees the same number of batches and no epoch boundary stalls a collective),
  reads their samples and passes them through a seeded shuffle buffer;
* every sample gets a running index; augmentation randomness is a pure function of
  (seed, stage, generation, rank, worker, index).

The data position is therefore one integer per stream (samples consumed) plus which
stream delivers the next batch (DataLoader workers take turns). A resumed run rebuilds the
same streams, skips the consumed samples (raw tar members, before decoding) and rotates
the worker-to-stream assignment so the turn order continues too: bit-identical batches.
If the number of processes or workers changed, the streams cannot be the same; the run
then starts a new *generation* of seeds (logged) and keeps its step count.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from training.config import ModelConfig, RunConfig, StageConfig
from training.errors import DataError

logger = logging.getLogger(__name__)

FORMAT_ID = "spectralgpt-shards/1"
NODATA = 0
# Per-image min-max epsilon of the official fMoW loader (util/datasets.py L408-422).
MINMAX_EPS = 1e-10


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardSet:
    """One split of one data set, as listed in the manifest, checked against the model."""

    dataset: str
    split: str
    shards: tuple[str, ...]
    """Absolute shard paths."""
    num_samples: int
    chip_size: int
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    """Per-band mean in stored units (DN; reflectance x 10000) over valid training pixels."""
    std: tuple[float, ...]


def read_shard_set(manifest_path: str | Path, dataset: str, split: str,
                   model: ModelConfig) -> ShardSet:
    """Read and validate one split of ``manifest.json`` for ``model``.

    Raises:
        DataError: missing manifest / data set / split / shard files, zero samples, wrong
            format id, band count or layout that the model cannot take, chips smaller
            than the stage's image size.
    """
    path = Path(manifest_path)
    if not path.is_file():
        raise DataError(f"manifest '{path}' not found: build the shards first "
                        f"(python -m pipeline.build_shards --aoi europe) or set 'manifest'")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest '{path}' is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT_ID:
        raise DataError(f"manifest '{path}' has format {manifest.get('format')!r}, "
                        f"expected '{FORMAT_ID}'")
    datasets = manifest.get("datasets") or {}
    if dataset not in datasets:
        raise DataError(f"data set '{dataset}' not in manifest '{path}' "
                        f"(available: {', '.join(datasets) or 'none'})")
    entry = datasets[dataset]
    splits = entry.get("splits") or {}
    if split not in splits:
        raise DataError(f"split '{split}' of data set '{dataset}' not in manifest '{path}' "
                        f"(available: {', '.join(splits) or 'none'})")
    bands = tuple(manifest.get("bands") or ())
    shape = list(entry.get("shape") or [])
    layout = entry.get("layout", "CHW")
    if layout != "CHW" or len(shape) != 3:
        raise DataError(f"data set '{dataset}' has layout {layout} {shape}; the trainer takes "
                        f"single-date CHW chips")
    if len(bands) != model.num_bands or shape[0] != model.num_bands:
        raise DataError(f"data set '{dataset}' has {shape[0]} bands ({len(bands)} in the "
                        f"manifest) but the model expects num_bands={model.num_bands}")
    chip = int(entry.get("chip_size", shape[1]))
    if shape[1] != shape[2] or min(shape[1:]) < model.img_size:
        raise DataError(f"data set '{dataset}' has {shape[1]}x{shape[2]} px chips but the "
                        f"stage trains at img_size={model.img_size}: use a data set with "
                        f"chips of at least that size or lower img_size")
    shard_entries = splits[split].get("shards") or []
    num_samples = int(splits[split].get("num_samples", 0))
    if not shard_entries or num_samples < 1:
        raise DataError(f"split '{split}' of data set '{dataset}' in '{path}' has no samples")
    root = path.parent
    shards = tuple(str((root / s["path"]).resolve()) for s in shard_entries)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of '{dataset}/{split}' listed in '{path}' "
                        f"are missing, e.g. {missing[0]}")
    stats = entry.get("stats") or {}
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or std is None or len(mean) != len(bands) or len(std) != len(bands):
        raise DataError(f"data set '{dataset}' in '{path}' lacks per-band stats.mean/std")
    if not all(math.isfinite(float(v)) for v in [*mean, *std]):
        raise DataError(f"data set '{dataset}' in '{path}' has non-finite stats.mean/std")
    std = [max(float(s), 1.0) for s in std]  # a constant band must not divide by zero
    return ShardSet(dataset, split, shards, num_samples, chip, bands,
                    tuple(float(m) for m in mean), tuple(std))


# --------------------------------------------------------------------------- transforms


def normalise(x: Tensor, valid: Tensor, mode: str, mean: Tensor, std: Tensor) -> Tensor:
    """Normalise a chip ``[C, H, W]`` (DN, float32); nodata pixels become 0 afterwards.

    ``dataset_stats``: (x - mean) / std per band (0 = the data set mean, a neutral value).
    ``per_image_minmax``: per band to [0, 1] over the valid pixels (official pretraining).
    """
    if mode == "dataset_stats":
        out = (x - mean[:, None, None]) / std[:, None, None]
    elif mode == "per_image_minmax":
        big = torch.finfo(x.dtype).max
        lo = torch.where(valid, x, big).amin(dim=(1, 2), keepdim=True)
        hi = torch.where(valid, x, -big).amax(dim=(1, 2), keepdim=True)
        lo = torch.where(lo > hi, 0.0, lo)  # an all-nodata band
        hi = torch.where(hi < lo, 0.0, hi)
        out = (x - lo) / (hi - lo + MINMAX_EPS)
    else:
        raise ValueError(f"unknown normalisation {mode!r}")
    return torch.where(valid, out, 0.0)


def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float], rng: np.random.Generator) -> Tensor:
    """torchvision ``RandomResizedCrop`` (official: scale 0.2-1, bicubic) on ``[C, H, W]``.

    Same sampling as ``torchvision.transforms.RandomResizedCrop.get_params``: 10 tries at a
    random area and log-uniform aspect ratio, then a centre crop with the ratio clamped.
    Bicubic with antialias, as torchvision does on tensors; returns ``[C, size, size]``.
    """
    _, h, w = x.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(rng.integers(0, h - ch + 1))
            j = int(rng.integers(0, w - cw + 1))
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            ch, cw = h, round(h * ratio[1])
        else:
            cw, ch = w, h
        i, j = (h - ch) // 2, (w - cw) // 2
    crop = x[:, i:i + ch, j:j + cw]
    if crop.shape[-2:] == (size, size):
        return crop.contiguous()
    return F.interpolate(crop[None], size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True)[0]


# --------------------------------------------------------------------------- streams


@dataclass
class DataPosition:
    """Samples consumed per stream, ``consumed[rank][worker]``, plus what defines the streams."""

    world_size: int
    num_workers: int
    generation: int = 0
    consumed: list[list[int]] = field(default_factory=list)
    """Samples consumed, ``[rank][stream]``."""
    next_stream: list[int] = field(default_factory=list)
    """Per rank, the stream whose batch comes next (DataLoader workers take turns)."""

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": self.num_workers,
                "generation": self.generation, "consumed": self.consumed,
                "next_stream": self.next_stream}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(int(data["world_size"]), int(data["num_workers"]), int(data["generation"]),
                   [list(map(int, r)) for r in data["consumed"]],
                   list(map(int, data["next_stream"])))

    @classmethod
    def start(cls, world_size: int, num_workers: int, generation: int = 0) -> DataPosition:
        return cls(world_size, num_workers, generation,
                   [[0] * max(num_workers, 1) for _ in range(world_size)], [0] * world_size)

    def resumed(self, world_size: int, num_workers: int) -> DataPosition:
        """This position for a run with ``world_size`` x ``num_workers`` streams."""
        if (world_size, num_workers) == (self.world_size, self.num_workers):
            return DataPosition(world_size, num_workers, self.generation,
                                [list(r) for r in self.consumed], list(self.next_stream))
        logger.warning("data streams changed (%d x %d -> %d x %d processes x workers): "
                       "continuing with freshly seeded streams (generation %d)",
                       self.world_size, self.num_workers, world_size, num_workers,
                       self.generation + 1)
        return DataPosition.start(world_size, num_workers, self.generation + 1)


def _stream_seed(*parts: int) -> int:
    # Python's hash() of str is salted per process; mix integers only, reproducibly.
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardStream(IterableDataset):
    """The sample stream of one rank; each DataLoader worker iterates its own sub-stream.

    Yields dicts ``{"image": [C, S, S] float32, "worker": stream id, "index": int, "key": str}``.
    """

    def __init__(self, shard_set: ShardSet, run: RunConfig, stage: StageConfig, *,
                 stage_index: int, rank: int, world_size: int, position: DataPosition) -> None:
        super().__init__()
        self.shard_set = shard_set
        self.stage_index = stage_index
        self.img_size = stage.img_size
        self.rank, self.world_size, self.generation = rank, world_size, position.generation
        self.skip = list(position.consumed[rank])
        self.first_stream = position.next_stream[rank]
        self.seed = run.seed
        self.normalisation = run.normalisation
        self.crop_scale, self.crop_ratio, self.hflip = run.crop_scale, run.crop_ratio, run.hflip
        self.shuffle_buffer, self.shuffle_initial = run.shuffle_buffer, run.shuffle_initial
        self.num_bands = len(shard_set.bands)
        self.mean = torch.tensor(shard_set.mean, dtype=torch.float32)
        self.std = torch.tensor(shard_set.std, dtype=torch.float32)

    def shards_for(self, worker: int, num_workers: int) -> list[str]:
        """Split by node then worker when there are enough shards, else use all of them."""
        streams = self.world_size * num_workers
        shards = list(self.shard_set.shards)
        if len(shards) >= streams:
            return shards[self.rank * num_workers + worker::streams]
        return shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker k serves stream (k + first_stream) % n so a resumed loader, which always
        # starts with worker 0, continues the turn order where the stopped run left it.
        worker = (worker + self.first_stream) % num_workers
        seed = _stream_seed(self.seed, self.stage_index, self.generation, self.rank, worker)
        pipeline = wds.DataPipeline(
            # worker_seed is constant: the seed above already identifies rank and worker
            # (wds' default reads RANK from the environment and would double-count it).
            wds.ResampledShards(self.shards_for(worker, num_workers), seed=seed,
                                worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=random.Random(seed)),
        )
        skip = self.skip[worker] if worker < len(self.skip) else 0
        for index, sample in enumerate(pipeline):
            if index < skip:  # fast-forward on resume: raw bytes, nothing decoded
                continue
            yield self.transform(sample, worker, index)

    def transform(self, sample: dict[str, Any], worker: int, index: int) -> dict[str, Any]:
        """Decode (no pickle), check, normalise, random-resized-crop and flip one sample."""
        key = sample.get("__key__", "?")
        if "npy" not in sample:
            raise DataError(f"sample '{key}' in {sample.get('__url__')} has no .npy member")
        arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[0] != self.num_bands:
            raise DataError(f"sample '{key}' in {sample.get('__url__')} is {arr.dtype} "
                            f"{list(arr.shape)}, expected uint16 [{self.num_bands}, H, W]")
        x = torch.from_numpy(arr.astype(np.float32))  # DN; reflectance = DN / 10000
        x = normalise(x, x != NODATA, self.normalisation, self.mean, self.std)
        rng = np.random.default_rng([self.seed, self.stage_index, self.generation, self.rank,
                                     worker, index])
        x = random_resized_crop(x, self.img_size, self.crop_scale, self.crop_ratio, rng)
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        return {"image": x, "worker": worker, "index": index, "key": key}


def make_loader(stream: ShardStream, *, micro_batch: int, num_workers: int,
                num_batches: int, pin_memory: bool = False) -> wds.WebLoader:
    """Batches of ``micro_batch`` from ``stream``; an epoch is ``num_batches`` batches.

    With an iterable dataset each batch comes whole from one worker, in round-robin order,
    so :meth:`track` can attribute consumed samples to workers exactly.
    """
    loader = wds.WebLoader(stream, batch_size=micro_batch, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=False,
                           prefetch_factor=2 if num_workers > 0 else None)
    return loader.with_epoch(num_batches)


def track(position: DataPosition, rank: int, batch: dict[str, Any]) -> None:
    """Record that the samples of ``batch`` were consumed by ``rank``."""
    row = position.consumed[rank]
    workers = batch["worker"].tolist()
    for worker, index in zip(workers, batch["index"].tolist()):
        row[worker] = max(row[worker], index + 1)
    position.next_stream[rank] = (workers[-1] + 1) % len(row)
