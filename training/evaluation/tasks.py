"""Evaluation protocols: train a head (or the whole model) on the train split, score the
test split once, after the last epoch (or, with ``--select best-val``, with the weights of the
epoch that scored best on a validation split held out of the training split).

Classification (EuroSAT-MS single-label, BigEarthNet-S2 multi-label):

* ``linear`` - frozen encoder; features (mean over all 3D tokens) are extracted once,
  standardised with the training split's mean/std (MAE linear probing's affine-free
  BatchNorm, computed once), and a linear head is trained on them;
* ``knn`` - frozen features, cosine similarity, the ``k`` nearest training samples vote
  with weights ``exp(sim / T)`` (the weighted kNN of Wu et al. 2018 / DINO); multi-label
  scores are the weighted mean of the neighbours' label vectors;
* ``finetune`` - every weight trained, AdamW with layer-wise LR decay (0.75 default) and a
  warm-up + cosine schedule; random horizontal flips; the recipe options below.

Fine-tuning recipe options (``python -m training.evaluate`` flag = :class:`TrainSettings`
field). Each defaults to the behaviour above (``--pos-lr`` excepted: it defaults to the
official code). Official sources: ``danfenghong/IEEE_TPAMI_SpectralGPT`` (file, line), see
also ``shared/research/spectralgpt.md`` section 5.1:

* ``--drop-path R`` (``drop_path``, default 0; also for dense ``finetune``): stochastic depth
  on both residual branches of every block, rate ``linspace(0, R, depth)`` from the first
  block to the last, per sample, inactive in eval mode. Official: README L95 and L114 pass
  ``--drop_path 0.2`` (EuroSAT and BigEarthNet commands), ``main_finetune.py`` L70 default
  0.1 (the paper: 0.1); linear rule ``models_vit_tensor.py`` L84-86; timm ``DropPath`` on
  both branches ``util/video_vit.py`` L220, L231-232.
* ``--mixup A`` / ``--cutmix B`` (``mixup`` / ``cutmix``, Beta alphas, default 0 = off): timm
  ``Mixup`` in ``batch`` mode with probability 1: per batch, when both are > 0 CutMix is
  chosen with probability 0.5, else Mixup; ``lam ~ Beta(alpha, alpha)`` of the chosen one.
  Mixup: ``x = lam x + (1 - lam) x.flip(0)``; CutMix: a ``sqrt(1 - lam) H x sqrt(1 - lam) W``
  box at a uniform centre, clipped at the borders, pasted from ``x.flip(0)``, then ``lam =
  1 - box area / image area``; targets ``lam y + (1 - lam) y.flip(0)`` (soft, smoothed), loss
  soft-target cross-entropy. Official: README L95 ``--mixup 0.8 --cutmix 1.0`` (L114 too);
  ``main_finetune.py`` L111-122 (defaults 0 / 0, prob 1.0, switch prob 0.5, mode ``batch``)
  and L251-258; applied in ``engine_finetune.py`` L56-57.
* ``--smoothing S`` (``smoothing``, default 0): soft targets ``1 - S + S / C`` on the label and
  ``S / C`` elsewhere, soft-target cross-entropy. Official: ``main_finetune.py`` L97 default
  0.1, passed as Mixup's ``label_smoothing`` (L258) with ``SoftTargetCrossEntropy``
  (L349-361): the official run smooths through Mixup only (its criterion needs soft
  targets, so it does not run with mixing off).
* Mixup, CutMix and smoothing are skipped for multi-label BigEarthNet (a warning is logged
  and the result says so), as ``engine_finetune_BE.py`` L54-55 skips ``mixup_fn`` there;
  its loss stays the multi-label one (``main_finetune.py`` L353-354).
* ``--reprob P`` (``reprob``, default 0): timm ``RandomErasing`` in ``pixel`` mode on the
  normalised image, per sample with probability P: one box of area ``U(0.02, 1/3)`` of the
  image and aspect ``h / w`` log-uniform in ``(0.3, 1 / 0.3)`` (10 tries to fit), filled with
  ``N(0, 1)`` values per pixel and band; after the flip, before mixing. Official: README L95
  ``--reprob 0.25`` and ``main_finetune.py`` L101-108 parse it but **nothing applies it**:
  the dataset transforms (``util/datasets.py`` ``build_transform`` L100-139) have no
  ``RandomErasing`` and no code outside the vendored ``timm_utils`` builds one, so the
  official runs are not erased (effective value 0).
* ``--rrc`` (``rrc``, default off): ``RandomResizedCrop`` of each normalised training image at
  its native size to ``image_size``: area fraction ``U(0.2, 1)``, aspect ``w / h``
  log-uniform in ``(3/4, 4/3)`` (10 tries, else a centre crop), bicubic resize; then the
  flips. Official: ``util/datasets.py`` L113-123 ``SatelliteDataset.build_transform``
  (inherited by ``EuroSat``, L779): ToTensor, Normalize, ``RandomResizedCrop(input_size,
  scale=(0.2, 1.0), interpolation=BICUBIC)`` (torchvision's default ratio), horizontal flip;
  BigEarthNet the same (L601-613). Its eval images are resized to ``int(128 / 0.875) = 146``
  px and centre-cropped to 128 (L125-139); here they are resized to ``image_size``.
* ``--select best-val`` (``selection``, default ``last``): a validation split is held out of
  the training split (``--val-file`` names, else a seeded ``--val-fraction``, 0.1), scored
  after every epoch (OA; multi-label: micro mAP), and the first best epoch's weights score
  the test split once; the result records the mode, the epoch and the curve. Official:
  ``main_finetune.py`` L402-421 prints the maximum over epochs of the accuracy on the list
  it also reports (``val_euro_result.txt``, no separate test split); ``best-val`` is the
  variant that does not select on the reported split.
* ``--pos-lr official|decayed`` (``pos_lr``, default ``official``): the LR of the position
  tables under layer-wise decay (``heads.POS_LR``). Official ``util/lr_decay.py`` L60-72 puts
  only ``cls_token``, ``pos_embed`` and ``patch_embed*`` at layer 0, so the separable
  ``pos_embed_spatial`` / ``pos_embed_temporal`` get the full LR (L71-72, scale 1);
  ``decayed`` puts them at layer 0 with the tokeniser (scale ``layer_decay ** (depth + 1)``).
  (The official EuroSAT model itself fine-tunes a joint, zero-initialised ``pos_embed``,
  ``models_vit_tensor.py`` L44, L80, which that rule does decay; see the note below.)

Segmentation and change detection (``linear`` = frozen encoder + trained light decoder,
``finetune`` = everything trained with layer-wise decay): training on random crops of
``image_size`` (as many per image and epoch as the image holds), evaluation on **full
images**: each is cut into non-overlapping ``image_size`` tiles (edges zero-padded in
normalised units, padded pixels never scored), the predictions are stitched back and every
pixel is counted exactly once. The normalised training images of dense tasks are held in
memory (OSCD: 14 cities; SegMunich-sized sets fit too).

Differences from the official code, on purpose (research note section 5): the score is the
last epoch's (or the best validation epoch's) on the test split (the official EuroSAT script
prints the best epoch on its validation split), metrics are dataset-level, the pretrained
position tables are kept.
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
from training.models.spectral_mae import set_drop_path

logger = logging.getLogger(__name__)

IGNORE = -100  # CE ignore label used internally for padded pixels


SELECTIONS = ("last", "best-val")


@dataclass(frozen=True)
class TrainSettings:
    """Training options of one protocol run (see the module docstring for the recipe fields)."""

    epochs: int
    batch_size: int
    lr: float
    """Peak LR (of the head and last layers under layer-wise decay)."""
    weight_decay: float
    layer_decay: float
    warmup_epochs: float
    seed: int
    device: torch.device
    workers: int = 0
    k: int = 20
    temperature: float = 0.07
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block (``linspace(0, rate, depth)``); finetune only."""
    mixup: float = 0.0
    """Mixup Beta alpha; 0 = off (single-label finetune only)."""
    cutmix: float = 0.0
    """CutMix Beta alpha; 0 = off (single-label finetune only)."""
    smoothing: float = 0.0
    """Label smoothing S of the soft targets (single-label finetune only)."""
    reprob: float = 0.0
    """Per-sample probability of random erasing (classification finetune)."""
    rrc: bool = False
    """Random-resized crops of the training images instead of a plain resize."""
    selection: str = "last"
    """``last`` epoch or ``best-val`` (needs a validation split; classification finetune)."""
    pos_lr: str = "official"
    """Position tables' LR under layer-wise decay: ``official`` (full) or ``decayed``."""
    mixup_switch_prob: float = 0.5
    """P(CutMix) per batch when both alphas are > 0 (official ``--mixup_switch_prob``)."""


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


