"""Readers for the downstream data sets in their published on-disk formats.

Every reader returns images as float32 ``[12, H, W]`` arrays in the model's band order
(``catalogs/sentinel2.yaml``: B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12), in the
file's digital numbers (normalisation happens later, :mod:`.tasks`). Bands are always
matched **by name**, never by position: EuroSAT-MS stores B8A last and keeps B10, and the
official SpectralGPT pipeline dropped the wrong band because of it
(``../shared/research/spectralgpt.md`` section 4.5; phelber/EuroSAT issue #7, torchgeo #2458).

Supported layouts:

* **EuroSAT-MS** ``<root>/<ClassName>/<ClassName>_<n>.tif``: 13-band 64x64 uint16 GeoTIFFs.
  Band names come from the GeoTIFF band descriptions when every band has one, else the
  official order B01..B09, B10, B11, B12, B8A. Classes = sorted folder names.
* **BigEarthNet-S2 v1.0** ``<root>/<patch>/<patch>_<band>.tif`` (12 single-band files at
  10/20/60 m) + ``<patch>_labels_metadata.json``. 20 m and 60 m bands are resampled to the
  10 m grid (120 px) bilinearly; labels in the 43-class or the 19-class nomenclature
  (``bigearthnet_labels.yaml``).
* **Segmentation** ``<root>/images/<id>.tif`` + ``<root>/masks/<id>.tif`` (or ``.png``):
  band names from ``<root>/metadata.json`` (``{"bands": [...], "classes": [...],
  "ignore_index": 255, "background": 0, "fill_missing": "mean"}``, every key optional) or
  from the band descriptions. ``fill_missing: mean`` fills absent bands with the per-pixel
  mean of the present ones (the official SegMunich choice for its 10-band images).
* **OSCD** (Onera Satellite Change Detection, Daudt et al. 2018), the official unzipped
  layout ``<root>/Onera Satellite Change Detection dataset - Images/<city>/imgs_1_rect/B01.tif
  .. B12.tif`` (incl. B8A, B10), ``imgs_2_rect/``, and ``<root>/Onera Satellite Change
  Detection dataset - {Train,Test} Labels/<city>/cm/cm.png`` (0 = no change, 255 = change)
  or ``cm/<city>-cm.tif`` (1 = no change, 2 = change). The ``Images`` folder alone with
  ``<city>/cm/`` inside each city folder works too, as does ``imgs_1/`` with the native
  product file names (``..._B01.tif``; 20/60 m bands are resampled to the 10 m grid).
  ``train.txt`` / ``test.txt`` (comma-separated city names) give the official split.

Splits: files that hold sample names (one per line, CSV first column, or one comma-separated
line) - see :func:`read_name_list`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
import yaml
from numpy.typing import NDArray
from rasterio.errors import NotGeoreferencedWarning

from pipeline.catalogs import sensor
from training.evaluation.errors import DatasetFormatError, MissingBandsError

__all__ = [
    "EUROSAT_BAND_ORDER",
    "ChangeData",
    "ClassificationData",
    "SegmentationData",
    "model_bands",
    "read_bigearthnet",
    "read_eurosat",
    "read_name_list",
    "read_oscd",
    "read_segmentation",
    "resample_to",
    "to_model_order",
]

LABELS_FILE = Path(__file__).resolve().parent / "bigearthnet_labels.yaml"

#: Band order of the official EuroSAT-MS GeoTIFFs: B01..B12 with B10, then B8A last
#: (phelber/EuroSAT issue #7; torchgeo PR #2480).
EUROSAT_BAND_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10",
                      "B11", "B12", "B8A")

Array = NDArray[np.float32]


@cache
def model_bands() -> tuple[str, ...]:
    """The model's band order, from ``catalogs/sentinel2.yaml`` (12 bands, no B10)."""
    return tuple(sensor().band_names)


@cache
def bigearthnet_labels() -> dict[str, Any]:
    """The 43- and 19-class nomenclatures and the 43 -> 19 mapping (``bigearthnet_labels.yaml``)."""
    return dict(yaml.safe_load(LABELS_FILE.read_text()))


