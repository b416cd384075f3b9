"""Run a fine-tuned SpectralGPT classifier on images: logits or probabilities per image.

Usage::

    python -m training.predict CHECKPOINT INPUT --output OUT [--probabilities [--multilabel]]
        [--normalise] [--normalisation auto|dataset_stats|per_image_minmax] [--manifest PATH]
        [--batch-size 32] [--preset NAME | --num-heads N]
    spectralgpt predict ...   (the same)

``CHECKPOINT``: an official fine-tuned classifier (``main_finetune.py`` with
``models_vit_tensor``, e.g. EuroSAT or BigEarthNet; ``{"model": ...}`` or a bare state dict,
``module.`` prefixes allowed), run by :class:`training.evaluation.official.OfficialClassifier`,
which gives the official outputs. Pretrained encoders (no classification head) are refused:
embeddings come from ``python -m training.embed``. Dense tasks (segmentation, change
detection; the official UPerNet models) are out of scope: their checkpoints are refused in
one line.

``INPUT``:

* ``.npy`` ``[N, 12, H, W]`` (or one image ``[12, H, W]``), bands in the model order B01 B02
  B03 B04 B05 B06 B07 B08 B8A B09 B11 B12, H = W = the model's ``img_size``: **the model
  input as given** (cast to float32). ``--normalise`` treats it as digital numbers (0 =
  nodata) and applies the checkpoint's normalisation first
  (``checkpoints.resolve_normalisation`` / ``checkpoints.normalise``).
* a GeoTIFF / COG (``.tif``, ``.tiff``): digital numbers, always normalised. Bands are put
  in model order by name when every band description names a Sentinel-2 band (extra bands
  such as B10 are dropped; missing ones are an error), otherwise the file must have exactly
  12 bands, taken to be in model order. Pixels equal to the band's nodata value (and NaN)
  become 0, the normalisation's nodata. The image is cut into ``img_size`` windows - no
  resampling, which would change the ground distance the model was tuned on: a grid of
  non-overlapping windows from the top-left corner, plus, when a side is not a multiple of
  ``img_size``, one more column (row) of windows flush with the right (bottom) edge, which
  overlaps its neighbour, so every pixel is seen. One output row per window, row-major;
  each window is normalised on its own (per-image min-max is per model input, as in
  training). Images smaller than ``img_size`` are refused.

``OUT``: ``.npy`` float32 ``[N, C]``, or ``.csv`` with one row per image: ``index`` (``.npy``
input) or ``window,row_off,col_off`` (pixel offsets of the window's top-left corner,
GeoTIFF input), then ``logit_0..logit_{C-1}`` (or ``prob_*``). Values are raw logits; with
``--probabilities`` softmax over classes (single-label, EuroSAT) or, with ``--multilabel``,
an independent sigmoid per class (BigEarthNet). Written under a temporary name in the same
folder, then renamed: a reader never sees a partial file.

Normalisation caveat: ``auto`` gives an official checkpoint the per-image min-max of
official *pretraining*. The official fine-tuning fed other inputs (EuroSAT: per-band
z-scores; BigEarthNet: mean +- 2 std scaled to [0, 1]; ``../shared/research/spectralgpt.md``
section 4.4), which the checkpoint does not record; to reproduce it exactly, prepare the
``.npy`` input that way and leave ``--normalise`` off.

Exit codes: 0 done, 2 a user mistake (missing or unreadable file, wrong band count or size,
a checkpoint that is not a classifier; one line on stderr), 6 disk full, 130 interrupted,
1 a bug (with a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from training.errors import DiskFullError, TrainingError, no_space
from training.evaluation import checkpoints
from training.evaluation.checkpoints import Checkpoint, Normalisation
from training.evaluation.errors import EvaluationError
from training.evaluation.official import OfficialClassifier
from training.evaluation.readers import band_name, model_bands, to_model_order

logger = logging.getLogger(__name__)

__all__ = ["Prediction", "load_classifier", "main", "predict", "read_geotiff", "read_npy",
           "run_model", "tile_offsets", "write_output"]

GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class Prediction:
    """What :func:`predict` computed and wrote."""

    values: NDArray[np.float32]
    """``[N, C]`` logits, or probabilities with ``probabilities``."""
    probabilities: bool
    keys: dict[str, list[int]] = field(default_factory=dict)
    """Columns naming each row: ``index``, or ``window``/``row_off``/``col_off`` (px)."""
    output: Path | None = None
    normalisation: Normalisation | None = None


# --------------------------------------------------------------------------- the model


def load_classifier(path: str | Path, *, preset: str | None = None,
                    num_heads: int | None = None) -> tuple[Checkpoint, OfficialClassifier]:
    """Read a fine-tuned classifier checkpoint and build its model (eval mode, CPU, fp32).

    Raises:
        EvaluationError: missing or unreadable, or not a classifier (one line).
    """
    ckpt = checkpoints.load_checkpoint(path, preset, num_heads=num_heads)
    if ckpt.kind != "official_classifier" or ckpt.classifier is None:
        raise EvaluationError(f"'{path}' is a pretrained encoder ({ckpt.kind}), not a fine-tuned "
                              "classifier: training.predict needs a classification head "
                              "(embeddings: python -m training.embed)")
    model = OfficialClassifier(ckpt.classifier)
    try:
        model.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as exc:
        raise EvaluationError(f"'{path}': state dict does not fit the official classifier: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    return ckpt, model.eval()


def run_model(model: OfficialClassifier, batches: Iterator[Tensor],
              device: torch.device) -> NDArray[np.float32]:
    """Logits ``[N, C]`` of the model inputs ``[b, 12, S, S]`` in ``batches``, in order."""
    out: list[NDArray[np.float32]] = []
    model = model.to(device)
    with torch.inference_mode():
        for x in batches:
            out.append(model(x.to(device, torch.float32)).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.spec.num_classes), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def activate(logits: NDArray[np.float32], multilabel: bool) -> NDArray[np.float32]:
    """Softmax over classes (single-label) or a sigmoid per class (``multilabel``)."""
    t = torch.from_numpy(logits)
    return (t.sigmoid() if multilabel else t.softmax(dim=1)).numpy()


# --------------------------------------------------------------------------- inputs


def read_npy(path: Path, bands: int, size: int) -> NDArray[Any]:
    """``[N, bands, size, size]`` array of a ``.npy`` file, memory-mapped (``[bands, size,
    size]`` is one image).

    Raises:
        EvaluationError: unreadable, not numeric, wrong shape or band count.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read INPUT '{path}' as .npy: "
                              f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
        raise EvaluationError(f"INPUT '{path}' is not a numeric array")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise EvaluationError(f"INPUT '{path}' has shape {list(arr.shape)}: give [N, {bands}, "
                              f"{size}, {size}] (images, bands, rows, columns)")
    if arr.shape[1] != bands:
        raise EvaluationError(f"INPUT '{path}' has {arr.shape[1]} bands (shape "
                              f"{list(arr.shape)}): the model takes {bands} "
                              f"({' '.join(model_bands())})")
    if arr.shape[2:] != (size, size):
        raise EvaluationError(f"INPUT '{path}' images are {arr.shape[2]}x{arr.shape[3]} px: the "
                              f"model takes {size}x{size} (cut or resize them first, or give "
                              f"a GeoTIFF, which is cut into {size} px windows)")
    return arr