def split_validation(ids: Sequence[str], train: list[int], test: list[int], *, seed: int,
                     val_list: list[str] | None = None, fraction: float = 0.1
                     ) -> tuple[list[int], list[int], dict[str, Any]]:
    """Hold a validation split out of ``train`` for ``--select best-val``.

    ``val_list`` (sample names, e.g. ``--val-file`` or the data set's ``val`` split file):
    those samples, never test ones; else a seeded ``fraction`` of ``train`` (its own random
    stream, so the test split is unchanged). Returns the remaining training indices, the
    validation indices and a record for the result.
    """
    if val_list is not None:
        where = {name: i for i, name in enumerate(ids)}
        banned = set(test)
        val = sorted({where[n] for n in val_list if n in where} - banned)
        rest = sorted(set(train) - set(val))
        unmatched = len([n for n in val_list if n not in where])
        if not val or not rest:
            raise EvaluationError(f"the validation list leaves {len(rest)} training and "
                                  f"{len(val)} validation samples (names must match the data "
                                  f"set's sample names and not be test samples; {unmatched} "
                                  f"did not match)")
        return rest, val, {"source": "validation list", "val": len(val), "train": len(rest),
                           "unmatched_val_names": unmatched}
    if not 0.0 < fraction < 1.0:
        raise EvaluationError(f"--val-fraction must be in (0, 1), got {fraction}")
    if len(train) < 2:
        raise EvaluationError(f"need at least 2 training samples to hold out a validation "
                              f"split, found {len(train)}")
    # stream [seed, 1]: independent of the test split's default_rng(seed)
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    n_val = min(max(1, round(fraction * len(train))), len(train) - 1)
    val = sorted(train[i] for i in order[:n_val])
    rest = sorted(train[i] for i in order[n_val:])
    return rest, val, {"source": f"seeded {fraction:.0%} of the training split (seed {seed})",
                       "val": len(val), "train": len(rest), "val_ids": [ids[i] for i in val]}


