"""Evaluation protocols: train a head (or the whole model) on the train split, score the
test split once, after the last epoch.

Classification (EuroSAT-MS single-label, BigEarthNet-S2 multi-label):

* ``linear`` - frozen encoder; features (mean over all 3D tokens) are extracted once,
  standardised with the training split's mean/std (MAE linear probing's affine-free
  BatchNorm, computed once), and a linear head is trained on them;
* ``knn`` - frozen features, cosine similarity, the ``k`` nearest training samples vote
  with weights ``exp(sim / T)`` (the weighted kNN of Wu et al. 2018 / DINO); multi-label
  scores are the weighted mean of the neighbours' label vectors;
* ``finetune`` - every weight trained, AdamW with layer-wise LR decay (0.75 default) and a
  warm-up + cosine schedule; random horizontal flips.

Segmentation and change detection (``linear`` = frozen encoder + trained light decoder,
``finetune`` = everything trained with layer-wise decay): training on random crops of
``image_size`` (as many per image and epoch as the image holds), evaluation on **full
images**: each is cut into non-overlapping ``image_size`` tiles (edges zero-padded in
normalised units, padded pixels never scored), the predictions are stitched back and every
pixel is counted exactly once. The normalised training images of dense tasks are held in
memory (OSCD: 14 cities; SegMunich-sized sets fit too).

Differences from the official code, on purpose (research note section 5): the score is the
last epoch's on the test split (the official EuroSAT script prints the best epoch on its
validation split), metrics are dataset-level, the pretrained position tables are kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.evaluation import metrics
from training.evaluation.checkpoints import Normalisation, normalise
from training.evaluation.errors import EvaluationError
from training.evaluation.heads import (ChangeModel, Classifier, Encoder, SegmentationModel,
                                       param_groups_lrd, pool)
from training.evaluation.readers import ChangeData, ClassificationData, SegmentationData

logger = logging.getLogger(__name__)

IGNORE = -100  # CE ignore label used internally for padded pixels


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    layer_decay: float
    warmup_epochs: float
    seed: int
    device: torch.device
    workers: int = 0
    k: int = 20
    temperature: float = 0.07


# --------------------------------------------------------------------------- splits


def make_split(ids: Sequence[str], dataset_files: dict[str, list[str]], *, seed: int,
               eval_list: list[str] | None = None, train_list: list[str] | None = None,
               test_fraction: float = 0.2) -> tuple[list[int], list[int], dict[str, Any]]:
    """Train / test indices: explicit lists, else the data set's split files, else a seeded
    ``1 - test_fraction`` / ``test_fraction`` permutation. Returns the indices and a record."""
    where = {name: i for i, name in enumerate(ids)}
    if eval_list is None and "test" in dataset_files:
        eval_list, train_list, source = dataset_files["test"], dataset_files.get("train"), \
            "data set split files"
    else:
        source = "--split-file" if eval_list is not None else None
    if eval_list is not None:
        test = sorted({where[n] for n in eval_list if n in where})
        if train_list is not None:
            train = sorted({where[n] for n in train_list if n in where} - set(test))
        else:
            train = sorted(set(range(len(ids))) - set(test))
        unmatched = len([n for n in eval_list if n not in where])
        if not test or not train:
            raise EvaluationError(f"split from {source} leaves {len(train)} training and "
                                  f"{len(test)} test samples (names must match the data set's "
                                  f"sample names; {unmatched} test names did not)")
        return train, test, {"source": source, "train": len(train), "test": len(test),
                             "unmatched_test_names": unmatched}
    if len(ids) < 2:
        raise EvaluationError(f"need at least 2 samples to split, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(max(1, round(test_fraction * len(ids))), len(ids) - 1)
    test, train = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    return train, test, {"source": f"seeded random split (seed {seed}, "
                                   f"{1 - test_fraction:.0%}/{test_fraction:.0%})",
                         "train": len(train), "test": len(test), "seed": seed,
                         "test_ids": [ids[i] for i in test]}


# --------------------------------------------------------------------------- helpers


def _prepare(img: np.ndarray, norm: Normalisation, size: int | None) -> Tensor:
    x = normalise(torch.from_numpy(img), norm)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return x


class _Images(torch.utils.data.Dataset[tuple[Tensor, int]]):
    def __init__(self, load: Callable[[int], np.ndarray], indices: Sequence[int],
                 norm: Normalisation, size: int) -> None:
        self.load, self.indices, self.norm, self.size = load, list(indices), norm, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return _prepare(self.load(self.indices[i]), self.norm, self.size), i


def _loader(data: ClassificationData, indices: Sequence[int], norm: Normalisation, size: int,
            s: TrainSettings, *, shuffle: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(s.seed * 1000 + epoch)
    return torch.utils.data.DataLoader(_Images(data.load, indices, norm, size),
                                       batch_size=s.batch_size, shuffle=shuffle, generator=g,
                                       num_workers=s.workers)


def _schedule(optimizer: torch.optim.Optimizer, step: int, total: int, warmup: int) -> None:
    """Linear warm-up then half-cycle cosine to 0, per step (MAE ``lr_sched``)."""
    if step < warmup:
        factor = (step + 1) / warmup
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _optimizer(model: nn.Module, s: TrainSettings, layer_decay: float) -> torch.optim.Optimizer:
    groups = param_groups_lrd(model, s.lr, s.weight_decay, layer_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))


def _loss(logits: Tensor, y: Tensor, multilabel: bool) -> Tensor:
    if multilabel:  # official MultiLabelSoftMarginLoss = mean binary cross-entropy
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)


def _check_finite(loss: Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise EvaluationError(f"loss became {loss.item()} in epoch {epoch + 1}: lower --lr")


# --------------------------------------------------------------------------- classification


@torch.no_grad()
def extract_features(encoder: Encoder, data: ClassificationData, indices: Sequence[int],
                     norm: Normalisation, size: int, s: TrainSettings) -> Tensor:
    """Mean-pooled frozen features ``[N, D]`` (float32, CPU) in ``indices`` order."""
    encoder.eval()
    out = []
    for x, _ in _loader(data, indices, norm, size, s, shuffle=False):
        out.append(pool(encoder(x.to(s.device))).float().cpu())  # over tokens (and dates of a stack)
    return torch.cat(out)


def classification_scores(data: ClassificationData, y_true: np.ndarray, scores: np.ndarray,
                          *, probabilities: bool = False) -> dict[str, Any]:
    """OA (single-label) or macro/micro mAP and F1@0.5 (multi-label) on the whole test set.

    ``scores`` are logits, or already probabilities when ``probabilities`` (kNN votes).
    """
    if data.multilabel:
        probs = scores if probabilities else 1 / (1 + np.exp(-scores))
        ap = metrics.multilabel_map(y_true, scores)
        f1 = metrics.multilabel_f1(y_true, probs, 0.5)
        return {"map_macro": ap["macro"], "map_micro": ap["micro"], "f1_macro": f1["macro"],
                "f1_micro": f1["micro"], "classes_with_positives": ap["classes_counted"],
                "per_class": {n: {"ap": a, "f1": f} for n, a, f in
                              zip(data.class_names, ap["per_class"], f1["per_class"])}}
    pred = scores.argmax(1)
    cm = metrics.confusion_matrix(y_true, pred, len(data.class_names))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / cm.sum(1)
    f1 = metrics.multilabel_f1(np.eye(len(data.class_names))[y_true],
                               np.eye(len(data.class_names))[pred])
    return {"overall_accuracy": metrics.overall_accuracy(y_true, pred),
            "f1_macro": f1["macro"],
            "per_class": {n: {"accuracy": float(r)} for n, r in zip(data.class_names, recall)},
            "confusion_matrix": cm.tolist()}


def _knn(train_f: Tensor, train_y: Tensor, test_f: Tensor, s: TrainSettings,
         multilabel: bool, num_classes: int) -> np.ndarray:
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(s.k, train_f.shape[0])
    out = []
    targets = train_y.float() if multilabel else F.one_hot(train_y, num_classes).float()
    for chunk in test_f.split(1024):
        sim, idx = (chunk @ train_f.T).topk(k, dim=1)
        w = (sim / s.temperature).exp()  # [n, k]
        votes = (w[..., None] * targets[idx]).sum(1)
        out.append(votes / w.sum(1, keepdim=True) if multilabel else votes)
    return torch.cat(out).numpy()


def run_classification(encoder: Encoder, data: ClassificationData, train: list[int],
                       test: list[int], norm: Normalisation, size: int, protocol: str,
                       s: TrainSettings) -> dict[str, Any]:
    """One classification protocol end to end; returns metrics and training details."""
    torch.manual_seed(s.seed)
    nc = len(data.class_names)
    y = torch.as_tensor(data.targets)
    y_train, y_test = y[train], y[test]
    history: list[float] = []
    t0 = time.perf_counter()
    if protocol in ("linear", "knn"):
        for p in encoder.parameters():
            p.requires_grad_(False)
        f_train = extract_features(encoder, data, train, norm, size, s)
        f_test = extract_features(encoder, data, test, norm, size, s)
        if protocol == "knn":
            scores = _knn(f_train, y_train, f_test, s, data.multilabel, nc)
            return {"metrics": classification_scores(data, y_test.numpy(), scores,
                                                     probabilities=True),
                    "training": {"k": min(s.k, len(train)), "temperature": s.temperature,
                                 "seconds": time.perf_counter() - t0}}
        mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
        f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
        head = Classifier(encoder, nc, probe=True).head
        opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
        steps = math.ceil(len(train) / s.batch_size)
        total, warmup = s.epochs * steps, int(s.warmup_epochs * steps)
        gen = torch.Generator().manual_seed(s.seed)
        # A linear layer on cached features: thread start-up costs more than the maths
        # (and stalls on a busy machine), so train it on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for epoch in range(s.epochs):
                perm = torch.randperm(len(train), generator=gen)
                running = 0.0
                for i, batch in enumerate(perm.split(s.batch_size)):
                    _schedule(opt, epoch * steps + i, total, warmup)
                    loss = _loss(head(f_train[batch]), y_train[batch], data.multilabel)
                    _check_finite(loss, epoch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    running += loss.item() * len(batch)
                history.append(running / len(train))
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            scores = head(f_test).numpy()
    elif protocol == "finetune":
        model = Classifier(encoder, nc, probe=False).to(s.device)
        opt = _optimizer(model, s, s.layer_decay)
        steps = math.ceil(len(train) / s.batch_size)
        total, warmup = s.epochs * steps, int(s.warmup_epochs * steps)
        for epoch in range(s.epochs):
            model.train()
            running = 0.0
            for i, (x, j) in enumerate(_loader(data, train, norm, size, s, shuffle=True,
                                               epoch=epoch)):
                _schedule(opt, epoch * steps + i, total, warmup)
                x = x.to(s.device)
                flip = torch.rand(x.shape[0], device=s.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = _loss(model(x), y_train[j].to(s.device), data.multilabel)
                _check_finite(loss, epoch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                running += loss.item() * x.shape[0]
            history.append(running / len(train))
            logger.info("epoch %d/%d loss %.4f", epoch + 1, s.epochs, history[-1])
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(x.to(s.device)).float().cpu() for x, _ in
                                _loader(data, test, norm, size, s, shuffle=False)]).numpy()
    else:
        raise EvaluationError(f"unknown protocol '{protocol}' for classification")
    return {"metrics": classification_scores(data, y_test.numpy(), scores),
            "training": {"loss_per_epoch": history, "seconds": time.perf_counter() - t0}}


# --------------------------------------------------------------------------- dense tasks


def _pad_to(x: Tensor, size: int, value: float) -> Tensor:
    """Pad the last two dims on the bottom/right up to multiples of ``size``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % size, (-w) % size
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x


