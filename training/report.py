"""Run outputs: JSON-lines metrics, reconstruction PNGs and the loss-curve plot.

Only rank 0 calls these. matplotlib runs with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

#: Sentinel-2 true colour: red, green, blue.
RGB_BANDS = ("B04", "B03", "B02")


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed on every write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (an empty list when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rgb_indices(bands: tuple[str, ...]) -> tuple[int, int, int]:
    """Indices of B04, B03, B02 in ``bands`` (falls back to the first three bands)."""
    if all(b in bands for b in RGB_BANDS):
        return tuple(bands.index(b) for b in RGB_BANDS)  # type: ignore[return-value]
    return (0, 1, 2)


def _stretch(rgb: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)


def save_reconstruction(path: Path, image: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                        bands: tuple[str, ...], title: str = "") -> None:
    """Write a three-panel PNG: input RGB, masked input, reconstruction.

    Args:
        image: ``[T, H, W]`` normalised input.
        recon: ``[T, H, W]`` model output with the visible pixels pasted back (MAE style).
        mask: ``[T, H, W]`` 1 where the pixel's 3D token was removed.
        bands: band names of the T axis (RGB = B04, B03, B02).

    All panels share one 2-98 percentile stretch taken from the input, so the colours are
    comparable. In the middle panel each hidden red, green or blue value is set to mid-grey
    per channel: B04 falls in another spectral group than B03/B02 and is masked apart.
    """
    idx = list(rgb_indices(bands))
    rgb_in = np.moveaxis(image[idx], 0, -1)  # [H, W, 3]
    rgb_out = np.moveaxis(recon[idx], 0, -1)
    hidden = np.moveaxis(mask[idx], 0, -1) > 0.5
    lo = np.percentile(rgb_in, 2, axis=(0, 1))
    hi = np.percentile(rgb_in, 98, axis=(0, 1))
    masked = _stretch(rgb_in, lo, hi)
    masked[hidden] = 0.5
    panels = [("input (RGB)", _stretch(rgb_in, lo, hi)),
              (f"masked ({hidden.mean():.0%} of RGB values hidden)", masked),
              ("reconstruction + visible", _stretch(rgb_out, lo, hi))]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_loss_curve(metrics_path: Path, out: Path) -> bool:
    """Plot loss and both loss terms against the global step, stages shaded. False if empty."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return False
    steps = np.array([r["step"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("loss_token", "--"), ("loss_spectral", ":")):
        ax.plot(steps, [r[key] for r in records], style, label=key)
    stages: dict[str, list[int]] = {}
    for r in records:
        stages.setdefault(r["stage"], []).append(r["step"])
    for i, (name, s) in enumerate(stages.items()):
        if i % 2:
            ax.axvspan(min(s), max(s), color="0.92", zorder=0)
        ax.text(min(s), 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return True