# --------------------------------------------------------------------------- augmentation
# Written here in torch (no timm/torchvision dependency) with the semantics of the timm /
# torchvision versions the official code uses; each function draws from an explicit
# generator (or torch's global one where noted) so runs are reproducible.

#: RandomResizedCrop area fraction and aspect (w / h) ranges (official ``util/datasets.py``
#: L120: ``scale=(0.2, 1.0)``; ratio: torchvision's default ``(3/4, 4/3)``).
RRC_SCALE = (0.2, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
#: timm ``RandomErasing`` defaults (``min_area``, ``max_area``; ``min_aspect``, 1 / it).
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
_TRIES = 10  # attempts to fit a box (torchvision RRC and timm RandomErasing both use 10)


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand(1, generator=generator).item()


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def rrc_box(h: int, w: int, generator: torch.Generator | None = None,
            scale: tuple[float, float] = RRC_SCALE,
            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, height, width)`` of a box
    of ``U(scale)`` of the ``h x w`` area with ``width / height`` log-uniform in ``ratio``;
    after 10 misses, the largest centred box with an aspect inside ``ratio``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_TRIES):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(0, h - ch, generator), _randint(0, w - cw, generator), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img: Tensor, size: int, generator: torch.Generator | None = None
                        ) -> Tensor:
    """``[..., C, H, W]`` -> ``[..., C, size, size]``: crop :func:`rrc_box` (the same box for
    every band and date) and resize it bicubically, as the official training transform
    (``util/datasets.py`` L120; there applied after normalisation, as here)."""
    h, w = img.shape[-2:]
    top, left, ch, cw = rrc_box(h, w, generator)
    crop = img[..., top:top + ch, left:left + cw]
    flat = crop.reshape(1, -1, ch, cw).float()  # bands (and dates) as channels
    out = F.interpolate(flat, size=(size, size), mode="bicubic", align_corners=False)
    return out.reshape(*img.shape[:-2], size, size).to(img.dtype)


def erase_box(h: int, w: int, generator: torch.Generator | None = None
              ) -> tuple[int, int, int, int] | None:
    """timm ``RandomErasing`` box ``(top, left, height, width)``: area ``U(ERASE_AREA)`` of
    ``h x w``, ``height / width`` log-uniform in ``ERASE_ASPECT``, 10 tries to fit strictly
    inside the image; None when none fits."""
    log_aspect = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
    for _ in range(_TRIES):
        target = _uniform(ERASE_AREA[0], ERASE_AREA[1], generator) * h * w
        aspect = math.exp(_uniform(log_aspect[0], log_aspect[1], generator))
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            return _randint(0, h - eh, generator), _randint(0, w - ew, generator), eh, ew
    return None