def tiles(h: int, w: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping ``size`` tiles covering an ``h x w`` image
    padded to multiples of ``size``."""
    return [(r, c) for r in range(0, h + (-h) % size, size)
            for c in range(0, w + (-w) % size, size)]


def _random_crops(n_images: int, shapes: Sequence[tuple[int, int]], size: int,
                  rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(image, top, left) crops for one epoch: ceil(H W / size^2) per image, shuffled."""
    crops = []
    for i in range(n_images):
        h, w = shapes[i]
        for _ in range(max(1, math.ceil(h * w / size**2))):
            crops.append((i, int(rng.integers(0, max(1, h - size + 1))),
                          int(rng.integers(0, max(1, w - size + 1)))))
    rng.shuffle(crops)  # type: ignore[arg-type]
    return crops


def _crop(x: Tensor, top: int, left: int, size: int, value: float) -> Tensor:
    return _pad_to(x[..., top:top + size, left:left + size], size, value)


def _batched(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _train_dense(model: nn.Module, images: list[Tensor], masks: list[Tensor], size: int,
                 s: TrainSettings, protocol: str, weight: Tensor | None,
                 forward: Callable[[Tensor], Tensor]) -> list[float]:
    """Train on random crops; ``images[i]`` is ``[T, H, W]`` or ``[2, T, H, W]`` (pairs)."""
    encoder = next(m for m in model.modules() if isinstance(m, Encoder))
    if protocol == "linear":
        for p in encoder.parameters():
            p.requires_grad_(False)
    elif protocol != "finetune":
        raise EvaluationError(f"protocol '{protocol}' is not available for dense tasks "
                              f"(linear or finetune)")
    opt = _optimizer(model, s, s.layer_decay if protocol == "finetune" else 1.0)
    rng = np.random.default_rng(s.seed)
    shapes = [tuple(m.shape[-2:]) for m in masks]
    steps = math.ceil(len(_random_crops(len(images), shapes, size,
                                        np.random.default_rng(0))) / s.batch_size)
    total, warmup = s.epochs * steps, int(s.warmup_epochs * steps)
    history = []
    for epoch in range(s.epochs):
        model.train()
        if protocol == "linear":
            encoder.eval()  # frozen: no dropout/BN inside anyway, keeps intent explicit
        crops = _random_crops(len(images), shapes, size, rng)
        running = 0.0
        for i, batch in enumerate(_batched(crops, s.batch_size)):
            _schedule(opt, epoch * steps + i, min(total, s.epochs * steps), warmup)
            x = torch.stack([_crop(images[j], t, l, size, 0.0) for j, t, l in batch])
            y = torch.stack([_crop(masks[j], t, l, size, IGNORE) for j, t, l in batch])
            if rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            x, y = x.to(s.device), y.to(s.device)
            if (y == IGNORE).all():
                continue
            loss = F.cross_entropy(forward(x), y, weight=weight, ignore_index=IGNORE)
            _check_finite(loss, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item() * len(batch)
        history.append(running / max(1, len(crops)))
        logger.info("epoch %d/%d loss %.4f", epoch + 1, s.epochs, history[-1])
    return history


@torch.no_grad()
def predict_full(forward: Callable[[Tensor], Tensor], image: Tensor, size: int,
                 batch_size: int, device: torch.device) -> Tensor:
    """Class map ``[H, W]`` of a full image (``[..., T, H, W]``): non-overlapping tiles, zero
    padding at the edges, predictions stitched back and cropped to ``H x W``."""
    h, w = image.shape[-2:]
    padded = _pad_to(image, size, 0.0)
    out = torch.zeros(padded.shape[-2:], dtype=torch.long)
    corners = tiles(h, w, size)
    for batch in _batched(corners, batch_size):
        x = torch.stack([padded[..., r:r + size, c:c + size] for r, c in batch]).to(device)
        pred = forward(x).argmax(1).cpu()
        for (r, c), p in zip(batch, pred):
            out[r:r + size, c:c + size] = p
    return out[:h, :w]


def run_segmentation(encoder: Encoder, data: SegmentationData, train: list[int],
                     test: list[int], norm: Normalisation, size: int, protocol: str,
                     s: TrainSettings) -> dict[str, Any]:
    torch.manual_seed(s.seed)
    nc = len(data.class_names)
    model = SegmentationModel(encoder, nc).to(s.device)

    def mask(i: int) -> Tensor:
        m = torch.from_numpy(data.load_mask(i))
        return torch.where(m == data.ignore_index, IGNORE, m) if data.ignore_index is not None \
            else m

    t0 = time.perf_counter()
    images = [normalise(torch.from_numpy(data.load_image(i)), norm) for i in train]
    masks = [mask(i) for i in train]
    for i, (x, m) in zip(train, zip(images, masks)):
        if x.shape[-2:] != m.shape:
            raise EvaluationError(f"image '{data.ids[i]}' is {tuple(x.shape[-2:])} but its "
                                  f"mask is {tuple(m.shape)}")
    history = _train_dense(model, images, masks, size, s, protocol, None, model)
    model.eval()
    cm = np.zeros((nc, nc), dtype=np.int64)
    for i in test:
        x = normalise(torch.from_numpy(data.load_image(i)), norm)
        pred = predict_full(model, x, size, s.batch_size, s.device)
        m = mask(i)
        cm += metrics.confusion_matrix(m.numpy(), pred.numpy(), nc, ignore_index=IGNORE)
    scores = metrics.segmentation_scores(cm, data.background)
    scores["iou_per_class"] = dict(zip(data.class_names, scores["iou_per_class"]))
    scores["confusion_matrix"] = cm.tolist()
    return {"metrics": scores, "training": {"loss_per_epoch": history,
                                            "seconds": time.perf_counter() - t0}}


def run_change(encoder: Encoder, data: ChangeData, train: list[int], test: list[int],
               norm: Normalisation, size: int, protocol: str, s: TrainSettings) -> dict[str, Any]:
    torch.manual_seed(s.seed)
    model = ChangeModel(encoder).to(s.device)

    def forward(x: Tensor) -> Tensor:  # x: [B, 2, T, h, w]
        return model(x[:, 0], x[:, 1])

    def pair(i: int) -> Tensor:
        a, b = data.load_pair(i)
        return torch.stack([normalise(torch.from_numpy(a), norm),
                            normalise(torch.from_numpy(b), norm)])

    t0 = time.perf_counter()
    images = [pair(i) for i in train]
    masks = [torch.from_numpy(data.load_mask(i)) for i in train]
    for i, (x, m) in zip(train, zip(images, masks)):
        if x.shape[-2:] != m.shape:
            raise EvaluationError(f"city '{data.ids[i]}': images are {tuple(x.shape[-2:])} but "
                                  f"the change mask is {tuple(m.shape)}")
    # Balanced class weights N / (2 n_c) from the training masks (the official code weights
    # its NLL by the changed-pixel fraction too, with different constants).
    counts = torch.bincount(torch.cat([m.ravel() for m in masks]), minlength=2).double()
    weight = (counts.sum() / (2 * counts.clamp(min=1))).float().to(s.device)
    history = _train_dense(model, images, masks, size, s, protocol, weight, forward)
    model.eval()
    tp = fp = fn = tn = 0
    per_city = {}
    for i in test:
        pred = predict_full(forward, pair(i), size, s.batch_size, s.device)
        c = metrics.binary_counts(data.load_mask(i), pred.numpy())
        per_city[data.ids[i]] = metrics.change_scores(*c)
        tp, fp, fn, tn = tp + c[0], fp + c[1], fn + c[2], tn + c[3]
    scores = metrics.change_scores(tp, fp, fn, tn)
    scores["per_city"] = per_city
    return {"metrics": scores,
            "training": {"loss_per_epoch": history, "class_weights": weight.tolist(),
                         "seconds": time.perf_counter() - t0}}