_BAND_RE = re.compile(r"(?:^|[_\-\s])B0?(\d{1,2})(A?)$", re.IGNORECASE)


def band_name(text: str) -> str | None:
    """Canonical Sentinel-2 band name of ``text`` (``B1``/``B01``/``x_B01`` -> ``B01``,
    ``B8a``/``B08A`` -> ``B8A``), or None."""
    m = _BAND_RE.search(text.strip())
    if not m:
        return None
    number, a = int(m.group(1)), m.group(2).upper()
    if a:
        return "B8A" if number == 8 else None
    return f"B{number:02d}" if 1 <= number <= 12 else None


def to_model_order(array: NDArray[Any], names: Sequence[str], source: str) -> Array:
    """Select and reorder ``[C, H, W]`` bands called ``names`` into the model's order.

    Raises:
        MissingBandsError: naming the model bands absent from ``names``.
    """
    index = {n: i for i, n in enumerate(names)}
    missing = [b for b in model_bands() if b not in index]
    if missing:
        raise MissingBandsError(f"{source}: missing band(s) {', '.join(missing)} (has "
                                f"{', '.join(names)}; the model needs {' '.join(model_bands())})")
    return np.stack([array[index[b]] for b in model_bands()]).astype(np.float32)


def resample_to(band: NDArray[Any], size: tuple[int, int]) -> Array:
    """Bilinear resampling of one ``[h, w]`` band to ``size`` (half-pixel centres, no antialias).

    Used to put 20 m and 60 m bands on the 10 m grid; the official BigEarthNet stacking
    method is unknown and OSCD's uses cubic ``scipy.ndimage.zoom`` (research note 4.3).
    """
    if band.shape == size:
        return band.astype(np.float32)
    x = torch.from_numpy(band.astype(np.float32))[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _read(path: Path) -> tuple[NDArray[Any], tuple[str | None, ...]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                return src.read(), tuple(src.descriptions)
        except rasterio.errors.RasterioIOError as exc:
            raise DatasetFormatError(f"cannot read '{path}': {exc}") from None


def _names_from_descriptions(descriptions: Sequence[str | None]) -> list[str] | None:
    names = [band_name(d) if d else None for d in descriptions]
    if all(names) and len(set(names)) == len(names):
        return [n for n in names if n]
    return None


def read_name_list(path: str | Path) -> list[str]:
    """Sample names from a split file, extensions removed.

    One name per line (the first CSV column when a line has commas, as BigEarthNet's
    ``train.csv`` with ``S2,S1`` pairs), or a single comma-separated line (OSCD ``train.txt``).
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetFormatError(f"split file '{p}' not found")
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if len(lines) == 1 and "," in lines[0]:
        names = lines[0].split(",")
    else:
        names = [ln.split(",")[0] for ln in lines]
    names = [Path(n.strip()).name for n in names if n.strip()]
    return [re.sub(r"\.(tif{1,2}|jpe?g|png)$", "", n, flags=re.IGNORECASE) for n in names]


# --------------------------------------------------------------------------- containers


@dataclass
class ClassificationData:
    """A single- or multi-label image set. ``load(i)`` -> ``[12, H, W]`` float32 DN."""

    ids: list[str]
    targets: NDArray[Any]
    """``[N]`` int64 class index, or ``[N, C]`` float32 multi-hot when ``multilabel``."""
    class_names: list[str]
    multilabel: bool
    load: Callable[[int], Array]
    split_files: dict[str, list[str]] = field(default_factory=dict)
    """``{"train": [...], "test": [...]}`` from the data set's own split files, if any."""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegmentationData:
    """Images ``[12, H, W]`` and masks ``[H, W]`` int64 of the same size."""

    ids: list[str]
    load_image: Callable[[int], Array]
    load_mask: Callable[[int], NDArray[np.int64]]
    class_names: list[str]
    ignore_index: int | None
    background: int | None
    split_files: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChangeData:
    """Image pairs (two ``[12, H, W]``) with a 0/1 change mask ``[H, W]``."""

    ids: list[str]
    load_pair: Callable[[int], tuple[Array, Array]]
    load_mask: Callable[[int], NDArray[np.int64]]
    split_files: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    class_names: list[str] = field(default_factory=lambda: ["no change", "change"])


def _require_dir(root: str | Path, what: str) -> Path:
    p = Path(root)
    if not p.is_dir():
        raise DatasetFormatError(f"--data '{p}' is not a directory ({what} expected)")
    return p


def _split_files(root: Path, pairs: dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """The first existing file of each split's candidate names, read as name lists."""
    out: dict[str, list[str]] = {}
    for split, candidates in pairs.items():
        for name in candidates:
            if (root / name).is_file():
                out[split] = read_name_list(root / name)
                break
    return out


# --------------------------------------------------------------------------- EuroSAT-MS


def read_eurosat(root: str | Path) -> ClassificationData:
    """EuroSAT-MS: ``<root>/<ClassName>/*.tif``, 13 bands, B8A last (see module doc)."""
    base = _require_dir(root, "EuroSAT-MS class folders")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and any(d.glob("*.tif")))
    if not classes:
        raise DatasetFormatError(f"'{base}' has no class folders with .tif files (EuroSAT-MS "
                                 f"layout: <root>/<ClassName>/<ClassName>_<n>.tif)")
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        files = sorted((base / name).glob("*.tif"))
        paths += files
        labels += [c] * len(files)
    band_source: dict[str, str] = {}

    def load(i: int) -> Array:
        data, descriptions = _read(paths[i])
        names = _names_from_descriptions(descriptions)
        if names is not None:
            band_source.setdefault("bands", "GeoTIFF band descriptions")
        else:
            if data.shape[0] != len(EUROSAT_BAND_ORDER):
                raise DatasetFormatError(f"'{paths[i]}' has {data.shape[0]} bands and no band "
                                         f"descriptions; EuroSAT-MS files have 13")
            names = list(EUROSAT_BAND_ORDER)
            band_source.setdefault("bands", "official EuroSAT-MS order (B8A last)")
        return to_model_order(data, names, str(paths[i]))

    return ClassificationData(
        ids=[p.stem for p in paths], targets=np.asarray(labels, dtype=np.int64),
        class_names=classes, multilabel=False, load=load,
        split_files=_split_files(base, {"train": ["eurosat-train.txt", "train.txt"],
                                        "test": ["eurosat-test.txt", "test.txt"]}),
        info={"format": "EuroSAT-MS", "band_source": band_source})


# --------------------------------------------------------------------------- BigEarthNet


def bigearthnet_targets(labels: Sequence[str], label_set: int) -> NDArray[np.float32]:
    """Multi-hot target of one patch's CORINE labels in the 43- or 19-class nomenclature.

    Raises:
        DatasetFormatError: a label is not one of the 43 BigEarthNet names.
    """
    table = bigearthnet_labels()
    names43: list[str] = table["labels_43"]
    unknown = [x for x in labels if x not in names43]
    if unknown:
        raise DatasetFormatError(f"unknown BigEarthNet label(s) {unknown}")
    if label_set == 43:
        out = np.zeros(43, np.float32)
        out[[names43.index(x) for x in labels]] = 1
        return out
    if label_set != 19:
        raise DatasetFormatError(f"--label-set must be 19 or 43, got {label_set}")
    names19: list[str] = table["labels_19"]
    out = np.zeros(19, np.float32)
    for x in labels:
        new = table["old2new"][x]
        if new is not None:
            out[names19.index(new)] = 1
    return out


def read_bigearthnet(root: str | Path, label_set: int = 19) -> ClassificationData:
    """BigEarthNet-S2 v1.0 patch folders (see module doc); ``label_set`` 19 or 43."""
    base = _require_dir(root, "BigEarthNet-S2 patch folders")
    patches = sorted(d for d in base.iterdir()
                     if d.is_dir() and (d / f"{d.name}_labels_metadata.json").is_file())
    if not patches:
        raise DatasetFormatError(f"'{base}' has no BigEarthNet-S2 patch folders "
                                 f"(<patch>/<patch>_labels_metadata.json)")
    targets = []
    for d in patches:
        meta = json.loads((d / f"{d.name}_labels_metadata.json").read_text())
        if "labels" not in meta:
            raise DatasetFormatError(f"'{d.name}_labels_metadata.json' has no 'labels' key")
        targets.append(bigearthnet_targets(meta["labels"], label_set))
    table = bigearthnet_labels()

    def load(i: int) -> Array:
        d = patches[i]
        files = {band_name(f.stem[len(d.name):]): f for f in d.glob(f"{d.name}_B*.tif")}
        missing = [b for b in model_bands() if b not in files]
        if missing:
            raise MissingBandsError(f"BigEarthNet patch '{d}': missing band file(s) "
                                    f"{', '.join(f'{d.name}_{b}.tif' for b in missing)}")
        bands = {b: _read(files[b])[0][0] for b in model_bands()}
        size = max((a.shape for a in bands.values()), key=lambda s: s[0] * s[1])
        return np.stack([resample_to(bands[b], size) for b in model_bands()])

    y = np.stack(targets)
    return ClassificationData(
        ids=[d.name for d in patches], targets=y,
        class_names=list(table[f"labels_{label_set}"]), multilabel=True, load=load,
        split_files=_split_files(base, {"train": ["train.csv"], "test": ["test.csv"]}),
        info={"format": "BigEarthNet-S2 v1.0", "label_set": label_set,
              "band_source": {"bands": "file names <patch>_<band>.tif"},
              "resampling": "20 m and 60 m bands bilinear to the 10 m grid (120 px)",
              "patches_without_target": int((y.sum(1) == 0).sum())})


# --------------------------------------------------------------------------- segmentation


def _read_mask(path: Path) -> NDArray[np.int64]:
    return _read(path)[0][0].astype(np.int64)


def read_segmentation(root: str | Path) -> SegmentationData:
    """``<root>/images/<id>.tif`` + ``<root>/masks/<id>.tif|png`` (see module doc)."""
    base = _require_dir(root, "images/ and masks/ folders")
    img_dir, mask_dir = base / "images", base / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetFormatError(f"'{base}' needs images/ and masks/ folders (segmentation "
                                 f"layout: images/<id>.tif, masks/<id>.tif)")
    meta_path = base / "metadata.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    images = sorted(img_dir.glob("*.tif"))
    masks: list[Path] = []
    for img in images:
        found = [m for m in (mask_dir / f"{img.stem}.tif", mask_dir / f"{img.stem}.png")
                 if m.is_file()]
        if not found:
            raise DatasetFormatError(f"no mask for image '{img.name}' in '{mask_dir}'")
        masks.append(found[0])
    if not images:
        raise DatasetFormatError(f"'{img_dir}' has no .tif images")
    sidecar = [band_name(b) or b for b in meta.get("bands", [])]
    fill = meta.get("fill_missing")
    if fill not in (None, "mean"):
        raise DatasetFormatError(f"'{meta_path}': fill_missing must be 'mean' or absent")
    ignore = meta.get("ignore_index", 255)
    band_source: dict[str, str] = {}

    def load_image(i: int) -> Array:
        data, descriptions = _read(images[i])
        names = sidecar or _names_from_descriptions(descriptions)
        if not names:
            raise DatasetFormatError(f"'{images[i]}': no band names; add a 'bands' list to "
                                     f"'{meta_path}' or set the GeoTIFF band descriptions")
        band_source.setdefault("bands", "metadata.json" if sidecar else "band descriptions")
        if len(names) != data.shape[0]:
            raise DatasetFormatError(f"'{images[i]}' has {data.shape[0]} bands but "
                                     f"{len(names)} band names")
        if fill == "mean":
            present = [n for n in names if n in model_bands()]
            mean = data[[names.index(n) for n in present]].astype(np.float32).mean(0)
            absent = [b for b in model_bands() if b not in names]
            data = np.concatenate([data.astype(np.float32), np.repeat(mean[None], len(absent), 0)])
            names = [*names, *absent]
            if absent:
                band_source["filled_with_pixel_mean"] = " ".join(absent)
        return to_model_order(data, names, str(images[i]))

    def load_mask(i: int) -> NDArray[np.int64]:
        return _read_mask(masks[i])

    classes = meta.get("classes")
    if classes is None:
        top = 0
        for i in range(len(masks)):
            m = load_mask(i)
            valid = m[m != ignore] if ignore is not None else m
            top = max(top, int(valid.max()) if valid.size else 0)
        classes = [str(c) for c in range(top + 1)]
    return SegmentationData(
        ids=[p.stem for p in images], load_image=load_image, load_mask=load_mask,
        class_names=list(classes), ignore_index=ignore, background=meta.get("background", 0),
        split_files=_split_files(base, {"train": ["train.txt"], "test": ["test.txt"]}),
        info={"format": "images/masks GeoTIFF pairs", "band_source": band_source,
              "metadata": str(meta_path) if meta else None})


# --------------------------------------------------------------------------- OSCD

OSCD_IMAGES = "Onera Satellite Change Detection dataset - Images"


def _oscd_bands(folder: Path) -> Array:
    files: dict[str, Path] = {}
    for f in folder.glob("*.tif"):
        name = band_name(f.stem)
        if name:
            files[name] = f
    missing = [b for b in model_bands() if b not in files]
    if missing:
        raise MissingBandsError(f"OSCD folder '{folder}': missing band file(s) "
                                f"{', '.join(missing)} (expected B01.tif .. B12.tif incl. B8A)")
    bands = {b: _read(files[b])[0][0] for b in model_bands()}
    size = bands["B02"].shape  # the 10 m grid
    return np.stack([resample_to(bands[b], size) for b in model_bands()])


def _oscd_mask(path: Path) -> NDArray[np.int64]:
    m = _read(path)[0][0]
    if path.suffix.lower() == ".tif" and set(np.unique(m).tolist()) <= {1, 2}:
        return (m == 2).astype(np.int64)  # <city>-cm.tif: 1 = no change, 2 = change
    return (m > 0).astype(np.int64)  # cm.png: 0 / 255


def read_oscd(root: str | Path) -> ChangeData:
    """OSCD city folders with two dates and a change mask (see module doc)."""
    base = _require_dir(root, "OSCD city folders")
    images_root = base / OSCD_IMAGES if (base / OSCD_IMAGES).is_dir() else base
    label_roots = [images_root, *sorted(d for d in base.iterdir()
                                        if d.is_dir() and d.name.endswith("Labels"))]
    ids: list[str] = []
    dates: list[tuple[Path, Path]] = []
    masks: list[Path] = []
    unlabelled: list[str] = []
    for city in sorted(d for d in images_root.iterdir() if d.is_dir()):
        pair = []
        for i in (1, 2):
            for name in (f"imgs_{i}_rect", f"imgs_{i}"):
                if (city / name).is_dir():
                    pair.append(city / name)
                    break
        if len(pair) != 2:
            continue
        mask = next((lr / city.name / "cm" / f for lr in label_roots
                     for f in ("cm.png", f"{city.name}-cm.tif")
                     if (lr / city.name / "cm" / f).is_file()), None)
        if mask is None:
            unlabelled.append(city.name)
            continue
        ids.append(city.name)
        dates.append((pair[0], pair[1]))
        masks.append(mask)
    if not ids:
        raise DatasetFormatError(f"'{base}' has no OSCD city folders with imgs_1(_rect)/, "
                                 f"imgs_2(_rect)/ and a change mask cm/cm.png or cm/<city>-cm.tif")

    def load_pair(i: int) -> tuple[Array, Array]:
        a, b = _oscd_bands(dates[i][0]), _oscd_bands(dates[i][1])
        if a.shape != b.shape:
            raise DatasetFormatError(f"OSCD city '{ids[i]}': dates have shapes {a.shape[1:]} "
                                     f"and {b.shape[1:]}")
        return a, b

    def load_mask(i: int) -> NDArray[np.int64]:
        return _oscd_mask(masks[i])

    return ChangeData(
        ids=ids, load_pair=load_pair, load_mask=load_mask,
        split_files=_split_files(images_root, {"train": ["train.txt"], "test": ["test.txt"]}),
        info={"format": "OSCD", "cities_without_labels": unlabelled,
              "band_source": {"bands": "file names B01.tif .. B12.tif"},
              "resampling": "bands not on the 10 m grid bilinear to it"})
