"""Embed every chip of a dataset with a pretrained encoder, as GeoParquet; search the vectors.

Usage::

    python -m training.embed --checkpoint CKPT --manifest MANIFEST --dataset NAME \\
        [--split train|val|all] --output OUT [--pool mean|groups|none] [--float16]
    python -m training.embed --checkpoint CKPT --aoi NAME | --bbox W,S,E,N [--catalog ...] --output OUT
    torchrun --standalone --nproc_per_node N -m training.embed ...      (or the deepspeed launcher)
    python -m training.embed search OUT (--key KEY | --point LON,LAT) [-k 10] [--html PAGE]

``CKPT`` is anything ``python -m training.evaluate`` takes (a DeepSpeed run or checkpoint
folder, an export of ``training.export``, an official SpectralGPT ``.pth``). The encoder runs
without masking on every sample (time stacks with their acquisition dates), with the input
normalisation of its pretraining (``training.evaluation.checkpoints.resolve_normalisation``;
when it used dataset statistics that the checkpoint does not carry, the embedded data set's),
and a model with the GSD encoding gets each sample's ``gsd``, as in pretraining.

``OUT`` (a local folder or an fsspec URL such as ``s3://bucket/emb``) becomes a GeoParquet 1.1
dataset: one part per input shard, ``OUT/<dataset>/<split>/<shard stem>.parquet``, one row per
sample (columns: :data:`COLUMNS`; ``embedding`` is a fixed-size list of float32, or float16 with
``--float16``: ``D`` values for ``--pool mean``, ``G x D`` (group-major) for ``--pool groups``).
``--pool none`` keeps the encoder's tokens: the rows carry no ``embedding`` and
``OUT/_tokens/<dataset>/<split>/<shard stem>.zarr`` (a ``_`` name: GeoParquet readers skip
it) holds an array ``tokens`` ``[N, (T,) G, L, D]`` in row order. ``--aoi``/``--bbox`` builds
the area's dataset under ``OUT/_dataset/`` first; ``search --index hnsw`` keeps its index in
``OUT/_index/``. Every part's key-value metadata holds ``geo`` (GeoParquet)
and ``spectralgpt`` (:data:`EMBED_FORMAT`, the checkpoint's sha256, the model config, the
normalisation, the pooling). ``OUT/_run.json`` (written first) names the run; a run with
other inputs refuses the folder. ``OUT/_embeddings.json`` (written last, after every part was
counted) is the completion record: rows per split, every sample exactly once.

A part appears under its final name only when complete (a temporary file, then a rename or
one upload); a killed run resumes and skips finished parts. With several processes, rank
``r`` embeds parts ``r, r + N, ...``: the parts, so the rows, are the same for any N.
bf16 autocast on GPU, fp32 on CPU.

Exit codes: 0 done, 2 bad input or unreadable data (one line on stderr), 3 the result is
incomplete (rows missing or twice), 6 disk full, 130 interrupted (run it again to resume),
1 a bug (with a traceback); ``search``: 0, or 2 for a bad query. The area's build keeps the
pipeline's own exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.build_shards import glue_negative_values
from pipeline.location import Location
from pipeline.names import UnsafeName, safe_name
from spectralgpt import __version__
from training.data import (
    READABLE_FORMATS,
    _read_manifest,
    _sample_meta,
    decode_chip,
    is_remote,
    open_shard,
    read_shard_set,
    tar_samples,
)
from training.errors import DataError, DiskFullError, TrainingError, no_space
from training.evaluation.checkpoints import (
    Checkpoint,
    Normalisation,
    build_mae,
    load_checkpoint,
    normalise,
    resolve_normalisation,
)
from training.evaluation.errors import EvaluationError
from training.evaluation.heads import POOLS, Embedder, Encoder

logger = logging.getLogger(__name__)

EMBED_FORMAT = "spectralgpt-embeddings/1"
QUALITY = ("nodata", "invalid", "cloud", "shadow", "cirrus", "snow")
#: The columns of every part, in order (``embedding`` absent with ``--pool none``).
COLUMNS = ("key", "shard", "geometry", "bbox", "crs", "transform", "datetime", "datetimes",
           "scene_ids", "tile", "dataset", "dataset_version", "split", "gsd",
           *(f"quality_{q}" for q in QUALITY), "quality_scl", "embedding")
#: Points per footprint edge: chip corners reprojected alone would cut the curved edges of a
#: large chip in lon/lat; 8 keep a 1,000 px chip's outline within a metre.
EDGE_POINTS = 8


class IncompleteError(TrainingError):
    """The parts hold fewer or more rows than the manifest lists: not a complete result."""

    exit_code = 3


@dataclass(frozen=True)
class EmbedConfig:
    """One embedding run (the flags of ``python -m training.embed``)."""

    checkpoint: str
    manifest: str
    dataset: str
    output: str
    split: str = "all"
    """``train``, ``val`` or ``all`` (every split the manifest lists)."""
    pool: str = "mean"
    float16: bool = False
    batch_size: int = 32
    workers: int | None = None
    """DataLoader worker processes reading and normalising shards (0: in the main process).
    None: 2 on a GPU; 0 on CPU, where the model's threads use every core and a reader process
    only competes with them (tiny, 128 px, 2 cores: 0.86 of forward-only throughput with 0
    workers, 0.74 with 1; benchmarks/bench_embed.py)."""
    normalisation: str = "auto"
    version: str = "latest"
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise EvaluationError(f"--pool {self.pool!r}: use one of {', '.join(POOLS)}")
        if self.batch_size < 1 or (self.workers is not None and self.workers < 0):
            raise EvaluationError("--batch-size must be >= 1 and --workers >= 0")


@dataclass(frozen=True)
class Part:
    """One input shard and the part file it becomes."""

    index: int
    split: str
    shard: str
    """Path or URL the shard is read from."""
    rel: str
    """The shard's path relative to the manifest's folder (the ``shard`` column)."""
    num_samples: int
    name: str
    """``<dataset>/<split>/<shard stem>.parquet`` under ``OUT``."""
    version: int | None


@dataclass(frozen=True)
class Plan:
    parts: tuple[Part, ...]
    shape: tuple[int, ...]
    """Stored chip shape ``(12, S, S)`` or ``(T, 12, S, S)``."""
    dates: int
    chip_size: int
    splits: dict[str, int]
    """Split -> samples listed in the manifest."""
    dataset_version: int | None
    manifest_hash: str | None
    mean: tuple[float, ...] = ()
    """The data set's per-band statistics (DN) at the version read, as the trainer uses them."""
    std: tuple[float, ...] = ()


