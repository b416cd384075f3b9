"""Seeded generators of tiny, format-faithful downstream data sets and tiny checkpoints.

Each writer reproduces the published on-disk layout its reader supports
(``training/evaluation/readers.py``) with class-dependent spectra, so a linear probe can
learn something:

* :func:`write_eurosat` - ``<root>/<Class>/<Class>_<n>.tif``, 13 uint16 bands in the official
  EuroSAT-MS order (B01..B09, B10, B11, B12, **B8A last**), 64x64, no band descriptions;
* :func:`write_segmentation` - ``images/<id>.tif`` + ``masks/<id>.tif`` + ``metadata.json``;
* :func:`write_oscd` - the official OSCD unzipped layout (``... - Images/<city>/imgs_1_rect/
  B01.tif ..``, ``... - Train Labels/<city>/cm/cm.png``, ``train.txt``/``test.txt``);
* :func:`write_checkpoints` - a random-init tiny model as ``training.export`` writes it
  (``.safetensors`` + ``.json``, and ``.pt``) and in the official ``SpectralGPT.pth`` layout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

EUROSAT_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11",
                 "B12", "B8A")
MODEL_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11",
               "B12")
OSCD_FILES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
              "B11", "B12")


def _write_tif(path: Path, data: np.ndarray, descriptions: Sequence[str] | None = None,
               crs: str = "EPSG:32632") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs=crs,
                       transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, 1):
                dst.set_band_description(i, d)


def _spectra(rng: np.random.Generator, n: int, bands: int) -> np.ndarray:
    """``[n, bands]`` well-separated mean spectra (DN)."""
    return rng.uniform(400, 3500, size=(n, bands))


def write_eurosat(root: Path, classes: Sequence[str] = ("AnnualCrop", "Forest", "River"),
                  per_class: int = 10, size: int = 64, seed: int = 0) -> Path:
    """EuroSAT-MS class folders; returns ``root``. B8A (stored last) is class-specific."""
    rng = np.random.default_rng(seed)
    spectra = _spectra(rng, len(classes) + 1, 13)  # the last one is a shared background
    yy, xx = np.mgrid[:size, :size]
    for c, name in enumerate(classes):
        for n in range(1, per_class + 1):
            # A disc of the class material on the background: the class shows in which bands
            # are brighter inside the disc, which survives per-image per-band min-max.
            r0, c0 = rng.uniform(0.3, 0.7, 2) * size
            disc = (yy - r0) ** 2 + (xx - c0) ** 2 < (0.3 * size) ** 2
            img = np.where(disc, spectra[c][:, None, None], spectra[-1][:, None, None])
            img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 60, (13, size, size))
            _write_tif(root / name / f"{name}_{n}.tif", np.clip(img, 1, 65535).astype(np.uint16))
    return root


def write_segmentation(root: Path, n: int = 6, size: int = 48, num_classes: int = 3,
                       seed: int = 0, sidecar: bool = True) -> Path:
    """``images/``, ``masks/`` and ``metadata.json`` (bands + classes); class = spectrum."""
    rng = np.random.default_rng(seed)
    spectra = _spectra(rng, num_classes, 12)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for c in range(1, num_classes):  # a few rectangles per class
            for _ in range(2):
                r, q = rng.integers(0, size - 12, 2)
                h, w = rng.integers(8, 20, 2)
                mask[r:r + h, q:q + w] = c
        mask[0, 0] = 255  # one ignored pixel
        img = spectra[np.minimum(mask, num_classes - 1)].transpose(2, 0, 1)
        img = img + rng.normal(0, 60, img.shape)
        names = list(MODEL_ORDER)[::-1]  # stored in reverse: must be mapped by name
        _write_tif(root / "images" / f"tile_{i}.tif",
                   np.clip(img[::-1], 1, 65535).astype(np.uint16),
                   descriptions=None if sidecar else names)
        _write_tif(root / "masks" / f"tile_{i}.tif", mask)
    if sidecar:
        (root / "metadata.json").write_text(json.dumps(
            {"bands": list(MODEL_ORDER)[::-1], "classes": ["background"] +
             [f"class_{c}" for c in range(1, num_classes)], "ignore_index": 255,
             "background": 0}))
    return root


def write_oscd(root: Path, cities: Sequence[str] = ("abudhabi", "beirut", "cupertino",
                                                    "lasvegas"),
               size: int = 40, test: Sequence[str] = ("lasvegas",), seed: int = 0) -> Path:
    """The official OSCD layout: Images (imgs_1_rect, imgs_2_rect, dates.txt, train/test.txt)
    plus Train Labels (cm/cm.png, 0/255) and Test Labels (cm/<city>-cm.tif, 1/2)."""
    rng = np.random.default_rng(seed)
    images = root / "Onera Satellite Change Detection dataset - Images"
    before, after = _spectra(rng, 2, 13)
    for city in cities:
        change = np.zeros((size, size), bool)
        for _ in range(3):
            r, q = rng.integers(0, size - 10, 2)
            change[r:r + rng.integers(5, 14), q:q + rng.integers(5, 14)] = True
        base = before[:, None, None] * rng.uniform(0.9, 1.1, (1, size, size))
        d1 = base + rng.normal(0, 40, base.shape)
        d2 = np.where(change, after[:, None, None], base) + rng.normal(0, 40, base.shape)
        for folder, img in (("imgs_1_rect", d1), ("imgs_2_rect", d2)):
            for b, band in enumerate(OSCD_FILES):
                _write_tif(images / city / folder / f"{band}.tif",
                           np.clip(img[b], 1, 65535).astype(np.uint16))
        (images / city / "dates.txt").write_text("date_1: 20151231\ndate_2: 20180315\n")
        if city in test:
            _write_tif(root / "Onera Satellite Change Detection dataset - Test Labels" / city /
                       "cm" / f"{city}-cm.tif", (change.astype(np.uint8) + 1))
        else:
            png = root / "Onera Satellite Change Detection dataset - Train Labels" / city / "cm"
            png.mkdir(parents=True, exist_ok=True)
            with rasterio.open(png / "cm.png", "w", driver="PNG", width=size, height=size,
                               count=1, dtype="uint8") as dst:
                dst.write((change * 255).astype(np.uint8)[None])
    (images / "train.txt").write_text(",".join(c for c in cities if c not in test))
    (images / "test.txt").write_text(",".join(test))
    return root


def write_checkpoints(root: Path, img_size: int = 32, seed: int = 0, preset: str = "tiny") -> dict[str, Path]:
    """A random-init model (tiny unless ``preset`` says) as exports (``.safetensors`` +
    ``.json``, ``.pt``) and as an official ``SpectralGPT.pth``-style file
    (``{"model", "epoch", "args"}``)."""
    from safetensors.torch import save_file

    from training.export import EXPORT_FORMAT
    from training.models.spectral_mae import build_model

    torch.manual_seed(seed)
    model = build_model(preset, img_size=img_size)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    info = {"format": EXPORT_FORMAT, "model": asdict(model.cfg), "preset": preset,
            "stage": "random_init", "global_step": 0, "samples_seen": 0, "source": "",
            "bands_order": " ".join(MODEL_ORDER), "normalisation": "per_image_minmax"}
    root.mkdir(parents=True, exist_ok=True)
    st = root / f"{preset}.safetensors"
    save_file(weights, str(st), metadata={"spectralgpt": json.dumps(info)})
    st.with_suffix(".json").write_text(json.dumps(info, indent=1))
    pt = root / f"{preset}_pt" / f"{preset}.pt"
    pt.parent.mkdir(exist_ok=True)
    torch.save({"model": weights, "config": info}, pt)
    official = root / "official" / f"SpectralGPT_{preset}.pth"
    official.parent.mkdir(exist_ok=True)
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 1,
                "args": argparse.Namespace(model=f"mae_vit_{preset}")}, official)
    return {"safetensors": st, "pt": pt, "official": official}


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.helpers.eval_fixtures OUT``: the README's sample downstream sets."""
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.eval_fixtures",
                                     description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_eurosat(args.out / "eurosat", classes=("AnnualCrop", "Forest", "Industrial", "River"),
                  per_class=20, seed=args.seed)
    write_segmentation(args.out / "segmentation", n=10, size=128, num_classes=4, seed=args.seed)
    write_oscd(args.out / "oscd", cities=("abudhabi", "beirut", "cupertino", "lasvegas",
                                          "montpellier"),
               test=("lasvegas", "montpellier"), size=200, seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