def random_erase(x: Tensor, prob: float, generator: torch.Generator
                 ) -> tuple[Tensor, list[tuple[int, int, int, int] | None]]:
    """Per-sample random erasing of a normalised batch ``[B, ..., H, W]`` (timm
    ``RandomErasing(probability=prob, mode="pixel")``): each sample, with probability
    ``prob``, gets one :func:`erase_box` filled with ``N(0, 1)`` values per pixel, band and
    date. Returns a new tensor and the boxes (None: sample untouched)."""
    out = x.clone()
    boxes: list[tuple[int, int, int, int] | None] = []
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        box = erase_box(h, w, generator) if torch.rand(1, generator=generator).item() < prob \
            else None
        if box is not None:
            top, left, eh, ew = box
            region = out[i, ..., top:top + eh, left:left + ew]
            out[i, ..., top:top + eh, left:left + ew] = torch.randn(
                region.shape, generator=generator).to(region)
        boxes.append(box)
    return out, boxes


def soft_targets(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """``[B]`` class indices -> ``[B, C]`` soft targets: ``1 - s + s / C`` on the label,
    ``s / C`` elsewhere (timm ``mixup_target``'s one-hot with label smoothing)."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c target_c log softmax(logits)_c`` (timm
    ``SoftTargetCrossEntropy``, the official criterion, ``main_finetune.py`` L352/L361)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


@dataclass(frozen=True)
class Mix:
    """What :func:`mix_batch` did to one batch."""

    mode: str
    """``mixup`` or ``cutmix``."""
    lam: float
    """Weight of each sample's own image and target (CutMix: 1 - box area / image area)."""
    box: tuple[int, int, int, int] | None = None
    """CutMix ``(y_low, y_high, x_low, x_high)``, pixels ``[y_low, y_high) x [x_low, x_high)``."""


def cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator
               ) -> tuple[int, int, int, int]:
    """timm ``rand_bbox``: a ``int(h sqrt(1 - lam)) x int(w sqrt(1 - lam))`` box centred at a
    uniform pixel, clipped to the image: ``(y_low, y_high, x_low, x_high)``."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return (min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h),
            min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w))


def mix_batch(x: Tensor, target: Tensor, mixup: float, cutmix: float,
              rng: np.random.Generator, switch_prob: float = 0.5) -> tuple[Tensor, Tensor, Mix]:
    """timm ``Mixup`` (mode ``batch``, prob 1, ``correct_lam``) on ``x [B, ..., H, W]`` and soft
    targets ``[B, C]``; every sample is mixed with its mirror ``B - 1 - i`` in the batch (an
    odd batch's middle sample with itself; timm asserts even batches, the official loader
    drops the last one, ``main_finetune.py`` L239).

    Per batch: CutMix with probability ``switch_prob`` when both alphas are > 0 (the only
    one that is > 0 otherwise), ``lam ~ Beta(alpha, alpha)`` of the chosen one. Mixup blends
    the images with ``lam``; CutMix pastes the mirror's :func:`cutmix_box` and recomputes
    ``lam`` as the kept area fraction. Targets: ``lam t + (1 - lam) t.flip(0)``.
    """
    if mixup <= 0 and cutmix <= 0:
        raise ValueError("mix_batch needs mixup or cutmix > 0")
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        box = cutmix_box(h, w, lam, rng)
        y0, y1, x0, x1 = box
        out = x.clone()
        out[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        mix = Mix("cutmix", lam, box)
    else:
        out = x * lam + partner * (1.0 - lam)
        mix = Mix("mixup", lam)
    return out, target * lam + target.flip(0) * (1.0 - lam), mix


# --------------------------------------------------------------------------- helpers


def _prepare(img: np.ndarray, norm: Normalisation, size: int | None) -> Tensor:
    x = normalise(torch.from_numpy(img), norm)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return x


class _Images(torch.utils.data.Dataset[tuple[Tensor, int]]):
    """Normalised images resized to ``size`` (``crop``: :func:`random_resized_crop` of the
    native-size image instead, drawing from torch's global generator, which the DataLoader
    seeds per worker from its own generator)."""

    def __init__(self, load: Callable[[int], np.ndarray], indices: Sequence[int],
                 norm: Normalisation, size: int, crop: bool = False) -> None:
        self.load, self.indices, self.norm, self.size = load, list(indices), norm, size
        self.crop = crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.crop:
            x = normalise(torch.from_numpy(self.load(self.indices[i])), self.norm)
            return random_resized_crop(x, self.size), i
        return _prepare(self.load(self.indices[i]), self.norm, self.size), i


def _loader(data: ClassificationData, indices: Sequence[int], norm: Normalisation, size: int,
            s: TrainSettings, *, shuffle: bool, epoch: int = 0,
            crop: bool = False) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(s.seed * 1000 + epoch)
    return torch.utils.data.DataLoader(_Images(data.load, indices, norm, size, crop),
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
    groups = param_groups_lrd(model, s.lr, s.weight_decay, layer_decay, pos_lr=s.pos_lr)
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


#: Validation score of ``--select best-val`` (higher is better): OA, or for multi-label the
#: micro mAP (the official BigEarthNet script logs a batch-averaged micro AP, L141-154).
VAL_METRIC = {False: "overall_accuracy", True: "map_micro"}


@torch.no_grad()
def predict_logits(model: nn.Module, data: ClassificationData, indices: Sequence[int],
                   norm: Normalisation, size: int, s: TrainSettings) -> Tensor:
    """Logits ``[N, C]`` (float32, CPU) of ``model`` in eval mode on ``indices`` (resized, no
    augmentation). Leaves the model in eval mode."""
    model.eval()
    return torch.cat([model(x.to(s.device)).float().cpu() for x, _ in
                      _loader(data, indices, norm, size, s, shuffle=False)])


def validation_score(model: nn.Module, data: ClassificationData, val: Sequence[int],
                     norm: Normalisation, size: int, s: TrainSettings) -> float:
    """:data:`VAL_METRIC` of ``model`` on the validation indices (NaN counts as -inf)."""
    y = np.asarray(data.targets)[list(val)]
    scores = classification_scores(data, y, predict_logits(model, data, val, norm, size, s)
                                    .numpy())
    value = float(scores[VAL_METRIC[data.multilabel]])
    return -math.inf if math.isnan(value) else value


def _finetune_classifier(encoder: Encoder, data: ClassificationData, train: list[int],
                         val: list[int] | None, norm: Normalisation, size: int,
                         s: TrainSettings) -> tuple[Classifier, dict[str, Any]]:
    """Fine-tune ``Classifier(encoder)`` with the recipe of ``s``; returns the model holding
    the selected epoch's weights and the training record."""
    nc = len(data.class_names)
    y_train = torch.as_tensor(data.targets)[train]
    model = Classifier(encoder, nc, probe=False).to(s.device)
    rates = set_drop_path(encoder.blocks, s.drop_path)
    opt = _optimizer(model, s, s.layer_decay)
    steps = math.ceil(len(train) / s.batch_size)
    total, warmup = s.epochs * steps, int(s.warmup_epochs * steps)
    # Mixing and smoothing need single-label targets; the official BigEarthNet engine skips
    # mixup_fn (engine_finetune_BE.py L54-55) and keeps its multi-label loss.
    skipped = [name for name, v in (("mixup", s.mixup), ("cutmix", s.cutmix),
                                    ("smoothing", s.smoothing)) if v > 0 and data.multilabel]
    if skipped:
        logger.warning("%s skipped: multi-label targets (as the official BigEarthNet "
                       "fine-tuning)", ", ".join(skipped))
    mixing = not data.multilabel and (s.mixup > 0 or s.cutmix > 0)
    soft = mixing or (not data.multilabel and s.smoothing > 0)
    smoothing = 0.0 if data.multilabel else s.smoothing
    # Own streams for the recipe's draws: with every option off, the global RNG sees the
    # same draws as before these options existed (same flips, same results).
    mix_rng = np.random.default_rng([s.seed, 2])
    erase_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([s.seed, 3])
                                                  .generate_state(1)[0]))
    if s.selection not in SELECTIONS:
        raise EvaluationError(f"selection {s.selection!r}: use one of {', '.join(SELECTIONS)}")
    if s.selection == "best-val" and not val:
        raise EvaluationError("--select best-val needs a validation split")
    history: list[float] = []
    val_curve: list[float] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    mixes = {"mixup": 0, "cutmix": 0}
    erased = 0
    for epoch in range(s.epochs):
        model.train()
        running = 0.0
        for i, (x, j) in enumerate(_loader(data, train, norm, size, s, shuffle=True,
                                           epoch=epoch, crop=s.rrc)):
            _schedule(opt, epoch * steps + i, total, warmup)
            x = x.to(s.device)
            flip = torch.rand(x.shape[0], device=s.device) < 0.5
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
            if s.reprob > 0:  # timm order: after flip (and normalisation), before mixing
                x, boxes = random_erase(x, s.reprob, erase_gen)
                erased += sum(b is not None for b in boxes)
            y = y_train[j].to(s.device)
            if soft:
                target = soft_targets(y, nc, smoothing)
                if mixing:
                    x, target, mix = mix_batch(x, target, s.mixup, s.cutmix, mix_rng,
                                               s.mixup_switch_prob)
                    mixes[mix.mode] += 1
                loss = soft_cross_entropy(model(x), target)
            else:
                loss = _loss(model(x), y, data.multilabel)
            _check_finite(loss, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item() * x.shape[0]
        history.append(running / len(train))
        if s.selection == "best-val":
            assert val is not None
            score = validation_score(model, data, val, norm, size, s)
            val_curve.append(score)
            if best is None or score > best[0]:  # first best epoch on ties
                best = (score, epoch, {k: v.detach().clone() for k, v in
                                       model.state_dict().items()})
            logger.info("epoch %d/%d loss %.4f val %s %.4f", epoch + 1, s.epochs, history[-1],
                        VAL_METRIC[data.multilabel], score)
        else:
            logger.info("epoch %d/%d loss %.4f", epoch + 1, s.epochs, history[-1])
    record: dict[str, Any] = {"loss_per_epoch": history, "drop_path_rates": rates,
                              "skipped_for_multilabel": skipped}
    if mixing:
        record["mixed_batches"] = mixes
    if s.reprob > 0:
        record["erased_samples"] = erased
    if s.selection == "best-val" and best is not None:
        model.load_state_dict(best[2])
        record["selection"] = {"mode": "best-val", "epoch": best[1] + 1,
                               "metric": VAL_METRIC[data.multilabel],
                               "val_score": best[0], "val_per_epoch": val_curve,
                               "val_samples": len(val or [])}
    else:
        record["selection"] = {"mode": "last", "epoch": s.epochs}
    return model, record


def run_classification(encoder: Encoder, data: ClassificationData, train: list[int],
                       test: list[int], norm: Normalisation, size: int, protocol: str,
                       s: TrainSettings, val: list[int] | None = None) -> dict[str, Any]:
    """One classification protocol end to end; returns metrics and training details.

    ``val`` (indices disjoint from ``train`` and ``test``) is scored after every epoch of
    ``finetune`` with ``s.selection == "best-val"``; ignored otherwise.
    """
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
        model, record = _finetune_classifier(encoder, data, train, val, norm, size, s)
        scores = predict_logits(model, data, test, norm, size, s).numpy()
        return {"metrics": classification_scores(data, y_test.numpy(), scores),
                "training": {**record, "seconds": time.perf_counter() - t0}}
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
    set_drop_path(encoder.blocks, s.drop_path if protocol == "finetune" else 0.0)
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
    full: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in test:
        pred = predict_full(forward, pair(i), size, s.batch_size, s.device)
        mask = data.load_mask(i)
        c = metrics.binary_counts(mask, pred.numpy())
        per_city[data.ids[i]] = metrics.change_scores(*c)
        tp, fp, fn, tn = tp + c[0], fp + c[1], fn + c[2], tn + c[3]
        full[i] = (mask, pred.numpy())
    scores = metrics.change_scores(tp, fp, fn, tn)
    scores["per_city"] = per_city
    # Beside ours (every pixel of every full image once), the published protocol's score:
    # 128 px crops, stride 63, over the test cities in test.txt order (cut from the same
    # full-image predictions), with the official loader's drop_last (metrics.py)
    listed = [data.ids.index(n) for n in data.split_files.get("test", []) if n in data.ids]
    order = [i for i in listed if i in full] + [i for i in test if i not in listed]
    try:
        scores["official_crops"] = metrics.official_crop_change_scores(
            [full[i][0] for i in order], [full[i][1] for i in order])
    except ValueError as exc:  # e.g. a test image smaller than one crop
        scores["official_crops"] = {"error": str(exc)}
    return {"metrics": scores,
            "training": {"loss_per_epoch": history, "class_weights": weight.tolist(),
                         "seconds": time.perf_counter() - t0}}
