"""Dataset-level evaluation metrics, pure numpy.

Every function takes the predictions of the *whole* evaluation set. The official SpectralGPT
BigEarthNet code averages a micro-AP computed per evaluation batch (torchmetrics
``multilabel_average_precision`` per batch, weighted by batch size,
``engine_finetune_BE.py`` L141-154): that number depends on the batch size and is not an
average precision of anything. Here AP is computed once over all samples. Likewise the
official OSCD code counts TP/FP/FN on ~50% overlapping crops (pixels counted up to four
times); change scores here come from counts accumulated over full images, each pixel once.
:func:`official_crop_change_scores` reproduces the official crop counting for comparison
with the published numbers (:func:`oscd_change_scores` gives both).

Definitions follow scikit-learn so numbers are comparable with the literature:

* ``average_precision``: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in
  decreasing order (sklearn ``average_precision_score``; no interpolation).
* mAP macro: the mean of the per-class APs over classes with at least one positive (a class
  with no positive has no defined recall; the number of classes counted is reported).
  mAP micro: one AP over all (sample, class) pairs flattened.
* IoU per class from a confusion matrix: ``TP / (TP + FP + FN)``; a class absent from both
  the ground truth and the predictions has no IoU and is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "average_precision",
    "binary_counts",
    "change_scores",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "multilabel_f1",
    "multilabel_map",
    "official_crop_change_scores",
    "oscd_change_scores",
    "oscd_crop_corners",
    "overall_accuracy",
    "segmentation_scores",
]


def overall_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples whose predicted class equals the true class."""
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"need equal, non-empty label arrays, got {t.shape} and {p.shape}")
    return float((t == p).mean())


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Binary average precision, sklearn's definition; ``nan`` when there is no positive.

    Args:
        y_true: ``[N]`` 0/1 (or bool) labels.
        scores: ``[N]`` real scores, higher = more likely positive.
    """
    t = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"labels {t.shape} and scores {s.shape} differ in shape")
    n_pos = int(t.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    # One threshold per distinct score: the last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(t)[last]
    predicted = last + 1
    precision = tp / predicted
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_map(y_true: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    """Macro and micro mAP of a multi-label problem over the whole set.

    Args:
        y_true: ``[N, C]`` 0/1 labels; scores: ``[N, C]`` scores (logits or probabilities).

    Returns:
        ``{"macro": float, "micro": float, "per_class": [C floats or nan],
        "classes_counted": int}``.
    """
    t = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"need [N, C] labels and scores of one shape, got {t.shape}, {s.shape}")
    per_class = [average_precision(t[:, c], s[:, c]) for c in range(t.shape[1])]
    defined = [ap for ap in per_class if not np.isnan(ap)]
    return {
        "macro": float(np.mean(defined)) if defined else float("nan"),
        "micro": average_precision(t.ravel(), s.ravel()),
        "per_class": per_class,
        "classes_counted": len(defined),
    }


def _f1(tp: NDArray[Any], fp: NDArray[Any], fn: NDArray[Any]) -> NDArray[np.float64]:
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def multilabel_f1(y_true: ArrayLike, probs: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """Macro and micro F1 of multi-label predictions ``probs >= threshold``.

    Macro: mean over classes with any positive in truth or prediction (others have no F1).
    Micro: F1 of the TP/FP/FN summed over all classes.
    """
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(probs) >= threshold
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
    tp = (t & p).sum(0)
    fp = (~t & p).sum(0)
    fn = (t & ~p).sum(0)
    per_class = _f1(tp, fp, fn)
    defined = per_class[~np.isnan(per_class)]
    micro = _f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]
    return {"macro": float(defined.mean()) if defined.size else float("nan"),
            "micro": float(micro), "per_class": per_class.tolist(), "threshold": threshold}


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int,
                     ignore_index: int | None = None) -> NDArray[np.int64]:
    """``[C, C]`` counts, rows = truth, columns = prediction; ``ignore_index`` pixels skipped."""
    t = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(y_pred).ravel().astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
    keep = t != ignore_index if ignore_index is not None else np.ones_like(t, dtype=bool)
    t, p = t[keep], p[keep]
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(f"labels outside 0..{num_classes - 1} (and not ignore_index "
                         f"{ignore_index}): {np.unique(np.r_[t[bad], p[bad]])[:5].tolist()}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes)


def iou_per_class(cm: ArrayLike) -> NDArray[np.float64]:
    """IoU of every class from a confusion matrix; ``nan`` where the class never occurs."""
    m = np.asarray(cm, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(cm: ArrayLike, exclude: int | None = None) -> float:
    """Mean IoU over the classes that occur, optionally leaving class ``exclude`` out."""
    iou = iou_per_class(cm)
    if exclude is not None:
        iou = np.delete(iou, exclude)
    iou = iou[~np.isnan(iou)]
    return float(iou.mean()) if iou.size else float("nan")


def segmentation_scores(cm: ArrayLike, background: int | None = 0) -> dict[str, Any]:
    """OA, mIoU with and without the background class, and per-class IoU from ``cm``."""
    m = np.asarray(cm)
    total = m.sum()
    return {
        "overall_accuracy": float(np.trace(m) / total) if total else float("nan"),
        "miou": mean_iou(m),
        "miou_without_background": mean_iou(m, exclude=background) if background is not None
        else None,
        "background_class": background,
        "iou_per_class": iou_per_class(m).tolist(),
    }


def binary_counts(y_true: ArrayLike, y_pred: ArrayLike,
                  ignore_index: int | None = None) -> tuple[int, int, int, int]:
    """TP, FP, FN, TN of the positive class (1) for 0/1 maps of one shape."""
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    t, p = t.astype(bool), p.astype(bool)
    return (int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum()), int((~t & ~p).sum()))


def change_scores(tp: int, fp: int, fn: int, tn: int | None = None) -> dict[str, float]:
    """Precision, recall and F1 of the change class from accumulated counts (+ OA if tn)."""
    out = {
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "tp": tp, "fp": fp, "fn": fn,
    }
    if tn is not None:
        out["tn"] = tn
        total = tp + fp + fn + tn
        out["overall_accuracy"] = (tp + tn) / total if total else float("nan")
        cm = np.array([[tn, fp], [fn, tp]])
        out["iou_change"] = float(iou_per_class(cm)[1])
    return out


# --------------------------------------------------------------------------- OSCD official crops

#: The official OSCD test crops: 128 px, stride int(128 / 2) - 1 = 63, batch 32 with
#: ``drop_last=True`` (``downstream_tasks/OSCD/train.py`` L43-48, L116-117).
OSCD_CROP, OSCD_STRIDE, OSCD_BATCH = 128, 63, 32


def oscd_crop_corners(h: int, w: int, size: int = OSCD_CROP,
                      stride: int = OSCD_STRIDE) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` of the official crops of an ``h x w`` image, in official order.

    As ``ChangeDetectionDataset.__init__`` builds them (``downstream_tasks/OSCD/dataset.py``
    L252-268): ``n1 = ceil((h - size + 1) / stride)`` rows of crops at ``0, stride, ...``,
    likewise ``n2`` columns, row-major (row index outer). Every crop lies fully inside the
    image; there is no padding, so the last ``(h - size) % stride`` rows (and columns) are in
    no crop and never scored. An image smaller than ``size`` has no crop.
    """
    n1 = max(0, math.ceil((h - size + 1) / stride))
    n2 = max(0, math.ceil((w - size + 1) / stride))
    return [(stride * i, stride * j) for i in range(n1) for j in range(n2)]