def _names(descriptions: Sequence[str | None]) -> list[str] | None:
    """Canonical band names when every description names a distinct band, else None."""
    names = [band_name(d) if d else None for d in descriptions]
    if all(names) and len(set(names)) == len(names):
        return [n for n in names if n]
    return None


def read_geotiff(path: Path) -> NDArray[np.float32]:
    """A GeoTIFF / COG as digital numbers ``[12, H, W]`` float32 in model band order;
    nodata and NaN -> 0 (module doc for the band rules).

    Raises:
        EvaluationError: unreadable, bands missing, or not 12 unnamed bands.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                data = src.read().astype(np.float32)  # [C, H, W]
                descriptions, nodata = tuple(src.descriptions), tuple(src.nodatavals)
        except RasterioIOError as exc:
            raise EvaluationError(f"cannot read INPUT '{path}' as a GeoTIFF: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
    for i, value in enumerate(nodata):
        if value is not None and not np.isnan(value) and value != 0:
            data[i][data[i] == value] = 0.0
    data[~np.isfinite(data)] = 0.0
    names = _names(descriptions)
    if names is not None:
        return to_model_order(data, names, f"INPUT '{path}'")  # MissingBandsError names them
    want = len(model_bands())
    if data.shape[0] != want:
        raise EvaluationError(f"INPUT '{path}' has {data.shape[0]} bands and no band names in "
                              f"its descriptions: give {want} bands in the order "
                              f"{' '.join(model_bands())}, or name them")
    return data


def tile_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` px of the ``size`` windows covering an image, row-major: a
    non-overlapping grid, plus one window flush with the far edge when a side is not a
    multiple of ``size``.

    Raises:
        EvaluationError: the image is smaller than one window.
    """
    if height < size or width < size:
        raise EvaluationError(f"the image is {height}x{width} px: smaller than the model's "
                              f"{size}x{size} input")

    def starts(n: int) -> list[int]:
        s = list(range(0, n - size + 1, size))
        return s + [n - size] if s[-1] + size < n else s

    return [(r, c) for r in starts(height) for c in starts(width)]