# --------------------------------------------------------------------------- planning


def plan(cfg: EmbedConfig, ckpt: Checkpoint) -> Plan:
    """The parts of ``cfg.dataset`` (``DataError`` for a missing data set, split or shard)."""
    manifest = _read_manifest(cfg.manifest)
    if manifest.get("format") not in READABLE_FORMATS:
        raise DataError(f"manifest '{cfg.manifest}' has format {str(manifest.get('format'))[:60]!r}, "
                        f"expected one of {', '.join(READABLE_FORMATS)}")
    datasets = manifest.get("datasets") or {}
    if cfg.dataset not in datasets:
        raise DataError(f"data set '{cfg.dataset}' not in manifest '{cfg.manifest}' "
                        f"(available: {', '.join(datasets) or 'none'})")
    entry = datasets[cfg.dataset]
    shape = tuple(int(v) for v in entry.get("shape") or ())
    dates = shape[0] if entry.get("layout") == "TCHW" and len(shape) == 4 else 1
    listed = sorted((entry.get("splits") or {}))
    splits = listed if cfg.split == "all" else [cfg.split]
    version: int | str = int(cfg.version) if str(cfg.version).isdigit() else cfg.version
    if not splits:
        raise DataError(f"data set '{cfg.dataset}' in '{cfg.manifest}' has no splits")
    # the manifest's own checks (format, layout, bands, confined shard paths, files present),
    # for a model that takes this data set's chips at their size
    chip = int(entry.get("chip_size", shape[-1] if shape else 0))
    if chip < ckpt.config.patch_size or chip % ckpt.config.patch_size:
        raise DataError(f"data set '{cfg.dataset}' has {chip} px chips: the encoder takes sizes that are "
                        f"multiples of its patch size {ckpt.config.patch_size}")
    probe = dataclasses.replace(ckpt.config, img_size=chip, num_dates=dates,
                                max_dates=max(ckpt.config.max_dates, dates))
    root = str(cfg.manifest).rsplit("/", 1)[0] if is_remote(cfg.manifest) else \
        str(Path(cfg.manifest).resolve().parent)
    parts: list[Part] = []
    counts: dict[str, int] = {}
    resolved: int | None = None
    stats: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    for split in splits:
        listed_n = (entry.get("splits") or {}).get(split, {}).get("num_samples")
        if cfg.split == "all" and listed_n == 0:
            logger.info("split '%s' of '%s' holds no samples: nothing to embed there", split, cfg.dataset)
            continue
        try:
            safe_name(split, "split name")  # it becomes a folder of OUT
        except UnsafeName as exc:
            raise DataError(str(exc)) from None
        shard_set = read_shard_set(cfg.manifest, cfg.dataset, split, probe, version=version)
        counts[split] = shard_set.num_samples
        resolved, stats = shard_set.version, (shard_set.mean, shard_set.std)
        for url, n in zip(shard_set.shards, shard_set.shard_samples, strict=True):
            rel = url[len(root) + 1:] if url.startswith(root + "/") else Path(url).name
            stem = Path(rel).name.removesuffix(".tar")
            try:
                name = f"{safe_name(cfg.dataset, 'data set')}/{split}/{safe_name(stem, 'shard name')}.parquet"
            except UnsafeName as exc:
                raise DataError(str(exc)) from None
            m = re.search(r"-v(\d{4})-", stem)
            parts.append(Part(len(parts), split, url, rel, int(n or 0), name,
                              int(m.group(1)) if m else resolved))
    if not parts:
        raise DataError(f"data set '{cfg.dataset}' in '{cfg.manifest}' has no samples to embed")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise DataError(f"two shards of '{cfg.dataset}' share a file name: parts would collide")
    return Plan(tuple(parts), shape, dates, chip, counts, resolved, manifest.get("config_hash"), *stats)


# --------------------------------------------------------------------------- reading


def _meta(raw: bytes | None, key: str, shard: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"sample '{key[:80]}' in '{shard}' has no readable .json member") from None
    if not isinstance(meta, dict):
        raise DataError(f"sample '{key[:80]}' in '{shard}': its .json is not an object")
    return meta


def _parse_time(stamp: Any) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


