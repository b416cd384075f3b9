"""Dataset-level metrics against hand-computed values (training/evaluation/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.evaluation import metrics
from training.evaluation.tasks import make_split, predict_full, tiles


def test_average_precision_hand_computed() -> None:
    # Ranked: + - + -  -> P@1 = 1 (R .5), P@3 = 2/3 (R 1): AP = .5 * 1 + .5 * 2/3.
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    # Tied scores are one threshold (sklearn): {+,-} at .5 then + at .2 -> .5*.5 + .5*2/3.
    assert metrics.average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(7 / 12)
    assert metrics.average_precision([1, 1, 0], [0.1, 0.2, 0.3]) == pytest.approx(
        0.5 * (1 / 2) + 0.5 * (2 / 3))
    assert math.isnan(metrics.average_precision([0, 0], [0.3, 0.1]))


def test_map_whole_set_differs_from_per_batch_average() -> None:
    # Two batches that are each perfectly ranked (micro-AP 1.0 each, so the official
    # batch-weighted average is 1.0), but over the whole set the second batch's positive
    # ranks below the first batch's negative.
    y = np.array([[1], [0], [1], [0]])
    s = np.array([[0.9], [0.8], [0.3], [0.2]])
    per_batch = np.mean([metrics.multilabel_map(y[i:i + 2], s[i:i + 2])["micro"] for i in (0, 2)])
    whole = metrics.multilabel_map(y, s)
    assert per_batch == pytest.approx(1.0)
    assert whole["micro"] == pytest.approx(5 / 6)
    assert whole["macro"] == pytest.approx(5 / 6)


def test_macro_and_micro_map() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    s = np.array([[0.8, 0.1, 0.3], [0.4, 0.9, 0.2], [0.3, 0.6, 0.1]])
    out = metrics.multilabel_map(y, s)
    # class 0: + (.8), - (.4), + (.3) -> .5 * 1 + .5 * 2/3 ; class 1: + + - -> 1 ; class 2: none
    assert out["per_class"][0] == pytest.approx(5 / 6)
    assert out["per_class"][1] == pytest.approx(1.0)
    assert math.isnan(out["per_class"][2])
    assert out["classes_counted"] == 2
    assert out["macro"] == pytest.approx((5 / 6 + 1) / 2)
    # micro: flattened, ranked .9+ .8+ .6+ .4- .3+ .3- .2- .1- .1- (tie at .3 and .1)
    flat_y, flat_s = y.ravel(), s.ravel()
    assert out["micro"] == pytest.approx(metrics.average_precision(flat_y, flat_s))
    assert out["micro"] == pytest.approx(3 / 4 * 1 + 1 / 4 * (4 / 6))


def test_multilabel_f1() -> None:
    y = np.array([[1, 0], [1, 1], [0, 1]])
    p = np.array([[0.9, 0.6], [0.2, 0.7], [0.1, 0.4]])
    out = metrics.multilabel_f1(y, p, 0.5)
    # class 0: TP1 FN1 -> 2/3 ; class 1: TP1 FP1 FN1 -> 1/2 ; micro: TP2 FP1 FN2 -> 4/7
    assert out["per_class"] == pytest.approx([2 / 3, 1 / 2])
    assert out["macro"] == pytest.approx(7 / 12)
    assert out["micro"] == pytest.approx(4 / 7)


def test_confusion_matrix_and_miou_with_and_without_background() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 255])
    pred = np.array([0, 0, 0, 1, 0, 1, 1, 1, 2, 2, 2])
    cm = metrics.confusion_matrix(truth, pred, 3, ignore_index=255)
    assert cm.tolist() == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    iou = metrics.iou_per_class(cm)
    assert iou == pytest.approx([3 / 5, 2 / 5, 2 / 3])
    scores = metrics.segmentation_scores(cm, background=0)
    assert scores["miou"] == pytest.approx((3 / 5 + 2 / 5 + 2 / 3) / 3)
    assert scores["miou_without_background"] == pytest.approx((2 / 5 + 2 / 3) / 2)
    assert scores["overall_accuracy"] == pytest.approx(7 / 10)
    # A class absent from truth and prediction has no IoU and does not drag the mean down.
    cm4 = np.pad(cm, ((0, 1), (0, 1)))
    assert metrics.mean_iou(cm4) == pytest.approx(scores["miou"])
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix([0, 5], [0, 0], 3)


def test_change_f1_full_image_differs_from_overlapping_crops() -> None:
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 1, 0]])
    full = metrics.change_scores(*metrics.binary_counts(truth, pred))
    assert (full["tp"], full["fp"], full["fn"]) == (1, 1, 1)
    assert full["f1"] == pytest.approx(0.5)
    # Official-style: crops of 2 px with stride 1 count the middle pixels twice.
    tp = fp = fn = 0
    for c in range(3):
        t, f, n, _ = metrics.binary_counts(truth[:, c:c + 2], pred[:, c:c + 2])
        tp, fp, fn = tp + t, fp + f, fn + n
    crops = metrics.change_scores(tp, fp, fn)
    assert (tp, fp, fn) == (1, 2, 2)
    assert crops["f1"] == pytest.approx(1 / 3)
    assert metrics.change_scores(2, 1, 1, 6)["overall_accuracy"] == pytest.approx(0.8)


def test_tiles_cover_every_pixel_once_and_stitch_exactly() -> None:
    h, w, size = 37, 45, 16
    cover = np.zeros((h + (-h) % size, w + (-w) % size), int)
    for r, c in tiles(h, w, size):
        cover[r:r + size, c:c + size] += 1
    assert (cover == 1).all()
    image = torch.randn(3, h, w)

    def forward(x: torch.Tensor) -> torch.Tensor:  # per-pixel "classifier": sign of band 0
        return torch.stack([-x[:, 0], x[:, 0]], 1)

    pred = predict_full(forward, image, size, batch_size=4, device=torch.device("cpu"))
    assert pred.shape == (h, w)
    assert torch.equal(pred, (image[0] > 0).long())


def test_seeded_split_is_recorded_and_files_win() -> None:
    ids = [f"s{i}" for i in range(10)]
    train, test, info = make_split(ids, {}, seed=3)
    assert len(test) == 2 and len(train) == 8 and not set(train) & set(test)
    assert make_split(ids, {}, seed=3)[1] == test and info["seed"] == 3
    train, test, info = make_split(ids, {"test": ["s1", "s2", "zz"]}, seed=0)
    assert test == [1, 2] and info["source"] == "data set split files"
    assert info["unmatched_test_names"] == 1