def official_crop_change_scores(masks: Sequence[ArrayLike], predictions: Sequence[ArrayLike], *,
                                size: int = OSCD_CROP, stride: int = OSCD_STRIDE,
                                batch_size: int = OSCD_BATCH,
                                drop_last: bool = True) -> dict[str, Any]:
    """Change precision/recall/F1 as the official SpectralGPT OSCD test loop counts them.

    The official ``test()`` (``downstream_tasks/OSCD/train.py`` L442-536) sums TP/FP/FN/TN of
    the change class over every pixel of every test crop (:func:`oscd_crop_corners`), so a
    pixel is counted once per crop that covers it (up to 4 times with stride 63 < 128/2),
    border strips no crop reaches are not counted, and with ``drop_last=True`` (L117) the
    final incomplete batch of the crop sequence - the last ``n_crops % batch_size`` crops of
    the last test image, images taken in the order of ``test.txt`` (``dataset.py`` L227,
    ``shuffle=False``) - is not counted at all.

    Args:
        masks: per test image, in ``test.txt`` order, the ``[H, W]`` ground truth (nonzero =
            change; the official code reads ``cm.png != 0``, ``dataset.py`` L179).
        predictions: per image, either a full ``[H, W]`` predicted change map (nonzero =
            change; each crop's prediction is cut from it), or ``[n_crops, size, size]`` - one
            prediction per crop in :func:`oscd_crop_corners` order, as the official model
            makes them (overlapping crops may then disagree on a pixel).
        size, stride: crop size and stride in pixels (official 128, 63).
        batch_size, drop_last: the test loader's batch size and whether the final incomplete
            batch is dropped (official 32, True). ``drop_last=False`` counts every crop.

    Returns:
        :func:`change_scores` of the counts (precision, recall, f1, tp, fp, fn, tn,
        overall_accuracy, iou_change) plus ``crops`` (counted), ``crops_dropped`` and the
        ``protocol`` settings.
    """
    if len(masks) != len(predictions):
        raise ValueError(f"{len(masks)} masks but {len(predictions)} predictions")
    if size < 1 or stride < 1 or batch_size < 1:
        raise ValueError("size, stride and batch_size must be positive")
    corners = []
    for k, (m, p) in enumerate(zip(masks, predictions)):
        shape = np.shape(m)
        if len(shape) != 2:
            raise ValueError(f"mask {k} has shape {shape}; [H, W] expected")
        corners.append(oscd_crop_corners(shape[0], shape[1], size, stride))
        pshape = np.shape(p)
        if pshape != shape and pshape != (len(corners[-1]), size, size):
            raise ValueError(f"prediction {k} has shape {pshape}; expected the mask's {shape} "
                             f"or one map per crop {(len(corners[-1]), size, size)}")
    total = sum(len(c) for c in corners)
    kept_total = total - total % batch_size if drop_last else total
    tp = fp = fn = tn = 0
    offset = 0
    for m, p, cs in zip(masks, predictions, corners):
        keep = cs[:max(0, min(len(cs), kept_total - offset))]
        offset += len(cs)
        if not keep:
            continue
        t = np.asarray(m) != 0
        pred = np.asarray(p) != 0
        if pred.ndim == 2:
            # Coverage: how many counted crops hold each pixel; each pixel's outcome is then
            # weighted by it (same sums as crop by crop, without cutting every crop).
            cover = np.zeros(t.shape, np.int64)
            for r, c in keep:
                cover[r:r + size, c:c + size] += 1
            tp += int(cover[t & pred].sum())
            fp += int(cover[~t & pred].sum())
            fn += int(cover[t & ~pred].sum())
            tn += int(cover[~t & ~pred].sum())
        else:
            for (r, c), crop in zip(keep, pred):
                gt = t[r:r + size, c:c + size]
                tp += int((gt & crop).sum())
                fp += int((~gt & crop).sum())
                fn += int((gt & ~crop).sum())
                tn += int((~gt & ~crop).sum())
    out: dict[str, Any] = change_scores(tp, fp, fn, tn)
    out.update(crops=kept_total, crops_dropped=total - kept_total,
               protocol={"size": size, "stride": stride, "batch_size": batch_size,
                         "drop_last": drop_last})
    return out


def oscd_change_scores(masks: Sequence[ArrayLike], predictions: Sequence[ArrayLike],
                       **official: Any) -> dict[str, Any]:
    """Both OSCD scores of full-image predictions ``[H, W]`` (in ``test.txt`` order).

    Returns:
        ``{"full_image": ...}`` - every pixel once, counts summed over images
        (:func:`binary_counts`, :func:`change_scores`) - and ``{"official_crops": ...}``
        (:func:`official_crop_change_scores` with ``official`` keyword arguments).
    """
    counts = np.zeros(4, np.int64)
    for m, p in zip(masks, predictions, strict=True):
        counts += binary_counts(np.asarray(m) != 0, np.asarray(p) != 0)
    tp, fp, fn, tn = (int(x) for x in counts)
    return {"full_image": change_scores(tp, fp, fn, tn),
            "official_crops": official_crop_change_scores(masks, predictions, **official)}