# --------------------------------------------------------------------------- output


def write_output(pred: Prediction, out: Path) -> None:
    """Write ``pred`` to ``out`` (``.npy`` or ``.csv``) atomically: a temporary file in the
    same folder, fsynced, then ``os.replace``.

    Raises:
        DiskFullError: no space left (nothing published); EvaluationError: not writable.
    """
    if out.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        prefix = "prob" if pred.probabilities else "logit"
        keys = list(pred.keys)
        w.writerow(keys + [f"{prefix}_{c}" for c in range(pred.values.shape[1])])
        for i, row in enumerate(pred.values):
            w.writerow([pred.keys[k][i] for k in keys] + [f"{v:.9g}" for v in row])
        payload = buf.getvalue().encode()
    else:
        raw = io.BytesIO()
        np.save(raw, pred.values)
        payload = raw.getvalue()
    tmp: str | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        full = no_space(exc)
        if full is not None:
            raise DiskFullError.at("predictions", out, full) from None
        raise EvaluationError(f"cannot write --output '{out}': {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------- the run


def _batches(images: NDArray[Any], batch_size: int,
             norm: Normalisation | None) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        # a writable float32 copy of the (memory-mapped, read-only) slice
        x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))
        yield checkpoints.normalise(x, norm) if norm is not None else x


def _window_batches(image: NDArray[np.float32], offsets: list[tuple[int, int]], size: int,
                    batch_size: int, norm: Normalisation) -> Iterator[Tensor]:
    for start in range(0, len(offsets), batch_size):
        x = torch.from_numpy(np.stack([image[:, r:r + size, c:c + size]
                                       for r, c in offsets[start:start + batch_size]]))
        yield checkpoints.normalise(x, norm)


def _normalisation(ckpt: Checkpoint, mode: str, manifest: str | None) -> Normalisation:
    norm = checkpoints.resolve_normalisation(ckpt, mode, manifest)  # type: ignore[arg-type]
    if ckpt.kind == "official_classifier" and mode == "auto":
        logger.warning("normalising with %s (%s); the official fine-tuning used other inputs "
                       "(EuroSAT z-scores, BigEarthNet mean +- 2 std): for those, give the "
                       "prepared .npy without --normalise", norm.mode, norm.source)
    return norm