class PartBatches(IterableDataset):  # type: ignore[type-arg]
    """Batches of normalised chips, part by part; each DataLoader worker takes every n-th part.

    Yields ``{"part": index, "last": bool, "x": [b, (T,) 12, S, S] float32, "dates": [b, T, 2]
    or None, "gsd": [b] m/px or None, "meta": list of b sample dicts}``; a part's last batch
    has ``last`` set (and may be empty). A sample that cannot be decoded, or a part with
    another count than the manifest lists, is a ``DataError``: embeddings are all or nothing.
    It travels as ``{"error": message}`` (a DataLoader worker's exception would reach the
    user as a traceback) and the main process raises it.
    """

    def __init__(self, parts: Sequence[Part], shape: tuple[int, ...], dates: int, batch_size: int,
                 norm: Normalisation, want_meta: bool) -> None:
        self.parts, self.shape, self.t, self.batch_size, self.norm = list(parts), shape, dates, batch_size, norm
        self.want_meta = want_meta
        """Dates and GSD from each sample's JSON, checked as the trainer does (stacks, GSD models)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            for i, part in enumerate(self.parts):
                if i % workers == worker:
                    yield from self._part(part)
        except TrainingError as exc:
            yield {"error": str(exc)}

    def _part(self, part: Part) -> Iterator[dict[str, Any]]:
        chips: list[np.ndarray] = []
        metas: list[dict[str, Any]] = []
        seen = 0
        try:
            with open_shard(part.shard) as fh:
                for key, members in tar_samples(fh):
                    if "npy" not in members:
                        raise DataError(f"sample '{key[:80]}' in '{part.rel}' has no .npy member")
                    try:
                        chips.append(decode_chip(members["npy"], self.shape))  # type: ignore[arg-type]
                    except ValueError as exc:
                        raise DataError(f"sample '{key[:80]}' in '{part.rel}': chip {exc}") from None
                    meta = _meta(members.get("json"), key, part.rel)
                    if self.want_meta:
                        try:
                            meta["_model"] = _sample_meta(members.get("json"), self.t)
                        except ValueError as exc:
                            raise DataError(f"sample '{key[:80]}' in '{part.rel}' {exc}") from None
                    meta["key"] = key  # the key in the shards, whatever the .json says
                    metas.append(meta)
                    seen += 1
                    if len(chips) == self.batch_size:
                        yield self._batch(part, chips, metas, last=False)
                        chips, metas = [], []
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read shard '{part.rel}': {exc}") from None
        if seen != part.num_samples:
            raise DataError(f"shard '{part.rel}' holds {seen} samples, the manifest lists {part.num_samples}")
        yield self._batch(part, chips, metas, last=True)

    def _batch(self, part: Part, chips: list[np.ndarray], metas: list[dict[str, Any]], *, last: bool) -> dict[str, Any]:
        if chips:
            x = normalise(torch.from_numpy(np.stack(chips).astype(np.float32)), self.norm)
        else:
            x = torch.zeros((0, *self.shape), dtype=torch.float32)
        model = [m.pop("_model") for m in metas] if self.want_meta else []
        dates = torch.stack([m["dates"] for m in model]) if model and self.t > 1 else None
        gsd = torch.tensor([m["gsd"] for m in model], dtype=torch.float32) if model else None
        return {"part": part.index, "last": last, "x": x, "dates": dates, "gsd": gsd, "meta": metas}


# --------------------------------------------------------------------------- rows


def _footprints(metas: Sequence[dict[str, Any]], size: int) -> tuple[list[bytes | None], np.ndarray]:
    """WKB polygons in lon/lat (EPSG:4326 coordinates, lon first) and ``[n, 4]`` bboxes.

    From each chip's native grid (``crs``, ``transform``, ``size`` px): the outline with
    :data:`EDGE_POINTS` points per edge, reprojected with PROJ. A sample without a grid falls
    back to its ``bbox_lonlat``; without either its geometry is null (bbox NaN).
    """
    import shapely
    from pyproj import Transformer

    n = len(metas)
    wkb: list[bytes | None] = [None] * n
    boxes = np.full((n, 4), np.nan)
    k = np.linspace(0.0, 1.0, EDGE_POINTS, endpoint=False)
    # outline in pixel units, counter-clockwise in lon/lat for a north-up grid (e < 0)
    cols = np.concatenate([k, np.ones_like(k), 1 - k, np.zeros_like(k)]) * size
    rows = np.concatenate([np.ones_like(k), 1 - k, np.zeros_like(k), k]) * size
    by_crs: dict[str, list[int]] = {}
    for i, m in enumerate(metas):
        tr = m.get("transform")
        if isinstance(m.get("crs"), str) and isinstance(tr, list) and len(tr) == 6:
            by_crs.setdefault(m["crs"], []).append(i)
        elif isinstance(m.get("bbox_lonlat"), list) and len(m["bbox_lonlat"]) == 4:
            w, s, e, nn = (float(v) for v in m["bbox_lonlat"])
            wkb[i] = shapely.to_wkb(shapely.box(w, s, e, nn))
            boxes[i] = (w, s, e, nn)
    for crs, idx in by_crs.items():
        to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        t = np.array([metas[i]["transform"] for i in idx], dtype=np.float64)  # a b c d e f
        x = t[:, 0:1] * cols + t[:, 1:2] * rows + t[:, 2:3]
        y = t[:, 3:4] * cols + t[:, 4:5] * rows + t[:, 5:6]
        lon, lat = to_lonlat.transform(x, y)
        polys = shapely.polygons(np.stack([lon, lat], axis=-1))
        for j, i in enumerate(idx):
            wkb[i] = shapely.to_wkb(polys[j])
            boxes[i] = (lon[j].min(), lat[j].min(), lon[j].max(), lat[j].max())
    return wkb, boxes


def _table(part: Part, metas: list[dict[str, Any]], emb: np.ndarray | None, size: int,
           dataset: str, embed_dtype: str) -> Any:
    """The rows of one part as a pyarrow Table (schema: :func:`schema`), with the ``geo``
    (GeoParquet) schema metadata of their footprints."""
    import pyarrow as pa

    wkb, boxes = _footprints(metas, size)
    times = [[_parse_time(s) for s in (m.get("datetimes") or [])] for m in metas]
    qual = [m.get("quality") if isinstance(m.get("quality"), dict) else {} for m in metas]

    def opt_float(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    cols: dict[str, Any] = {
        "key": [m["key"] for m in metas],
        "shard": [part.rel] * len(metas),
        "geometry": wkb,
        "bbox": [None if math.isnan(b[0]) else dict(zip(("xmin", "ymin", "xmax", "ymax"), map(float, b), strict=True))
                 for b in boxes],
        "crs": [m.get("crs") if isinstance(m.get("crs"), str) else None for m in metas],
        "transform": [[float(v) for v in m["transform"]] if isinstance(m.get("transform"), list) else None
                      for m in metas],
        "datetime": [ts[0] if ts else None for ts in times],
        "datetimes": times,
        "scene_ids": [[str(s) for s in m.get("scene_ids") or []] for m in metas],
        "tile": [m.get("tile") if isinstance(m.get("tile"), str) else None for m in metas],
        "dataset": [dataset] * len(metas),
        "dataset_version": [part.version] * len(metas),
        "split": [part.split] * len(metas),
        "gsd": [opt_float(m.get("gsd")) for m in metas],
        **{f"quality_{q}": [opt_float(d.get(q)) for d in qual] for q in QUALITY},
        "quality_scl": [d.get("scl") if isinstance(d.get("scl"), bool) else None for d in qual],
    }
    width = 0 if emb is None else int(np.prod(emb.shape[1:]))
    sch = schema(width, embed_dtype)
    arrays = [pa.array(cols[f.name], type=f.type) for f in sch if f.name != "embedding"]
    if emb is not None:
        flat = pa.array(emb.reshape(len(metas), width).astype(embed_dtype).ravel())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, width))
    geo = json.dumps(geo_metadata(boxes)).encode()
    return pa.Table.from_arrays(arrays, schema=sch).replace_schema_metadata({b"geo": geo})


def schema(width: int, embed_dtype: str = "float32") -> Any:
    """The parts' Arrow schema; ``width`` 0: no ``embedding`` column (``--pool none``)."""
    import pyarrow as pa

    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("geometry", pa.binary()),
        pa.field("bbox", pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])),
        pa.field("crs", pa.string()),
        pa.field("transform", pa.list_(pa.float64())),
        pa.field("datetime", pa.timestamp("ms", tz="UTC")),
        pa.field("datetimes", pa.list_(pa.timestamp("ms", tz="UTC"))),
        pa.field("scene_ids", pa.list_(pa.string())),
        pa.field("tile", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("dataset_version", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("gsd", pa.float64()),
        *(pa.field(f"quality_{q}", pa.float32()) for q in QUALITY),
        pa.field("quality_scl", pa.bool_()),
    ]
    if width:
        value = pa.float16() if embed_dtype == "float16" else pa.float32()
        fields.append(pa.field("embedding", pa.list_(value, width)))
    return pa.schema(fields)


def geo_metadata(boxes: np.ndarray) -> dict[str, Any]:
    """GeoParquet 1.1 file metadata for the ``geometry`` column (lon/lat, OGC:CRS84 axis order)."""
    from pyproj import CRS

    ok = boxes[~np.isnan(boxes[:, 0])] if len(boxes) else boxes
    bbox = [float(ok[:, 0].min()), float(ok[:, 1].min()), float(ok[:, 2].max()), float(ok[:, 3].max())] \
        if len(ok) else []
    column: dict[str, Any] = {
        "encoding": "WKB", "geometry_types": ["Polygon"], "crs": CRS("OGC:CRS84").to_json_dict(),
        "edges": "planar", "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if bbox:
        column["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


# --------------------------------------------------------------------------- the run


def _rank() -> tuple[int, int]:
    """``(rank, world size)`` from the launcher's environment (torchrun, deepspeed)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


class _Group:
    """The process group of a multi-process run (gloo on CPU, NCCL on GPU), or nothing."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world = world
        if world > 1:
            import torch.distributed as dist

            # the ranks wait for each other only at the start and the end: a slow rank's
            # whole share of the parts lies between, hence the long timeout
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=dt.timedelta(hours=float(os.environ.get("SPECTRALGPT_EMBED_TIMEOUT_H", "12"))))

    def share(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (all-gather), in rank order. A rank that died instead of
        reaching this point is one line here, not the collective's traceback."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as exc:  # gloo: "Connection closed by peer"; NCCL: a timeout
            raise EvaluationError(f"another rank stopped without reporting (see its output): "
                                  f"{str(exc).splitlines()[0][:200]}") from None
        return out

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class _RankError(TrainingError):
    """An error of one rank, raised on every rank with that rank's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _shared_errors(group: _Group, rank: int, error: TrainingError | None, value: Any = None) -> list[Any]:
    """All-gather ``(error, value)``; the first rank's error is raised on every rank."""
    report = None if error is None else (str(error), error.exit_code)
    got = group.share((report, value))
    for r, (rep, _) in enumerate(got):
        if rep is not None:
            raise _RankError(rep[0] if group.world == 1 or r == rank else f"rank {r}: {rep[0]}", rep[1])
    return [v for _, v in got]


def run_identity(cfg: EmbedConfig, ckpt: Checkpoint, pl: Plan, norm: Normalisation, sha: str) -> dict[str, Any]:
    """What ``_run.json`` records: a rerun with other values is another result (the splits
    are not part of it: ``--split train`` then ``--split all`` adds the val parts)."""
    return {"format": EMBED_FORMAT, "checkpoint_sha256": sha, "dataset": cfg.dataset,
            "dataset_version": pl.dataset_version, "manifest_config_hash": pl.manifest_hash,
            "pool": cfg.pool, "dtype": "float16" if cfg.float16 else "float32",
            "normalisation": {k: v for k, v in norm.describe().items() if k != "source"},  # values, not wording
            "chip_size": pl.chip_size, "dates": pl.dates}


def choose_normalisation(ckpt: Checkpoint, mode: str, pl: Plan, dataset: str) -> Normalisation:
    """The pretraining's normalisation (``resolve_normalisation``); when it used dataset
    statistics that the checkpoint does not carry and its run's manifest cannot be found, the
    statistics of the data set being embedded, at the version read (as the trainer would)."""
    trained = ckpt.info.get("normalisation") or (ckpt.run_config or {}).get("normalisation")
    if mode == "per_image_minmax" or (mode == "auto" and trained in (None, "per_image_minmax")):
        return resolve_normalisation(ckpt, mode)  # type: ignore[arg-type]
    if isinstance(ckpt.info.get("stats"), dict):
        return resolve_normalisation(ckpt, "dataset_stats")
    run = ckpt.run_config or {}
    stage = ckpt.info.get("stage")
    if run.get("manifest") and Path(str(run["manifest"])).is_file() and any(
            s.get("name") == stage and s.get("dataset") for s in run.get("stages", [])):
        return resolve_normalisation(ckpt, "dataset_stats")  # the pretraining data's own statistics
    version = f" v{pl.dataset_version}" if pl.dataset_version is not None else ""
    return Normalisation("dataset_stats", pl.mean, pl.std,
                         f"data set {dataset}{version} statistics (the checkpoint names none of its own)")


def _relative_manifest(loc: Location, manifest: str) -> str:
    """The manifest as ``_run.json`` records it: a URL as given, a local path relative to OUT
    (results name no folder of this machine, and a moved pair of folders still works)."""
    if is_remote(manifest) or loc.remote:
        return manifest
    return os.path.relpath(Path(manifest).resolve(), loc.local_root.resolve())


def _claim_output(loc: Location, identity: dict[str, Any], manifest: str) -> None:
    """Make ``OUT`` ours, or check that it already is, for these inputs (an area's dataset,
    built by this command under ``OUT/_dataset/``, is ours too); an empty ``identity``: check only."""
    try:
        found = loc.read_json("_run.json")
        if found is None:
            others = [n for n in loc.list("") if not n.startswith((".partial/", "_dataset/"))]
            if others:
                raise EvaluationError(f"--output '{loc.target}' is not empty and holds no embeddings of "
                                      f"training.embed (e.g. {others[0][:80]}): choose an empty or new folder")
            if identity:
                loc.write_json("_run.json", {**identity, "manifest": _relative_manifest(loc, manifest),
                                             "software_version": __version__})
            return
    except TrainingError:
        raise
    except OSError as exc:
        if no_space(exc):
            raise DiskFullError.at("embeddings", loc.target, exc) from None
        raise EvaluationError(f"cannot write to --output '{loc.target}': {exc.strerror or exc}") from None
    except Exception as exc:  # an fsspec backend's own errors (an unreachable endpoint, refused credentials)
        raise EvaluationError(f"cannot reach --output '{loc.target}': {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    diff = [k for k in identity if found.get(k) != identity[k]]
    if diff:
        raise EvaluationError(f"--output '{loc.target}' holds embeddings that differ from this run in "
                              f"{', '.join(diff)}: choose another --output")


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Run the embedding (module doc); returns the completion record (rank 0) or this rank's
    counts. Raises ``TrainingError`` subclasses for what the user can fix; every rank raises
    the first rank's error."""
    from training.export import checkpoint_sha256

    rank, world = _rank()
    device = _device()
    group = _Group(world, device)
    try:
        error: TrainingError | None = None
        try:
            ckpt = load_checkpoint(cfg.checkpoint, cfg.preset)
            pl = plan(cfg, ckpt)
            norm = choose_normalisation(ckpt, cfg.normalisation, pl, cfg.dataset)
            identity = run_identity(cfg, ckpt, pl, norm, checkpoint_sha256(ckpt))
            loc = Location(cfg.output)
            if rank == 0:
                _claim_output(loc, identity, cfg.manifest)
        except TrainingError as exc:
            error = exc
        _shared_errors(group, rank, error)
        done = set(loc.list(f"{cfg.dataset}/"))
        mine = [p for p in pl.parts if p.index % world == rank and p.name not in done]
        skipped = sum(p.index % world == rank and p.name in done for p in pl.parts)
        logger.info("rank %d/%d: %d part(s) to embed, %d finished by an earlier run; %s (%s), pool %s, %s",
                    rank, world, len(mine), skipped, norm.mode, norm.source, cfg.pool, device)
        t0 = time.monotonic()
        rows = 0
        try:
            rows = _embed_parts(cfg, ckpt, pl, norm, identity, mine, loc, device) if mine else 0
        except TrainingError as exc:
            error = exc
        seconds = time.monotonic() - t0
        counts = _shared_errors(group, rank, error, rows)
        if rank != 0:
            return {"rank": rank, "rows": rows, "seconds": seconds}
        return {**_finish(loc, pl, identity, sum(counts)), "seconds": seconds}
    finally:
        group.close()


def _embed_parts(cfg: EmbedConfig, ckpt: Checkpoint, pl: Plan, norm: Normalisation,
                 identity: dict[str, Any], parts: list[Part], loc: Location, device: torch.device) -> int:
    model = Embedder(Encoder(build_mae(ckpt, pl.chip_size)), cfg.pool).to(device).eval()
    stream = PartBatches(parts, pl.shape, pl.dates, cfg.batch_size, norm,
                         want_meta=pl.dates > 1 or ckpt.config.gsd_encoding)
    workers = cfg.workers if cfg.workers is not None else (2 if device.type == "cuda" else 0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    by_index = {p.index: p for p in parts}
    pending: dict[int, tuple[list[dict[str, Any]], list[np.ndarray]]] = {}
    tokens: dict[int, Any] = {}
    meta_info = {**identity, "model": dataclasses.asdict(dataclasses.replace(ckpt.config, img_size=pl.chip_size)),
                 "normalisation": norm.describe(),  # with the reason it was chosen
                 "checkpoint": {"kind": ckpt.kind, "name": Path(str(ckpt.path)).name},
                 "software_version": __version__}
    rows, t0, last_log = 0, time.monotonic(), time.monotonic()
    # the scratch folder lies inside OUT when OUT is local: token stores and parts move into
    # place with a rename on the same filesystem, and a full disk is OUT's
    base = loc.local_root / ".partial" if not loc.remote else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"embed-{os.getpid()}-", dir=base))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode():
            for batch in loader:
                if "error" in batch:
                    raise DataError(batch["error"])
                part = by_index[batch["part"]]
                metas, embs = pending.setdefault(part.index, ([], []))
                if batch["x"].shape[0]:
                    x = batch["x"].to(device, non_blocking=True)
                    dates = batch["dates"].to(device) if batch["dates"] is not None else None
                    gsd = batch["gsd"].to(device) if batch["gsd"] is not None else None
                    with autocast:
                        out = model(x, dates, gsd).float().cpu().numpy()
                    if cfg.pool == "none":
                        _tokens_write(tokens, scratch, part, len(metas), out, cfg.float16)
                    else:
                        embs.append(out)
                    metas.extend(batch["meta"])
                if batch["last"]:
                    metas, embs = pending.pop(part.index)
                    emb = np.concatenate(embs) if embs else None
                    if emb is None and cfg.pool != "none":  # an empty shard: a zero-row part
                        emb = np.zeros((0, ckpt.config.embed_dim), np.float32)
                    _publish_part(loc, scratch, part, metas, emb, pl, cfg, meta_info, tokens.pop(part.index, None))
                    rows += len(metas)
                    if time.monotonic() - last_log > 10 or part is parts[-1]:
                        last_log = time.monotonic()
                        rate = rows / max(last_log - t0, 1e-9)
                        logger.info("embedded %d rows (%.1f rows/s)", rows, rate)
    except OSError as exc:
        if no_space(exc):
            raise DiskFullError.at("embeddings", cfg.output, exc) from None
        raise EvaluationError(f"cannot write the embeddings to '{cfg.output}': {exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # this rank's own; `.partial` itself goes in _finish
    return rows


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate: batches are made by PartBatches (default_convert would walk
    every sample's metadata)."""
    return batch


def _tokens_write(tokens: dict[int, Any], scratch: Path, part: Part, start: int, out: np.ndarray,
                  float16: bool) -> None:
    """Rows ``start..`` of the part's token array, in a zarr store in the scratch folder."""
    import zarr

    if part.index not in tokens:
        path = scratch / f"{part.index}.zarr"
        arr = zarr.create_array(store=str(path), name="tokens", shape=(part.num_samples, *out.shape[1:]),
                                chunks=(min(64, max(part.num_samples, 1)), *out.shape[1:]),
                                dtype="float16" if float16 else "float32")
        tokens[part.index] = (path, arr)
    tokens[part.index][1][start:start + len(out)] = out.astype(np.float16 if float16 else np.float32)


def _publish_part(loc: Location, scratch: Path, part: Part, metas: list[dict[str, Any]], emb: np.ndarray | None,
                  pl: Plan, cfg: EmbedConfig, meta_info: dict[str, Any], tokens: Any) -> None:
    """Write one part: its tokens store first (``--pool none``), then its parquet file, whose
    appearance under its final name marks the part complete."""
    import pyarrow.parquet as pq

    table = _table(part, metas, emb, pl.chip_size, cfg.dataset, "float16" if cfg.float16 else "float32")
    info = {**meta_info, "part": part.name, "shard": part.rel, "rows": len(metas)}
    if emb is not None:
        info["embedding_shape"] = list(emb.shape[1:])
    if tokens is not None:
        path, arr = tokens
        rel = f"_tokens/{part.name.removesuffix('.parquet')}.zarr"
        info["tokens"] = {"path": rel, "shape": list(arr.shape)}
        loc.put_tree(path, rel)
    table = table.replace_schema_metadata({**table.schema.metadata, b"spectralgpt": json.dumps(info).encode()})
    tmp = scratch / f"{part.index}.parquet"
    pq.write_table(table, tmp, compression="zstd", row_group_size=max(len(metas), 1))
    loc.publish(tmp, part.name)


def _finish(loc: Location, pl: Plan, identity: dict[str, Any], rows_now: int) -> dict[str, Any]:
    """Count every part's rows and keys against the manifest; write ``_embeddings.json`` last."""
    import pyarrow.dataset as ds

    found = set(loc.list(f"{pl.parts[0].name.split('/')[0]}/"))
    missing = [p.name for p in pl.parts if p.name not in found]
    if missing:
        raise IncompleteError(f"{len(missing)} part(s) are missing after the run, e.g. {missing[0]}")
    target = loc.target if loc.remote else str(loc.local_root)
    files = [f"{target.rstrip('/')}/{p.name}" for p in pl.parts]
    fs = None
    if loc.remote:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(target, skip_instance_cache=True)  # not a cached client of another endpoint
        files = [f.split("://", 1)[1] for f in files]
    table = ds.dataset(files, format="parquet", filesystem=fs).to_table(columns=["key", "split"])
    keys = table.column("key").to_numpy(zero_copy_only=False)
    splits = table.column("split").to_numpy(zero_copy_only=False)
    per_split = {s: int((splits == s).sum()) for s in pl.splits}
    dupes = len(keys) - len(set(keys.tolist()))
    if per_split != pl.splits or dupes:
        raise IncompleteError(f"the parts hold {per_split} rows ({dupes} key(s) twice) but the manifest "
                              f"lists {pl.splits}: the result is incomplete")
    record = {**identity, "splits": sorted(pl.splits), "rows": per_split, "parts": len(pl.parts),
              "rows_this_run": rows_now, "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    loc.write_json("_embeddings.json", record)
    if not loc.remote:  # every rank is done: the staging folder goes if nothing else stages there
        with contextlib.suppress(OSError):
            (loc.local_root / ".partial").rmdir()
    logger.info("embeddings complete: %s rows in %d part(s) at %s", per_split, len(pl.parts), loc.target)
    return record


# --------------------------------------------------------------------------- search


@dataclass
class Vectors:
    """The rows of an embeddings folder: keys ``[N]``, unit vectors ``[N, E]`` float32."""

    keys: np.ndarray
    unit: np.ndarray
    shards: np.ndarray
    run: dict[str, Any]


def _dataset(out: str) -> tuple[Any, Location]:
    import pyarrow.dataset as ds

    loc = Location(out)
    run = loc.read_json("_embeddings.json")
    if run is None:
        raise EvaluationError(f"'{out}' holds no finished embeddings (no _embeddings.json): run "
                              "python -m training.embed first, or let it finish")
    fs = None
    target = out
    if loc.remote:
        import fsspec

        fs, target = fsspec.core.url_to_fs(out, skip_instance_cache=True)
    # the parts: what GeoParquet readers take too (names starting with '_' or '.' are not data)
    parts = [f"{target.rstrip('/')}/{n}" for n in loc.list("")
             if n.endswith(".parquet") and not any(c.startswith(("_", ".")) for c in n.split("/"))]
    return ds.dataset(parts, format="parquet", filesystem=fs), loc


def load_vectors(out: str) -> Vectors:
    """Keys and L2-normalised embeddings of a finished run (``EvaluationError`` otherwise)."""
    data, loc = _dataset(out)
    if "embedding" not in data.schema.names:
        raise EvaluationError(f"'{out}' was embedded with --pool none (tokens, no vectors): search needs "
                              "--pool mean or groups")
    table = data.to_table(columns=["key", "shard", "embedding"])
    emb = table.column("embedding").combine_chunks()
    width = emb.type.list_size
    vec = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    unit = np.divide(vec, norm, out=np.zeros_like(vec), where=norm > 0)
    return Vectors(table.column("key").to_numpy(zero_copy_only=False),
                   unit, table.column("shard").to_numpy(zero_copy_only=False), loc.read_json("_embeddings.json") or {})


def exact_top_k(unit: np.ndarray, query: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of the ``k`` rows nearest ``query`` (unit vectors),
    nearest first; rows are scored in chunks so memory stays ``chunk x E``."""
    best_i = np.zeros(0, dtype=np.int64)
    best_s = np.zeros(0, dtype=np.float32)
    for start in range(0, len(unit), chunk):
        s = unit[start:start + chunk] @ query
        take = min(k, len(s))
        idx = np.argpartition(-s, take - 1)[:take]
        best_i = np.concatenate([best_i, idx + start])
        best_s = np.concatenate([best_s, s[idx]])
        if len(best_i) > k:
            keep = np.argpartition(-best_s, k - 1)[:k]
            best_i, best_s = best_i[keep], best_s[keep]
    order = np.lexsort((best_i, -best_s))  # ties: the earlier row first (deterministic)
    return best_i[order], best_s[order]


def hnsw_index(unit: np.ndarray, *, m: int = 32) -> Any:
    """A faiss HNSW index (inner product) over the unit vectors ``unit`` ``[N, E]``."""
    import faiss

    index = faiss.IndexHNSWFlat(unit.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(unit, dtype=np.float32))
    return index


def hnsw_top_k(unit: np.ndarray, query: np.ndarray, k: int, *, index: Any = None,
               ef: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` by inner product (an index over ``unit`` is built if not given)."""
    index = index if index is not None else hnsw_index(unit)
    index.hnsw.efSearch = max(ef, k)
    sims, idx = index.search(np.ascontiguousarray(query[None], dtype=np.float32), k)
    ok = idx[0] >= 0
    return idx[0][ok].astype(np.int64), sims[0][ok]


def stored_index(out: str, vec: Vectors) -> Any:
    """The HNSW index of ``out``'s vectors, built once and kept as ``OUT/_index/hnsw.faiss``
    (with ``hnsw.json`` naming the finished run and row count it was built from)."""
    import faiss

    loc = Location(out)
    stamp = {"finished": vec.run.get("finished"), "rows": len(vec.keys)}
    with tempfile.TemporaryDirectory(prefix="embed-index-") as tmp:
        local = Path(tmp) / "hnsw.faiss"
        if loc.read_json("_index/hnsw.json") == stamp:
            local.write_bytes(loc.read_bytes("_index/hnsw.faiss"))
            return faiss.read_index(str(local))
        t0 = time.monotonic()
        index = hnsw_index(vec.unit)
        logger.info("HNSW index over %d vectors built in %.1f s; kept in %s/_index/", len(vec.keys),
                    time.monotonic() - t0, out)
        faiss.write_index(index, str(local))
        try:
            loc.publish(local, "_index/hnsw.faiss")
            loc.write_json("_index/hnsw.json", stamp)  # last: the index is complete when this names it
        except OSError as exc:  # a read-only OUT: searched, not kept
            logger.warning("the index could not be kept in %s/_index/ (%s): it is built again next time", out, exc)
        return index


#: Above this many rows ``--index auto`` uses the HNSW index (exact search reads every vector).
EXACT_MAX_ROWS = 500_000


def point_key(out: str, lon: float, lat: float) -> str:
    """The key of the sample whose footprint holds (lon, lat); the nearest footprint if none
    does (several: the first by key)."""
    import shapely

    data, _ = _dataset(out)
    table = data.to_table(columns=["key", "geometry"])
    keys = table.column("key").to_numpy(zero_copy_only=False)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    if not len(keys):
        raise EvaluationError(f"'{out}' holds no rows")
    inside = shapely.contains_xy(geoms, lon, lat)
    if inside.any():
        return str(sorted(keys[inside].tolist())[0])
    dist = shapely.distance(geoms, shapely.points(lon, lat))
    nearest = int(np.nanargmin(np.where(np.isnan(dist), np.inf, dist)))
    logger.warning("no footprint holds %.5f,%.5f: using the nearest sample %s (%.4f degrees away)",
                   lon, lat, keys[nearest], dist[nearest])
    return str(keys[nearest])


def search(out: str, *, key: str | None = None, point: tuple[float, float] | None = None, k: int = 10,
           index: str = "auto") -> list[tuple[str, float]]:
    """The ``k`` samples nearest (cosine) to ``key``'s embedding, or to the sample at ``point``."""
    vec = load_vectors(out)
    if key is None:
        assert point is not None
        key = point_key(out, *point)
    hits = np.flatnonzero(vec.keys == key)
    if not len(hits):
        raise EvaluationError(f"key {key[:100]!r} is not in '{out}'")
    q = vec.unit[hits[0]]
    k = min(k, len(vec.keys))
    use_hnsw = index == "hnsw" or (index == "auto" and len(vec.keys) > EXACT_MAX_ROWS)
    idx, sims = hnsw_top_k(vec.unit, q, k, index=stored_index(out, vec)) if use_hnsw else exact_top_k(vec.unit, q, k)
    found = [(str(vec.keys[i]), float(s)) for i, s in zip(idx, sims, strict=True)]
    # the query itself first when its similarity ties with another row's (duplicates)
    found.sort(key=lambda r: (-round(r[1], 6), r[0] != key))
    return found


def _chips(out: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Stored chips of ``keys``, read from the shards the run's manifest lists."""
    from pipeline.names import confined, safe_relpath

    data, loc = _dataset(out)
    rows = data.to_table(columns=["key", "shard"])  # not the vectors: only where the chips are
    run = loc.read_json("_run.json") or {}
    manifest = str(run.get("manifest") or "")
    if not manifest:
        raise EvaluationError(f"'{out}/_run.json' names no manifest: cannot show the chips")
    if not is_remote(manifest) and not loc.remote and not Path(manifest).is_absolute():
        manifest = str(loc.local_root / manifest)  # recorded relative to OUT
    root = manifest.rsplit("/", 1)[0] if is_remote(manifest) else str(Path(manifest).resolve().parent)
    want = set(keys)
    shards = sorted({str(s) for kk, s in zip(rows.column("key").to_pylist(), rows.column("shard").to_pylist(),
                                             strict=True) if kk in want})
    chips: dict[str, np.ndarray] = {}
    for rel in shards:
        try:
            url = f"{root}/{safe_relpath(rel, 'shard path')}" if is_remote(manifest) else \
                str(confined(Path(root), rel, "shard path"))
        except UnsafeName as exc:
            raise EvaluationError(str(exc)) from None
        try:
            with open_shard(url) as fh:
                for kk, members in tar_samples(fh):
                    if kk in want and "npy" in members:
                        chips[kk] = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
        except (OSError, ValueError) as exc:  # moved or removed since: the page says which chips are missing
            logger.warning("cannot read the chips of shard %s: %s", rel, exc)
    return chips


def write_html(out: str, page: Path, query: str, found: list[tuple[str, float]]) -> Path:
    """A page with the query chip and its neighbours in true colour (B04, B03, B02)."""
    import base64
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.inspect import TRUE_COLOUR, composite
    from training.evaluation.readers import model_bands

    bands = list(model_bands())
    idx = [bands.index(b) for b in TRUE_COLOUR]
    chips = _chips(out, [query, *(k for k, _ in found)])

    def tile(key: str, caption: str) -> str:
        chip = chips.get(key)
        if chip is None:
            img = "<div class='missing'>chip not found</div>"
        else:
            buf = io.BytesIO()
            plt.imsave(buf, composite(chip, idx), format="png")
            img = (f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}' "
                   f"width='160' height='160' alt='{html.escape(key)}'>")
        return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"

    body = [tile(query, f"query: {query}")]
    body += [tile(k, f"{k}  cosine {s:.4f}") for k, s in found]
    text = ("<!doctype html><html><head><meta charset='utf-8'><title>nearest samples</title><style>"
            "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:6px;width:170px;"
            "vertical-align:top}figcaption{font-size:11px;word-break:break-all}</style></head><body>"
            f"<h1>Nearest samples to {html.escape(query)}</h1>" + "".join(body) + "</body></html>")
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".{page.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, page)
    return page


# --------------------------------------------------------------------------- CLI


def _area_dataset(args: argparse.Namespace, ckpt: Checkpoint, chip: int) -> tuple[str, str]:
    """Build the area's dataset under ``OUT/_dataset`` (one chip size; a ``_`` name, so
    GeoParquet readers of OUT skip it); ``(manifest, dataset name)``. OUT is checked first:
    nothing is built into a folder that is not ours."""
    from pipeline.build_shards import main as build_main

    out = str(args.output).rstrip("/")
    from training.export import checkpoint_sha256

    _claim_output(Location(out), {}, "")  # refuses a foreign folder; writes nothing
    found = Location(out).read_json("_run.json")
    if found is not None and found.get("checkpoint_sha256") != checkpoint_sha256(ckpt):
        raise EvaluationError(f"--output '{out}' holds embeddings of another checkpoint: choose another --output")
    target = f"{out}/_dataset"
    with tempfile.TemporaryDirectory(prefix="embed-build-") as tmp:
        cfg = Path(tmp) / "build.yaml"
        cfg.write_text(json.dumps({"tiling": [{"size": chip, "gsd": 10}]}))  # JSON is YAML
        argv = ["--config", str(cfg), "--output", target]
        for flag in ("aoi", "bbox", "catalog", "start", "end"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        code = build_main(argv)
    if code != 0:
        raise _Exit(code, f"the dataset build for the area failed (exit {code}); nothing embedded")
    return f"{target}/manifest.json", f"s{chip}_g10m"


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Embed every sample of a dataset (GeoParquet); "
                                f"'{prog} search OUT ...' finds nearest samples.")
    p.add_argument("--checkpoint", required=True, help="DeepSpeed run/checkpoint folder, export, or official .pth")
    p.add_argument("--output", required=True, help="folder or fsspec URL for the GeoParquet parts")
    src = p.add_argument_group("what to embed: a dataset, or an area built first")
    src.add_argument("--manifest", help="the dataset's manifest.json (path or URL)")
    src.add_argument("--dataset", help="data set name in the manifest, e.g. s128_g10m")
    src.add_argument("--split", default="all", choices=("train", "val", "all"))
    src.add_argument("--version", default="latest", help="dataset version (default latest)")
    src.add_argument("--aoi", help="named AOI: build its dataset under OUT/_dataset, then embed it")
    src.add_argument("--bbox", help="W,S,E,N: as --aoi")
    src.add_argument("--catalog", help="STAC source for --aoi/--bbox (default: the embedded sample)")
    src.add_argument("--start", help="first date for --aoi/--bbox")
    src.add_argument("--end", help="last date for --aoi/--bbox")
    src.add_argument("--chip-size", type=int, help="chip size for --aoi/--bbox (default: the checkpoint's)")
    m = p.add_argument_group("model and output")
    m.add_argument("--pool", default="mean", choices=POOLS,
                   help="mean over all tokens (default), per spectral group (G x D), or none (tokens to zarr)")
    m.add_argument("--float16", action="store_true", help="store embeddings as float16")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes reading shards (default: 2 on GPU, 0 on CPU)")
    m.add_argument("--normalisation", default="auto", choices=("auto", "dataset_stats", "per_image_minmax"))
    m.add_argument("--preset", help="head counts for an official checkpoint (default: inferred)")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    m.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def search_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{prog} search", description="Nearest samples by cosine similarity: "
                                "KEY<TAB>SIMILARITY per line, nearest first.")
    p.add_argument("output", help="an embeddings folder or URL written by training.embed")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--key", help="a sample key")
    q.add_argument("--point", help="LON,LAT: the sample whose footprint holds it")
    p.add_argument("-k", type=int, default=10, help="how many (default 10)")
    p.add_argument("--index", default="auto", choices=("auto", "exact", "hnsw"),
                   help=f"exact (numpy) or approximate (faiss HNSW); auto: HNSW above {EXACT_MAX_ROWS:,} rows")
    p.add_argument("--html", type=Path, help="also write a page with the chips in true colour")
    return p


def _search_main(argv: list[str], prog: str) -> int:
    try:
        args = search_parser(prog).parse_args(glue_negative_values(argv, ("--point",)))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.k < 1:
            raise EvaluationError("-k must be >= 1")
        point = None
        if args.point is not None:
            try:
                lon, lat = (float(v) for v in args.point.split(","))
            except ValueError:
                raise EvaluationError(f"--point {args.point[:60]!r}: give LON,LAT in degrees") from None
            if not (-180 <= lon <= 180 and -90 <= lat <= 90):
                raise EvaluationError(f"--point {args.point[:60]!r}: out of range")
            point = (lon, lat)
        found = search(args.output, key=args.key, point=point, k=args.k, index=args.index)
        if args.html is not None:
            query = args.key or found[0][0]
            write_html(args.output, args.html, query, found)
            logger.info("page written: %s", args.html)
    except TrainingError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks share the stream
        return exc.exit_code
    for k, s in found:
        print(f"{k}\t{s:.6f}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m training.embed") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if argv[:1] == ["search"]:
        return _search_main(argv[1:], prog)
    try:
        args = build_parser(prog).parse_args(glue_negative_values(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed checkpoint folders on a CPU machine
    try:
        area = args.aoi is not None or args.bbox is not None
        if area == (args.manifest is not None):
            raise EvaluationError("give --manifest and --dataset, or --aoi/--bbox (an area to build first)")
        if area:
            ckpt = load_checkpoint(args.checkpoint, args.preset)
            manifest, dataset = _area_dataset(args, ckpt, args.chip_size or ckpt.config.img_size)
        else:
            if args.dataset is None:
                raise EvaluationError("--manifest needs --dataset NAME (e.g. s128_g10m)")
            manifest, dataset = args.manifest, args.dataset
        cfg = EmbedConfig(args.checkpoint, manifest, dataset, str(args.output), args.split, args.pool,
                          args.float16, args.batch_size, args.workers, args.normalisation, args.version,
                          args.preset)
        record = embed(cfg)
    except _Exit as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks share the stream
        return exc.code
    except TrainingError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks share the stream
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted: run the same command again to resume (finished parts are kept)",
              file=sys.stderr)
        return 130
    if "rows" in record and isinstance(record["rows"], dict):
        print(f"{sum(record['rows'].values())} rows in {record['parts']} part(s): {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
