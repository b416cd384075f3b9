"""Run outputs: JSON-lines metrics, reconstruction PNGs, the loss-curve plot and the run page.

Only rank 0 calls these. Figures are drawn on the Agg canvas through
:mod:`pipeline.report_html` (no ``pyplot``, no display needed, nothing set at import time).
PNGs are written atomically, so a page or a person never sees half a file.

Reconstructions are two PNGs per call of :func:`save_reconstruction`::

    images/<stage>_step<N>.png          input RGB | masked input | reconstruction
    images/groups/<stage>_step<N>.png   input, masked input, reconstruction of every spectral group

(a subfolder, so ``images/*.png`` still lists one file per reconstruction).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.report_html import PALETTE, new_figure, save_png, write_file_atomic
from training.errors import DiskFullError, no_space

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: Sentinel-2 true colour: red, green, blue.
RGB_BANDS = ("B04", "B03", "B02")
#: Subfolder of ``images/`` holding the per-spectral-group figure of each reconstruction.
GROUPS_DIR = "groups"
#: Loss keys of a metrics record, with the label and colour used in every plot.
LOSS_TERMS = (("loss", "total", "#000000"), ("loss_token", "token MSE (masked tokens)", PALETTE[0]),
              ("loss_spectral", "spectral-group-sum MSE", PALETTE[1]))


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed on every write), and
    hands each record to the run's trackers (TensorBoard, ...) when there are any."""

    def __init__(self, path: Path, trackers: Any = None) -> None:
        self.path = path
        self.trackers = trackers  # training.tracking.Trackers: a copy of every record, or None
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one JSON line, whole or not at all.

        The line goes out in one ``write`` of an ``O_APPEND`` descriptor. When the disk is
        full, the part that got through is cut off again (the file keeps its previous
        length, so no half line is left for readers to skip) and :class:`DiskFullError`
        says where and how many bytes the line needed.
        """
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # a short write continues where it stopped
                    view = view[os.write(fd, view):]
            except OSError as exc:
                cause = no_space(exc)
                if cause is None:
                    raise
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise DiskFullError.at("a metrics line", self.path, cause,
                                       written=len(line) - len(view), needed=len(line),
                                       after="free space, then resume with --resume") from None
        finally:
            os.close(fd)
        if self.trackers is not None:
            self.trackers.log(record)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (an empty list when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss records of a run, without those a resume made obsolete.

    A resumed stage restarts from its last checkpoint and logs a ``stage_start`` record at
    that global step; lines logged after that step by the interrupted process are
    superseded by the new process's lines, so they are dropped.
    """
    kept: list[dict[str, Any]] = []
    for r in records:
        if r.get("event") == "stage_start":
            kept = [k for k in kept if k["step"] <= r["step"]]
        elif "loss" in r:
            kept.append(r)
    return kept


