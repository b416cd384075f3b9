"""Seeded synthetic shards in exactly the format of docs/DATASET_FORMAT.md.

Used by the trainer tests (and handy by hand: ``python tests/training/make_test_shards.py
OUT_DIR``) until/unless ``python -m pipeline.build_shards`` output is available. Chips are
mixtures of four synthetic spectra with smooth spatial abundances, so a masked autoencoder
has something learnable; a few pixels are nodata (0).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import webdataset as wds

BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
FORMAT_ID = "spectralgpt-shards/1"


def _chip(rng: np.random.Generator, size: int, bands: int) -> np.ndarray:
    """One uint16 chip ``[bands, size, size]`` in DN (reflectance x 10000)."""
    spectra = rng.uniform(300, 4000, size=(4, bands))
    low = rng.uniform(0, 1, size=(4, 4, 4))  # coarse abundance grids, upsampled smoothly
    coords = np.linspace(0, 3, size)
    yi = np.clip(coords.astype(int), 0, 2)
    ty = coords - yi
    ab = (low[:, yi][:, :, yi] * (1 - ty)[None, :, None] * (1 - ty)[None, None, :]
          + low[:, yi + 1][:, :, yi] * ty[None, :, None] * (1 - ty)[None, None, :]
          + low[:, yi][:, :, yi + 1] * (1 - ty)[None, :, None] * ty[None, None, :]
          + low[:, yi + 1][:, :, yi + 1] * ty[None, :, None] * ty[None, None, :])
    ab = ab / ab.sum(0, keepdims=True)
    img = np.einsum("khw,kc->chw", ab, spectra) + rng.normal(0, 30, size=(bands, size, size))
    img = np.clip(img, 1, 10000).astype(np.uint16)
    if rng.random() < 0.3:  # a nodata corner, as at swath edges
        img[:, : size // 8, : size // 8] = 0
    return img


def write_dataset(root: str | Path, *, sizes: dict[str, int] | None = None,
                  samples: dict[str, int] | None = None, shard_size: int = 6, seed: int = 0,
                  bands: int = 12) -> Path:
    """Write shards and ``manifest.json`` under ``root``; return the manifest path.

    Args:
        sizes: data set name -> chip side, default ``{"s96_g10m": 96, "s128_g10m": 128}``.
        samples: split -> samples per data set, default ``{"train": 9, "val": 2}``.
        shard_size: samples per shard (``maxcount`` of the writer).
        bands: band count written (12 per the contract; other values to test refusals).
    """
    root = Path(root)
    sizes = sizes or {"s96_g10m": 96, "s128_g10m": 128}
    samples = samples or {"train": 9, "val": 2}
    rng = np.random.default_rng(seed)
    band_names = BANDS[:bands] if bands <= 12 else [f"X{i:02d}" for i in range(bands)]
    datasets = {}
    for name, size in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        splits = {}
        train_chips = []
        for split, count in samples.items():
            shards = []
            for start in range(0, count, shard_size):
                path = root / name / f"{split}-{len(shards):06d}.tar"
                n = min(shard_size, count - start)
                with wds.TarWriter(str(path)) as sink:
                    for i in range(start, start + n):
                        chip = _chip(rng, size, bands)
                        if split == "train":
                            train_chips.append(chip)
                        key = f"29UPU_20170617_1a2b3c4d_{name}_{i // 4 * size:04d}_{i % 4 * size:04d}"
                        buf = io.BytesIO()
                        np.save(buf, chip, allow_pickle=False)
                        meta = {"key": key, "dataset": name, "split": split, "bands": band_names,
                                "dtype": "uint16", "layout": "CHW", "shape": list(chip.shape),
                                "value_scale": 0.0001, "nodata": 0}
                        sink.write({"__key__": key, "npy": buf.getvalue(), "json": meta})
                data = path.read_bytes()
                shards.append({"path": f"{name}/{path.name}", "num_samples": n,
                               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            splits[split] = {"num_samples": count, "shards": shards}
        stack = np.stack(train_chips).astype(np.float64)
        valid = stack != 0
        mean = [float(stack[:, b][valid[:, b]].mean()) for b in range(bands)]
        std = [float(stack[:, b][valid[:, b]].std()) for b in range(bands)]
        datasets[name] = {
            "chip_size": size, "gsd": 10.0, "time_steps": 1, "layout": "CHW",
            "shape": [bands, size, size], "splits": splits,
            "stats": {"count": [int(valid[:, b].sum()) for b in range(bands)], "mean": mean,
                      "std": std,
                      "min": [float(stack[:, b][valid[:, b]].min()) for b in range(bands)],
                      "max": [float(stack[:, b][valid[:, b]].max()) for b in range(bands)]},
        }
    manifest = {"format": FORMAT_ID, "software_version": "test", "created": "2026-01-01T00:00:00Z",
                "config": {"synthetic": True, "seed": seed}, "config_hash": "0" * 64,
                "bands": band_names, "dtype": "uint16", "value_scale": 0.0001, "nodata": 0,
                "datasets": datasets}
    path = root / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    print(write_dataset(sys.argv[1] if len(sys.argv) > 1 else "datasets/synthetic"))
