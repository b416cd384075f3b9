"""Streaming WebDataset input driven by the pipeline's ``manifest.json``.

Contract: ``docs/DATASET_FORMAT.md`` (``pipeline.contract``: formats 1 and 2): samples are
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

import functools
import io
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from pipeline.contract import READABLE_FORMATS  # the dataset contract's one home
from pipeline.names import UnsafeName, confined, safe_relpath  # the one check for outside names
from training.config import ModelConfig, RunConfig, StageConfig
from training.errors import DataError, UnsafeShardPath

logger = logging.getLogger(__name__)

NODATA = 0
# Per-image min-max epsilon of the official fMoW loader (util/datasets.py L408-422).
MINMAX_EPS = 1e-10
#: Largest tar member read into memory (a 12 x 1024 x 1024 uint16 chip is 24 MiB).
MAX_MEMBER_BYTES = 1 << 28


# --------------------------------------------------------------------------- manifest


def is_remote(location: str | Path) -> bool:
    """True for an fsspec URL with a scheme other than ``file`` (``s3://bucket/key``)."""
    text = str(location)
    return "://" in text and text.split("://", 1)[0] not in ("", "file")


def _local(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://"))


@dataclass(frozen=True)
class ShardSet:
    """One split of one data set, as listed in the manifest, checked against the model."""

    dataset: str
    split: str
    shards: tuple[str, ...]
    """Absolute shard paths, or fsspec URLs when the manifest is remote."""
    num_samples: int
    chip_size: int
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    """Per-band mean in stored units (DN; reflectance x 10000) over valid training pixels."""
    std: tuple[float, ...]
    shard_bytes: tuple[int | None, ...] = ()
    """Size of each shard per the manifest (None: not listed); a shard of another size is bad."""
    shard_samples: tuple[int | None, ...] = ()
    """Samples in each shard per the manifest; a shard that ends early is bad."""
    version: int | None = None
    """Dataset version read (None: a manifest without ``versions``, read as it is)."""
    dates: int = 1
    """Dates per sample: 1 for ``CHW`` chips, T for ``TCHW`` time stacks."""
    gsd: float | None = None
    """Ground distance of the chips in m/px, as the manifest records it (None: not recorded)."""

    def describe(self) -> dict[str, Any]:
        """What a checkpoint or an export records about the data: enough to normalise alike."""
        return {"dataset": self.dataset, "split": self.split, "version": self.version,
                "bands": list(self.bands), "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class MixedShardSet:
    """The data sets of a mixed stage (``StageConfig.datasets``), read and checked each, with
    their weights; the trainer's bookkeeping reads it like one :class:`ShardSet`."""

    parts: tuple[ShardSet, ...]
    weights: tuple[float, ...]

    @property
    def dataset(self) -> str:
        """``s96_g10m x2 + s96_g20m x1``: the mix as logs and metrics name it."""
        return " + ".join(f"{p.dataset} x{w:g}" for p, w in zip(self.parts, self.weights))

    @property
    def split(self) -> str:
        return self.parts[0].split

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(s for p in self.parts for s in p.shards)

    @property
    def num_samples(self) -> int:
        """Samples of all the data sets (what ``epochs`` counts over)."""
        return sum(p.num_samples for p in self.parts)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.parts[0].bands

    @property
    def version(self) -> int | None:
        return self.parts[0].version

    @property
    def dates(self) -> int:
        return self.parts[0].dates

    @property
    def gsd(self) -> float | None:
        """The common ground distance, or None when the data sets differ (or do not say)."""
        values = {p.gsd for p in self.parts}
        return values.pop() if len(values) == 1 else None

    def describe(self) -> dict[str, Any]:
        """Every part's description and weight; ``bands``/``mean``/``std`` are the first data
        set's (what an export of this stage records for normalising downstream data)."""
        first = self.parts[0].describe()
        return {"dataset": self.dataset, "split": self.split, "version": self.version,
                "bands": first["bands"], "mean": first["mean"], "std": first["std"],
                "parts": [{**p.describe(), "weight": w} for p, w in zip(self.parts, self.weights)]}


def read_stage_data(manifest_path: str | Path, datasets: Sequence[tuple[str, float]], split: str,
                    model: ModelConfig, *, version: int | str = "latest") -> ShardSet | MixedShardSet:
    """:func:`read_shard_set` for a stage's ``(name, weight)`` data sets: the one
    :class:`ShardSet`, or a :class:`MixedShardSet` of several (each checked against the
    model: same bands, the stage's dates, chips of at least its size)."""
    parts = [read_shard_set(manifest_path, name, split, model, version=version) for name, _ in datasets]
    if len(parts) == 1:
        return parts[0]
    if len({p.bands for p in parts}) != 1:
        raise DataError(f"the data sets of a mixed stage ({', '.join(p.dataset for p in parts)}) have "
                        "different bands")
    return MixedShardSet(tuple(parts), tuple(float(w) for _, w in datasets))


def _read_manifest(location: str) -> dict[str, Any]:
    """The parsed manifest at a local path or an fsspec URL (DataError when unreadable)."""
    hint = ("build the shards first (python -m pipeline.build_shards --aoi europe) or set "
            "'manifest'")
    if is_remote(location):
        import fsspec

        try:
            with fsspec.open(location, "rb") as fh:
                text = fh.read().decode()
        except FileNotFoundError:
            raise DataError(f"manifest '{location}' not found: {hint}") from None
        except Exception as exc:  # credentials, endpoint, DNS: one line, not a traceback
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read manifest '{location}': {first}") from None
    else:
        path = _local(location)
        if not path.is_file():
            raise DataError(f"manifest '{path}' not found: {hint}")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest '{location}' is not valid JSON: {exc}") from None


def _version_view(manifest: dict[str, Any], dataset: str, version: int | str,
                  where: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """``(splits, stats, version)`` of ``dataset`` as of ``version`` (docs/DATASET_FORMAT.md).

    ``latest``: the manifest's cumulative ``datasets`` entry. ``N``: the shards every version
    up to N added, in version order, with the statistics as of version N.
    """
    entry = manifest["datasets"][dataset]
    versions = manifest.get("versions") or []
    if version == "latest" or (not versions and version == 1):
        # A manifest without versions is one build: version 1 is all of it.
        latest = manifest.get("latest_version", 1 if version == 1 else None)
        return entry.get("splits") or {}, entry.get("stats") or {}, latest
    if not versions:
        raise DataError(f"dataset_version {version}: manifest '{where}' lists no versions "
                        f"(an older format, one build); use dataset_version: latest")
    known = sorted(int(v["version"]) for v in versions)
    if version not in known:
        raise DataError(f"dataset_version {version} is not in manifest '{where}' (versions "
                        f"{', '.join(map(str, known))})")
    splits: dict[str, dict[str, Any]] = {}
    stats: dict[str, Any] = {}
    for v in sorted(versions, key=lambda v: int(v["version"])):
        if int(v["version"]) > int(version):
            break
        added = (v.get("datasets") or {}).get(dataset)
        if added is None:  # this version brought nothing for the data set
            continue
        for name, split in (added.get("splits") or {}).items():
            acc = splits.setdefault(name, {"num_samples": 0, "shards": []})
            acc["num_samples"] += int(split.get("num_samples", 0))
            acc["shards"] = acc["shards"] + list(split.get("shards") or [])
        stats = added.get("stats") or stats  # of version N, or the last one that had data
    if not splits:
        raise DataError(f"data set '{dataset}' has no data in versions <= {version} of "
                        f"manifest '{where}'")
    return splits, stats, int(version)


def _missing_shards(shards: list[str]) -> list[str]:
    """The shards that do not exist; remote ones are checked with one listing per folder."""
    if not shards or not is_remote(shards[0]):
        return [s for s in shards if not Path(s).is_file()]
    import fsspec

    fs, _ = fsspec.core.url_to_fs(shards[0])
    folders: dict[str, list[str]] = {}
    for url in shards:
        folders.setdefault(url.rsplit("/", 1)[0], []).append(url)
    missing = []
    for folder, urls in folders.items():
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
        except FileNotFoundError:
            names = set()
        missing += [u for u in urls if u.rsplit("/", 1)[-1] not in names]
    return missing


def _shard_locations(where: str, entries: list[Any]) -> list[str]:
    """The shard paths of ``entries`` joined to the manifest's folder (or URL prefix).

    A manifest comes from whoever built or copied the dataset; its shard paths are names
    from outside. Each must be a relative path of plain names (``pipeline.names``: no
    ``..``, no absolute path, no backslash, NUL or newline), so neither a local join nor a
    URL join can leave the dataset; a local one is checked once more after resolving
    links (a symlink inside the dataset that leads out). Nothing is opened before this.

    Raises:
        UnsafeShardPath: the first shard path that would leave the dataset.
    """
    what = f"manifest '{where}': shard path"
    remote = is_remote(where)
    root = where.rsplit("/", 1)[0] if remote else _local(where).parent
    shards = []
    try:
        for entry in entries:
            if not isinstance(entry, dict):
                raise DataError(f"{what}s: an entry of type {type(entry).__name__} is not a "
                                f"mapping with a 'path' (docs/DATASET_FORMAT.md)")
            rel = entry.get("path")
            if remote:
                shards.append(f"{root}/{safe_relpath(rel, what)}")
            else:
                shards.append(str(confined(Path(root), rel, what).resolve()))
    except UnsafeName as exc:
        raise UnsafeShardPath(str(exc)) from None
    return shards


def read_shard_set(manifest_path: str | Path, dataset: str, split: str, model: ModelConfig,
                   *, version: int | str = "latest") -> ShardSet:
    """Read and validate one split of ``manifest.json`` for ``model``.

    Args:
        manifest_path: a local path or an fsspec URL (``s3://bucket/prefix/manifest.json``);
            shard paths in it are relative to its folder.
        version: ``latest`` or a dataset version N (the shards of versions <= N, the
            statistics of version N).

    Raises:
        DataError: missing manifest / data set / split / version / shard files, zero
            samples, wrong format id, band count or layout that the model cannot take,
            chips smaller than the stage's image size.
        UnsafeShardPath: a shard path that leaves the dataset folder (a ``DataError``).
    """
    where = str(manifest_path)
    manifest = _read_manifest(where)
    if manifest.get("format") not in READABLE_FORMATS:
        raise DataError(f"manifest '{where}' has format {str(manifest.get('format'))[:60]!r}, "
                        f"expected one of {', '.join(READABLE_FORMATS)}")
    datasets = manifest.get("datasets") or {}
    if dataset not in datasets:
        raise DataError(f"data set '{dataset}' not in manifest '{where}' "
                        f"(available: {', '.join(datasets) or 'none'})")
    entry = datasets[dataset]
    splits, stats, resolved = _version_view(manifest, dataset, version, where)
    if split not in splits:
        raise DataError(f"split '{split}' of data set '{dataset}' not in manifest '{where}' "
                        f"(available: {', '.join(splits) or 'none'})")
    bands = tuple(manifest.get("bands") or ())
    shape = list(entry.get("shape") or [])
    layout = entry.get("layout", "CHW")
    if layout == "TCHW" and len(shape) == 4:
        dates, shape = int(shape[0]), shape[1:]
    elif layout == "CHW" and len(shape) == 3:
        dates = 1
    else:
        raise DataError(f"data set '{dataset}' has layout {layout} {shape}; the trainer takes "
                        f"CHW chips and TCHW time stacks")
    if dates != model.num_dates:
        have = "single-date chips" if dates == 1 else f"time stacks of {dates} dates"
        raise DataError(f"data set '{dataset}' holds {have} but the stage is set for "
                        f"{model.num_dates} date(s): set 'dates: {dates}' in the stage")
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
        raise DataError(f"split '{split}' of data set '{dataset}' in '{where}' has no samples")
    shards = _shard_locations(where, shard_entries)
    missing = _missing_shards(shards)
    if missing:
        raise DataError(f"{len(missing)} shard(s) of '{dataset}/{split}' listed in '{where}' "
                        f"are missing, e.g. {missing[0]}")
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or std is None or len(mean) != len(bands) or len(std) != len(bands):
        raise DataError(f"data set '{dataset}' in '{where}' lacks per-band stats.mean/std")
    if not all(math.isfinite(float(v)) for v in [*mean, *std]):
        raise DataError(f"data set '{dataset}' in '{where}' has non-finite stats.mean/std")
    std = [max(float(s), 1.0) for s in std]  # a constant band must not divide by zero

    def _opt_int(value: Any) -> int | None:
        return int(value) if value is not None else None

    def _opt_float(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return ShardSet(dataset, split, tuple(shards), num_samples, chip, bands,
                    tuple(float(m) for m in mean), tuple(std),
                    shard_bytes=tuple(_opt_int(s.get("bytes")) for s in shard_entries),
                    shard_samples=tuple(_opt_int(s.get("num_samples")) for s in shard_entries),
                    version=resolved, dates=dates, gsd=_opt_float(entry.get("gsd")))


# --------------------------------------------------------------------------- transforms


def normalise(x: Tensor, valid: Tensor, mode: str, mean: Tensor, std: Tensor) -> Tensor:
    """Normalise a chip ``[C, H, W]`` or a batch ``[..., C, H, W]`` (DN, float32); nodata
    pixels become 0 afterwards.

    ``dataset_stats``: (x - mean) / std per band (0 = the data set mean, a neutral value).
    ``per_image_minmax``: per band to [0, 1] over the valid pixels (official pretraining).
    """
    if mode == "dataset_stats":
        out = (x - mean[:, None, None]) / std[:, None, None]
    elif mode == "per_image_minmax":
        big = torch.finfo(x.dtype).max
        lo = torch.where(valid, x, big).amin(dim=(-2, -1), keepdim=True)
        hi = torch.where(valid, x, -big).amax(dim=(-2, -1), keepdim=True)
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
    Bicubic *with* antialias; returns ``[C, size, size]``. A deviation: the official pin,
    torchvision 0.15.1, did not antialias tensors (``antialias=None`` meant off for tensors
    until 0.17); shrinking a large crop without it aliases fine texture. Listed in PRETRAIN.md.
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
    bad_samples: list[list[int]] = field(default_factory=list)
    """Samples rejected so far, ``[rank][stream]`` (wrong shape or dtype, pickled, unreadable)."""
    bad_shards: list[list[int]] = field(default_factory=list)
    """Shards skipped so far, ``[rank][stream]`` (truncated, corrupt, unreadable)."""

    def __post_init__(self) -> None:
        # Positions saved before the counters existed start them at zero.
        zeros = [[0] * len(r) for r in self.consumed]
        self.bad_samples = self.bad_samples or [list(r) for r in zeros]
        self.bad_shards = self.bad_shards or [list(r) for r in zeros]

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": self.num_workers,
                "generation": self.generation, "consumed": self.consumed,
                "next_stream": self.next_stream, "bad_samples": self.bad_samples,
                "bad_shards": self.bad_shards}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        def rows(key: str) -> list[list[int]]:
            return [list(map(int, r)) for r in data.get(key) or []]

        return cls(int(data["world_size"]), int(data["num_workers"]), int(data["generation"]),
                   rows("consumed"), list(map(int, data["next_stream"])),
                   rows("bad_samples"), rows("bad_shards"))

    @classmethod
    def start(cls, world_size: int, num_workers: int, generation: int = 0) -> DataPosition:
        return cls(world_size, num_workers, generation,
                   [[0] * max(num_workers, 1) for _ in range(world_size)], [0] * world_size)

    def resumed(self, world_size: int, num_workers: int) -> DataPosition:
        """This position for a run with ``world_size`` x ``num_workers`` streams."""
        if (world_size, num_workers) == (self.world_size, self.num_workers):
            return DataPosition(world_size, num_workers, self.generation,
                                [list(r) for r in self.consumed], list(self.next_stream),
                                [list(r) for r in self.bad_samples],
                                [list(r) for r in self.bad_shards])
        logger.warning("data streams changed (%d x %d -> %d x %d processes x workers): "
                       "continuing with freshly seeded streams (generation %d)",
                       self.world_size, self.num_workers, world_size, num_workers,
                       self.generation + 1)
        return DataPosition.start(world_size, num_workers, self.generation + 1)

    def bad_data(self, rank: int | None = None) -> tuple[int, int]:
        """``(bad samples, bad shards)`` of one rank's streams, or of all ranks."""
        ranks = range(len(self.consumed)) if rank is None else [rank]
        return (sum(sum(self.bad_samples[r]) for r in ranks),
                sum(sum(self.bad_shards[r]) for r in ranks))


def _stream_seed(*parts: int) -> int:
    # Python's hash() of str is salted per process; mix integers only, reproducibly.
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class BadShard(Exception):
    """A shard that cannot be read to its end as listed in the manifest (internal)."""


def open_shard(url: str) -> BinaryIO:
    """A binary file object for a local path or an fsspec URL (``s3://...``)."""
    if is_remote(url):
        import fsspec

        return fsspec.open(url, "rb").open()  # type: ignore[no-any-return]
    return _local(url).open("rb")


def _size_of(fh: BinaryIO) -> int | None:
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        size = getattr(fh, "size", None)  # fsspec buffered files
        return int(size) if size is not None else None


def tar_samples(fh: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Raw samples of a tar stream in member order: ``(key, {extension: bytes})``.

    Members are read into memory, never extracted to disk by name; links, folders and
    other non-regular members, names without an extension and members larger than
    :data:`MAX_MEMBER_BYTES` are errors (``ValueError``), as are tar format errors.
    Keys and extensions split as in webdataset (``base_plus_ext``).
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    for name, data in _tar_members(fh):
        base, ext = base_plus_ext(name)
        if base is None:
            raise ValueError(f"member name '{name}' has no extension")
        if base != key:
            if key is not None:
                yield key, members
            key, members = base, {}
        if ext in members:
            raise ValueError(f"member '{name}' appears twice")
        members[ext] = data
    if key is not None:
        yield key, members


def _tar_members(fh: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every member; a local file's plain members are read directly.

    tarfile's per-member Python work (a TarInfo, a file wrapper, and in stream mode a 10 KB
    copy loop) cost more than the reads: a 128 px shard from the page cache gave 2552
    samples/s in random-access mode (1405-1751 in stream mode) and 7308 this way. For a local
    file, a header block that tarfile parses (checksum included) as a plain regular file
    is followed by one read of its data; at the first other header (pax, GNU long name,
    link, compressed data) tarfile takes over from that offset, so its rules apply there.
    """
    if not (isinstance(fh, (io.BufferedReader, io.FileIO)) and fh.seekable()):
        yield from _tarfile_members(fh, "r|*")  # pipes and remote files: strictly sequential
        return
    while True:
        start = fh.tell()
        block = fh.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or block == _ZERO_BLOCK:
            return  # end of archive (a cut header ends it too, as in tarfile)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            info = None
        if info is None or info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            fh.seek(start)
            yield from _tarfile_members(fh, "r:*" if start == 0 else "r:")
            return
        yield info.name, _member_data(info.name, info.size, fh.read)
        fh.seek(-info.size % tarfile.BLOCKSIZE, os.SEEK_CUR)


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _tarfile_members(fh: BinaryIO, mode: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every member via tarfile, from the file's current position."""
    with tarfile.open(fileobj=fh, mode=mode) as tar:
        for info in tar:
            if not info.isfile():
                raise ValueError(f"member '{info.name}' is not a regular file")
            member = tar.extractfile(info)
            assert member is not None  # a regular file
            yield info.name, _member_data(info.name, info.size, member.read)


def _member_data(name: str, size: int, read: Callable[[int], bytes]) -> bytes:
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"member '{name}' claims {size} bytes")
    data = read(size)
    if len(data) != size:
        raise ValueError(f"member '{name}' ends after {len(data)} of {size} bytes")
    return data


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """``(shape, fortran_order, dtype, data offset)`` of a ``.npy`` prefix; ``ValueError``.

    Cached by the header's bytes: every chip of a data set has the same header, and parsing
    one (``ast.literal_eval``) costs more than copying the chip.
    """
    fh = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, EOFError, SyntaxError) as exc:
        raise ValueError(f"not a .npy array ({exc})") from None
    return tuple(shape), bool(fortran), dtype, fh.tell()


def _npy_prefix(data: bytes) -> bytes:
    """The magic, version, length and header of a ``.npy`` member (what ``_npy_header`` parses)."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        return data[:10]  # _npy_header reports it
    n = int.from_bytes(data[8:10], "little") + 10 if data[6] == 1 else \
        int.from_bytes(data[8:12], "little") + 12
    return data[:n]


def decode_chip(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """A ``.npy`` member as a uint16 array of exactly ``shape``; ``ValueError`` otherwise.

    The header is checked before any data is looked at (a huge or object-dtype claim
    allocates nothing, and nothing is unpickled); the array is then a read-only view of
    ``data`` (no copy), whose length must match the header exactly.
    """
    got, fortran, dtype, offset = _npy_header(_npy_prefix(data))
    if dtype.hasobject or dtype != np.dtype(np.uint16) or tuple(got) != tuple(shape):
        raise ValueError(f"is {dtype} {list(got)}, expected uint16 {list(shape)}")
    if len(data) - offset != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"holds {len(data) - offset} data bytes, its header says "
                         f"{math.prod(shape) * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, offset=offset)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


@dataclass
class StreamHealth:
    """Bad data met by one stream so far (cumulative; it travels with every sample)."""

    bad_samples: int = 0
    bad_shards: int = 0


class ShardStream(IterableDataset):
    """The sample stream of one rank; each DataLoader worker iterates its own sub-stream.

    Yields dicts ``{"image": [C, S, S] float32, "worker": stream id, "index": int, "key": str,
    "bad_samples": int, "bad_shards": int}`` (the last two: the stream's counts so far).
    Time stacks: ``image`` is ``[T, C, S, S]`` (the same crop and flip on every date), plus
    ``dates`` ``[T, 2]`` (year, day of year, from the sample JSON ``datetimes``) and
    ``valid`` ``[T]`` (0 for a date without any valid pixel). Every sample also carries
    ``gsd`` (m/px, from the sample JSON) when the model's GSD encoding is on.

    Bad data (``run.on_bad_data``): a shard whose size differs from the manifest's, that
    is not a readable tar, or that ends before its listed sample count is *bad*; a sample
    without a ``.npy`` member or whose array is not uint16 ``[C, chip, chip]`` (pickled
    object arrays included) is *rejected*. ``skip`` logs a warning, counts it and goes on
    (a bad shard is not drawn again by this stream; the samples it gave before the damage
    were each checked); ``fail`` raises :class:`DataError`. Checks happen before the
    shuffle buffer, on every raw sample (also those skipped on resume), so the counts and
    the running index are the same in a resumed run.
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
        self.on_bad_data = run.on_bad_data
        self.num_bands = len(shard_set.bands)
        self.dates = shard_set.dates
        self.chip_shape = ((self.dates,) if self.dates > 1 else ()) + (
            self.num_bands, shard_set.chip_size, shard_set.chip_size)
        # the sample JSON is parsed only when the model needs what it holds
        self.want_json = self.dates > 1 or run.model.gsd_encoding
        self.expected_bytes = dict(zip(shard_set.shards, shard_set.shard_bytes))
        self.expected_samples = dict(zip(shard_set.shards, shard_set.shard_samples))
        self.mean = torch.tensor(shard_set.mean, dtype=torch.float32)
        self.std = torch.tensor(shard_set.std, dtype=torch.float32)

    def shards_for(self, worker: int, num_workers: int) -> list[str]:
        """Split by node then worker when there are enough shards, else use all of them."""
        streams = self.world_size * num_workers
        shards = list(self.shard_set.shards)
        if len(shards) >= streams:
            return shards[self.rank * num_workers + worker::streams]
        return shards

    def worker(self) -> tuple[int, int]:
        """(this stream's id, number of streams of the rank) in a DataLoader worker."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker k serves stream (k + first_stream) % n so a resumed loader, which always
        # starts with worker 0, continues the turn order where the stopped run left it.
        return (worker + self.first_stream) % num_workers, num_workers

    def raw_samples(self, worker: int, num_workers: int, health: StreamHealth) -> Iterator[dict[str, Any]]:
        """Stream ``worker``'s checked, shuffled samples, not transformed (endless)."""
        seed = _stream_seed(self.seed, self.stage_index, self.generation, self.rank, worker)
        shards = self.shards_for(worker, num_workers)
        return iter(wds.DataPipeline(
            # worker_seed is constant: the seed above already identifies rank and worker
            # (wds' default reads RANK from the environment and would double-count it).
            wds.ResampledShards(shards, seed=seed, worker_seed=lambda: 0, deterministic=True),
            lambda sources: self._checked_samples(sources, shards, worker, health),
            wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=random.Random(seed)),
        ))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self.worker()
        health = StreamHealth()
        skip = self.skip[worker] if worker < len(self.skip) else 0
        for index, sample in enumerate(self.raw_samples(worker, num_workers, health)):
            if index < skip:  # fast-forward on resume: checked, not transformed
                continue
            yield {**self.transform(sample, worker, index),
                   "bad_samples": health.bad_samples, "bad_shards": health.bad_shards}

    def _checked_samples(self, sources: Iterator[dict[str, str]], shards: list[str],
                         worker: int, health: StreamHealth) -> Iterator[dict[str, Any]]:
        """Read the drawn shards; yield samples with a checked ``chip``; handle bad data."""
        bad: set[str] = set()
        since_good: set[str] = set()  # shards drawn since the last good sample
        for source in sources:
            url = source["url"]
            if len(since_good) == len(set(shards)):
                raise DataError(f"no usable sample in any of the {len(since_good)} shard(s) "
                                f"of data stream {self.rank}/{worker} (e.g. {url}); see the "
                                f"warnings above")
            since_good.add(url)
            if url in bad:
                continue
            count = 0
            try:
                with open_shard(url) as fh:
                    expected = self.expected_bytes.get(url)
                    size = _size_of(fh)
                    if expected is not None and size is not None and size != expected:
                        raise BadShard(f"it is {size} bytes, the manifest says {expected} "
                                       f"(truncated or replaced)")
                    for key, members in tar_samples(fh):
                        count += 1
                        checked = self._check_sample(key, members, url, worker, health)
                        if checked is not None:
                            since_good.clear()
                            yield {"__key__": key, "__url__": url, **checked}
                listed = self.expected_samples.get(url)
                if listed is not None and count != listed:
                    raise BadShard(f"it ends after {count} of its {listed} samples")
            except DataError:
                raise
            except Exception as exc:  # tar, I/O and remote-storage errors alike
                bad.add(url)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._bad(f"shard {url} is unreadable ({reason})", "shard", worker, health)

    def _check_sample(self, key: str, members: dict[str, bytes], url: str, worker: int,
                      health: StreamHealth) -> dict[str, Any] | None:
        """``{"chip": array}`` (plus ``dates`` and ``gsd`` when wanted), or None if bad."""
        try:
            if "npy" not in members:
                raise ValueError(f"has no .npy member (members: {', '.join(members)})")
            out: dict[str, Any] = {"chip": decode_chip(members["npy"], self.chip_shape)}
            if self.want_json:
                out.update(_sample_meta(members.get("json"), self.dates))
            return out
        except ValueError as exc:
            self._bad(f"sample '{key}' in {url} {exc}", "sample", worker, health)
            return None

    def _bad(self, what: str, kind: str, worker: int, health: StreamHealth) -> None:
        if self.on_bad_data == "fail":
            raise DataError(f"{what} (on_bad_data: fail; set on_bad_data: skip to skip bad "
                            f"data and count it)")
        if kind == "shard":
            health.bad_shards += 1
        else:
            health.bad_samples += 1
        logger.warning("skipping bad data, stream %d/%d: %s (%d bad shard(s), %d bad "
                       "sample(s) so far in this stream)", self.rank, worker, what,
                       health.bad_shards, health.bad_samples)

    def transform(self, sample: dict[str, Any], worker: int, index: int) -> dict[str, Any]:
        """Normalise, random-resized-crop and flip one checked sample (a stack's dates as
        one: the same crop and flip on every date)."""
        x = torch.from_numpy(sample["chip"].astype(np.float32))  # DN; reflectance = DN / 10000
        t = self.dates
        valid = x != NODATA
        if t > 1:  # [T, C, H, W] -> [T*C, H, W]: bands of every date side by side
            x, valid = x.flatten(0, 1), valid.flatten(0, 1)
        x = normalise(x, valid, self.normalisation, self.mean.repeat(t), self.std.repeat(t))
        rng = np.random.default_rng([self.seed, self.stage_index, self.generation, self.rank,
                                     worker, index])
        x = random_resized_crop(x, self.img_size, self.crop_scale, self.crop_ratio, rng)
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        out = {"image": x, "worker": worker, "index": index, "key": sample["__key__"]}
        if t > 1:
            out["image"] = x.view(t, self.num_bands, self.img_size, self.img_size)
            out["dates"] = sample["dates"]
            # a date with no valid pixel (nodata over the whole chip) is left out of the loss
            out["valid"] = valid.view(t, -1).any(dim=1).float()
        if "gsd" in sample:
            out["gsd"] = sample["gsd"]
        return out


def _sample_meta(raw: bytes | None, dates: int) -> dict[str, Any]:
    """``dates`` ``[T, 2]`` float32 (year, day of year) and ``gsd`` (m/px) from a sample's
    JSON member; ValueError naming what is missing or wrong (the sample is then bad data)."""
    import datetime as dt

    try:
        meta = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("has no readable .json member (needed for dates and GSD)") from None
    if not isinstance(meta, dict):
        raise ValueError("has a .json member that is not an object")
    stamps = meta.get("datetimes")
    if not isinstance(stamps, list) or len(stamps) != dates:
        raise ValueError(f"has {len(stamps) if isinstance(stamps, list) else 'no'} datetimes in its "
                         f".json, expected {dates}")
    rows = []
    for stamp in stamps:
        try:
            when = dt.datetime.fromisoformat(str(stamp)[:19])
        except ValueError:
            raise ValueError(f"has a datetime {str(stamp)[:40]!r} that is not ISO 8601") from None
        rows.append((float(when.year), float(when.timetuple().tm_yday)))
    gsd = meta.get("gsd")
    if not isinstance(gsd, (int, float)) or isinstance(gsd, bool) or not 0 < gsd < 1e5:
        raise ValueError(f"has a gsd {str(gsd)[:20]!r} that is not a positive number")
    return {"dates": torch.tensor(rows, dtype=torch.float32), "gsd": float(gsd)}


class MixedStream(IterableDataset):
    """The sample stream of one rank in a stage of several data sets (``StageConfig.datasets``).

    Every ``micro_batch`` consecutive samples of a stream (one micro-batch: the loader batches
    each worker's samples in order) come from one data set, drawn with the stage's weights by
    an RNG seeded per seed, stage, rank and stream: batches have one shape, and the mix is
    the same in every run. The running index covers the mixed stream, so a resumed run
    replays the draws while it skips and continues exactly. Yields what :class:`ShardStream`
    yields (each data set normalised with its own statistics), plus ``dataset``, the index
    of the data set drawn.
    """

    def __init__(self, streams: Sequence[ShardStream], weights: Sequence[float], micro_batch: int) -> None:
        super().__init__()
        self.streams = list(streams)
        p = np.asarray(weights, dtype=np.float64)
        self.p = p / p.sum()
        self.micro_batch = micro_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lead = self.streams[0]
        worker, num_workers = lead.worker()
        healths = [StreamHealth() for _ in self.streams]
        subs = [s.raw_samples(worker, num_workers, h) for s, h in zip(self.streams, healths, strict=True)]
        draw = np.random.default_rng([lead.seed, lead.stage_index, lead.generation, lead.rank, worker, 1])
        skip = lead.skip[worker] if worker < len(lead.skip) else 0
        index = 0
        while True:
            k = int(draw.choice(len(subs), p=self.p))
            for _ in range(self.micro_batch):
                sample = next(subs[k])
                if index >= skip:  # before: fast-forward on resume, checked, not transformed
                    yield {**self.streams[k].transform(sample, worker, index), "dataset": k,
                           "bad_samples": sum(h.bad_samples for h in healths),
                           "bad_shards": sum(h.bad_shards for h in healths)}
                index += 1


def make_loader(stream: ShardStream | MixedStream, *, micro_batch: int, num_workers: int,
                num_batches: int, pin_memory: bool = False) -> wds.WebLoader:
    """Batches of ``micro_batch`` from ``stream``; an epoch is ``num_batches`` batches.

    With an iterable dataset each batch comes whole from one worker, in round-robin order,
    so :meth:`track` can attribute consumed samples to workers exactly.
    """
    loader = wds.WebLoader(stream, batch_size=micro_batch, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=False,
                           prefetch_factor=2 if num_workers > 0 else None)
    return loader.with_epoch(num_batches)


def iterate(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches of ``loader``; a :class:`DataError` from a worker comes out as one line.

    (The DataLoader re-raises a worker's exception with the worker's traceback in its
    message; the CLI prints messages as they are.)
    """
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as exc:
            lines = [x for x in str(exc).splitlines() if x.strip()]
            if len(lines) > 1 and "Traceback" in str(exc):
                last = lines[-1]
                raise DataError(last.split("DataError: ", 1)[-1]) from None
            raise
        yield batch


def track(position: DataPosition, rank: int, batch: dict[str, Any]) -> None:
    """Record that the samples of ``batch`` were consumed by ``rank``, and its bad-data counts."""
    row = position.consumed[rank]
    workers = batch["worker"].tolist()
    for worker, index in zip(workers, batch["index"].tolist()):
        row[worker] = max(row[worker], index + 1)
    if "bad_samples" in batch:
        for counts, key in ((position.bad_samples[rank], "bad_samples"),
                            (position.bad_shards[rank], "bad_shards")):
            for worker, n in zip(workers, batch[key].tolist()):
                counts[worker] = max(counts[worker], int(n))
    position.next_stream[rank] = (workers[-1] + 1) % len(row)