def stage_spans(records: Sequence[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """``(stage, first global step, last logged global step)`` per stage, in run order.

    The first step is the global step the stage started from (``step - stage_step``), so a
    stage's span begins where the previous one ended.
    """
    spans: dict[str, list[int]] = {}
    for r in records:
        start, end = r["step"] - r.get("stage_step", 0), r["step"]
        lo_hi = spans.setdefault(r["stage"], [start, end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], start), max(lo_hi[1], end)
    return [(name, lo, hi) for name, (lo, hi) in spans.items()]


def mark_stages(ax: Axes, spans: Sequence[tuple[str, int, int]], *, label: bool = True) -> None:
    """Shade every other stage, draw a dashed line at each stage start and name the stages."""
    for i, (name, lo, hi) in enumerate(spans):
        if i % 2:
            ax.axvspan(lo, hi, color="0.93", zorder=0, lw=0)
        if i:
            ax.axvline(lo, color="0.35", ls="--", lw=0.8, zorder=1)
        if label:
            # clipped and kept out of the layout: a stage that starts left of the plotted
            # steps (a short run logs one point) would otherwise push constrained layout to
            # collapse the axes to nothing
            ax.text(lo, 0.98, f" {name}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="0.25", clip_on=True, in_layout=False)


def loss_figure(records: Sequence[dict[str, Any]], *, width_in: float = 7.0,
                height_in: float = 4.0) -> Figure:
    """Total loss and both loss terms against the global step (log scale), stages marked.

    Args:
        records: loss records as :func:`step_records` returns them (non-empty).
        width_in: figure width in inches (100 px each).
        height_in: figure height in inches.
    """
    fig = new_figure(width_in, height_in)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    for key, name, colour in LOSS_TERMS:
        ax.plot(steps, [r[key] for r in records], color=colour, lw=1.6 if key == "loss" else 1.2,
                label=name, marker="." if len(records) < 40 else None)
    mark_stages(ax, stage_spans(records))
    ax.set_xlabel("optimizer step (whole run)")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    return fig


def plot_loss_curve(metrics_path: Path, out: Path, *, page: bool = True) -> bool:
    """Plot loss and both loss terms against the global step, stages marked. False if empty.

    With ``page`` (the default) also rewrite the run page ``<run dir>/report/index.html``
    (:func:`training.run_page.write_run_page`, run dir = the folder of ``metrics_path``).
    The trainer calls this at the end of every stage; a failure to write the page is logged
    and never stops training.
    """
    records = step_records(read_metrics(metrics_path))
    if not records:
        return False
    _write_figure(loss_figure(records), out)
    if page:
        write_run_page_quietly(metrics_path.parent)
    return True


def write_run_page_quietly(run_dir: Path) -> Path | None:
    """Write the run page; log any failure as a warning instead of raising (for the trainer)."""
    from training.run_page import write_run_page

    try:
        path = write_run_page(run_dir)
    except Exception as exc:  # a report must never end a training run
        logger.warning("could not write the run page of %s: %s: %s", run_dir,
                       type(exc).__name__, exc)
        return None
    logger.info("run page: %s", path)
    return path


# --------------------------------------------------------------------------- reconstructions


def rgb_indices(bands: tuple[str, ...]) -> tuple[int, int, int]:
    """Indices of B04, B03, B02 in ``bands`` (falls back to the first three bands)."""
    if all(b in bands for b in RGB_BANDS):
        return tuple(bands.index(b) for b in RGB_BANDS)  # type: ignore[return-value]
    return (0, 1, 2)


def spectral_groups(num_bands: int, band_patch_size: int = 3) -> list[list[int]]:
    """Band indices of each spectral group: consecutive runs of ``band_patch_size`` bands.

    The tokeniser cuts the band axis into these groups (``[12 bands] -> 4 groups of 3``:
    B01-B03, B04-B06, B07-B8A, B09-B12 in the shards' band order).
    """
    return [list(range(i, min(i + band_patch_size, num_bands)))
            for i in range(0, num_bands, band_patch_size)]


def groups_path(path: Path) -> Path:
    """Where :func:`save_reconstruction` puts the per-group figure of the PNG ``path``."""
    return path.parent / GROUPS_DIR / path.name


def _stretch(img: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    return np.clip((img - lo) / np.maximum(np.asarray(hi) - lo, 1e-6), 0, 1)


def _hide_frame(ax: Axes) -> None:
    """No ticks or spines, but keep the axes so a y label can name the row."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_reconstruction(path: Path, image: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                        bands: tuple[str, ...], title: str = "", *,
                        band_patch_size: int = 3) -> None:
    """Write the RGB reconstruction PNG at ``path`` and the per-group one next to it.

    Args:
        path: ``images/<stage>_step<N>.png``; the group figure goes to :func:`groups_path`.
        image: ``[C, H, W]`` normalised input, or ``[T, C, H, W]`` for a time stack (one
            row of panels per date).
        recon: the same shape: model output with the visible pixels pasted back (MAE style).
        mask: the same shape: 1 where the pixel's token was removed.
        bands: band names of the C axis (RGB = B04, B03, B02).
        title: figure title (stage, step, loss of the sample).
        band_patch_size: bands per token, i.e. per spectral group.

    RGB figure: input, masked input and reconstruction in true colour. All three share one
    2-98 percentile stretch per channel taken from the input, so the colours are
    comparable. In the middle panel each hidden red, green or blue value is set to mid-grey
    per channel: B04 falls in another spectral group than B03/B02 and is masked apart.
    """
    stack = image.ndim == 4  # a time stack [T, C, H, W]: one row of panels per date
    images, recons, masks = (image, recon, mask) if stack else (image[None], recon[None], mask[None])
    idx = list(rgb_indices(bands))
    rgb_in = np.moveaxis(images[:, idx], 1, -1)  # [T, H, W, 3]
    rgb_out = np.moveaxis(recons[:, idx], 1, -1)
    hidden = np.moveaxis(masks[:, idx], 1, -1) > 0.5
    # one stretch for every date, from the input: colours compare across dates too
    lo = np.percentile(rgb_in, 2, axis=(0, 1, 2))
    hi = np.percentile(rgb_in, 98, axis=(0, 1, 2))
    n = len(images)
    fig = new_figure(9, 3.4 if n == 1 else 0.6 + 2.9 * n)
    axes = fig.subplots(n, 3, squeeze=False)
    for t in range(n):
        masked = _stretch(rgb_in[t], lo, hi)
        masked[hidden[t]] = 0.5
        date = f"date {t + 1}: " if stack else ""
        panels = [(f"{date}input (RGB)", _stretch(rgb_in[t], lo, hi)),
                  (f"masked ({hidden[t].mean():.0%} of RGB values hidden)", masked),
                  ("reconstruction + visible", _stretch(rgb_out[t], lo, hi))]
        for ax, (name, img) in zip(axes[t], panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    _write_figure(fig, path)
    # per spectral group: the first date of a stack
    _write_figure(group_figure(images[0], recons[0], masks[0], bands, title=title,
                               band_patch_size=band_patch_size), groups_path(path))


def group_figure(image: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                 bands: tuple[str, ...], *, title: str = "", band_patch_size: int = 3) -> Figure:
    """Input, masked input and reconstruction of every spectral group as a 3-band composite.

    Arrays as in :func:`save_reconstruction`. Each group's bands are shown as red = its
    last (longest-wavelength) band, green = the middle one, blue = the first, as true colour
    orders B04, B03, B02. One 2-98 percentile range per group, taken from the input over
    its three bands, keeps the bands' relative brightness (the group's spectral shape shows
    as colour). A token spans all bands of its group, so each group has its own mask; the
    reconstruction row states the MSE over the hidden pixels of that group.
    """
    groups = spectral_groups(len(bands), band_patch_size)
    fig = new_figure(2.25 * len(groups) + 0.5, 7.4)
    axes = fig.subplots(3, len(groups), squeeze=False)
    for g, idx in enumerate(groups):
        show = (list(reversed(idx)) * 3)[:3]  # a short last group repeats its bands
        x_in = np.moveaxis(image[show], 0, -1)  # [H, W, 3]
        lo, hi = np.percentile(x_in, [2, 98])
        hidden = mask[idx[0]] > 0.5  # [H, W]
        masked = _stretch(x_in, lo, hi)
        masked[hidden] = 0.5
        err = float(((recon[idx] - image[idx]) ** 2)[:, hidden].mean()) if hidden.any() else None
        rows = [(_stretch(x_in, lo, hi), f"G{g + 1}: {' '.join(bands[i] for i in idx)}"),
                (masked, f"{hidden.mean():.0%} hidden"),
                (_stretch(np.moveaxis(recon[show], 0, -1), lo, hi),
                 "nothing hidden" if err is None else f"MSE hidden {err:.3g}")]
        for r, (img, name) in enumerate(rows):
            ax = axes[r, g]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(name, fontsize=9, fontweight="bold" if r == 0 else "normal")
            _hide_frame(ax)
    for r, name in enumerate(("input", "masked input", "reconstruction")):
        axes[r, 0].set_ylabel(name, fontsize=10)
    head = "Spectral groups (R, G, B = 3rd, 2nd, 1st band of the group)"
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=10)
    return fig


def _write_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (a temporary file, then a rename).

    Raises:
        DiskFullError: no space for the PNG (its temporary file is removed by
            ``write_file_atomic``; a previous file of that name is untouched).
    """
    buf = io.BytesIO()
    save_png(fig, buf)
    data = buf.getvalue()
    try:
        write_file_atomic(path, data)
    except OSError as exc:
        cause = no_space(exc)
        if cause is None:
            raise
        raise DiskFullError.at("an image", path, cause, needed=len(data),
                               after="free space, then resume with --resume") from None