def predict(checkpoint: str | Path, source: str | Path, output: str | Path | None = None, *,
            normalise: bool = False, normalisation: str = "auto", manifest: str | None = None,
            probabilities: bool = False, multilabel: bool = False, batch_size: int = 32,
            preset: str | None = None, num_heads: int | None = None,
            device: torch.device | None = None) -> Prediction:
    """Classify ``source`` (module doc) with ``checkpoint``; write ``output`` when given.

    Args:
        normalise: for ``.npy`` input, apply the checkpoint's normalisation (DN input);
            GeoTIFFs are always normalised.
        normalisation, manifest: passed to ``checkpoints.resolve_normalisation``.
        probabilities, multilabel: softmax, or sigmoid with ``multilabel``, instead of logits.

    Returns:
        The :class:`Prediction` (``values`` ``[N, C]``).

    Raises:
        EvaluationError: any user mistake, in one line.
    """
    src, out = Path(source), Path(output) if output is not None else None
    if batch_size < 1:
        raise EvaluationError("--batch-size must be >= 1")
    if out is not None and out.suffix.lower() not in (".npy", ".csv"):
        raise EvaluationError(f"--output '{out}' must end in .npy or .csv")
    if out is not None and out.is_dir():
        raise EvaluationError(f"--output '{out}' is a folder: name a .npy or .csv file")
    kind = src.suffix.lower()
    if kind != ".npy" and kind not in GEOTIFF_SUFFIXES:
        raise EvaluationError(f"INPUT '{src}' must be a .npy array or a GeoTIFF (.tif, .tiff)")
    if not src.is_file():
        raise EvaluationError(f"INPUT '{src}' not found")
    ckpt, model = load_classifier(checkpoint, preset=preset, num_heads=num_heads)
    spec = model.spec
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    norm: Normalisation | None = None
    if kind == ".npy":
        images = read_npy(src, spec.num_bands, spec.img_size)
        if normalise:
            norm = _normalisation(ckpt, normalisation, manifest)
        logits = run_model(model, _batches(images, batch_size, norm), device)
        keys = {"index": list(range(images.shape[0]))}
    else:
        image = read_geotiff(src)
        offsets = tile_offsets(image.shape[1], image.shape[2], spec.img_size)
        norm = _normalisation(ckpt, normalisation, manifest)
        logits = run_model(model, _window_batches(image, offsets, spec.img_size, batch_size,
                                                  norm), device)
        keys = {"window": list(range(len(offsets))), "row_off": [r for r, _ in offsets],
                "col_off": [c for _, c in offsets]}
    values = activate(logits, multilabel) if probabilities else logits
    pred = Prediction(values, probabilities, keys, out, norm)
    if out is not None:
        write_output(pred, out)
    return pred


# --------------------------------------------------------------------------- CLI


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Classify images with a fine-tuned "
                                "SpectralGPT classifier: logits or probabilities per image.")
    p.add_argument("checkpoint", help="official fine-tuned classifier (.pth)")
    p.add_argument("input", help=".npy [N, 12, H, W] model input, or a 12-band GeoTIFF (DN)")
    p.add_argument("--output", "-o", required=True, help="OUT.npy ([N, C]) or OUT.csv")
    p.add_argument("--probabilities", action="store_true",
                   help="softmax (or sigmoid with --multilabel) instead of raw logits")
    p.add_argument("--multilabel", action="store_true",
                   help="with --probabilities: classes are independent (BigEarthNet), "
                   "a sigmoid per class instead of the softmax")
    p.add_argument("--normalise", action="store_true",
                   help=".npy input is DN: apply the checkpoint's normalisation first")
    p.add_argument("--normalisation", default="auto",
                   choices=("auto", "dataset_stats", "per_image_minmax"))
    p.add_argument("--manifest", help="dataset manifest with the statistics for dataset_stats")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", help="head counts of this preset (default: by width and depth)")
    p.add_argument("--num-heads", type=int, help="attention heads, for sizes no preset has")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m training.predict") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        pred = predict(args.checkpoint, args.input, args.output, normalise=args.normalise,
                       normalisation=args.normalisation, manifest=args.manifest,
                       probabilities=args.probabilities, multilabel=args.multilabel,
                       batch_size=args.batch_size, preset=args.preset, num_heads=args.num_heads)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted: nothing was written", file=sys.stderr)
        return 130
    n, c = pred.values.shape
    what = "probabilities" if pred.probabilities else "logits"
    logger.info("%d image(s) x %d classes of %s written to %s", n, c, what, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
