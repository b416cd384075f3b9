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
  mean of the present ones (the filler of the official SegMunich code, which appends it
  after the stored bands instead of by name; see :func:`read_segmunich`).
* **OSCD** (Onera Satellite Change Detection, Daudt et al. 2018), the official unzipped
  layout ``<root>/Onera Satellite Change Detection dataset - Images/<city>/imgs_1_rect/B01.tif
  .. B12.tif`` (incl. B8A, B10), ``imgs_2_rect/``, and ``<root>/Onera Satellite Change
  Detection dataset - {Train,Test} Labels/<city>/cm/cm.png`` (0 = no change, 255 = change)
  or ``cm/<city>-cm.tif`` (1 = no change, 2 = change). The ``Images`` folder alone with
  ``<city>/cm/`` inside each city folder works too, as does ``imgs_1/`` with the native
  product file names (``..._B01.tif``; 20/60 m bands are resampled to the 10 m grid).
  ``train.txt`` / ``test.txt`` (comma-separated city names) give the official split.

* **SegMunich** (the official ``TUM_128`` archive of SpectralGPT):
  ``<root>/{train,test}/img/<name>.tif`` (10 bands) + ``<root>/{train,test}/label/<name>.tif``
  + ``<root>/dataset/{train,test}.txt`` (one name per line); see :func:`read_segmunich` for
  the official label remapping and the official handling of the two missing bands.

Splits: files that hold sample names (one per line, CSV first column, one comma-separated
line, or ``path<whitespace>label`` lines as the official SpectralGPT EuroSAT split files)
- see :func:`read_name_list`, :func:`read_split_file` and :func:`eurosat_split_indices`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
import yaml
from numpy.typing import NDArray
from rasterio.errors import NotGeoreferencedWarning

from pipeline.catalogs import sensor
from pipeline.names import UnsafeName, confined, safe_name, safe_relpath
from training.evaluation.errors import DatasetFormatError, MissingBandsError

__all__ = [
    "EUROSAT_BAND_ORDER",
    "EUROSAT_CLASSES",
    "SEGMUNICH_BANDS",
    "ChangeData",
    "ClassificationData",
    "SegmentationData",
    "model_bands",
    "eurosat_split_indices",
    "read_bigearthnet",
    "read_eurosat",
    "read_name_list",
    "read_oscd",
    "read_segmentation",
    "read_segmunich",
    "read_split_file",
    "resample_to",
    "segmunich_labels",
    "segmunich_remap",
    "to_model_order",
]

LABELS_FILE = Path(__file__).resolve().parent / "bigearthnet_labels.yaml"
SEGMUNICH_FILE = Path(__file__).resolve().parent / "segmunich_labels.yaml"

#: Band order of the official EuroSAT-MS GeoTIFFs: B01..B12 with B10, then B8A last
#: (phelber/EuroSAT issue #7; torchgeo PR #2480).
EUROSAT_BAND_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10",
                      "B11", "B12", "B8A")

#: The 10 EuroSAT classes in the label order of the official SpectralGPT split files
#: (``txt_file/train_euro_result.txt``: ``tif/AnnualCrop/..`` -> 0 .. ``tif/SeaLake/..`` -> 9,
#: checked on all 21,600 lines), which is the alphabetical order of the class folders.
EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")

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
    """Sample names from a split file, folders and extensions removed.

    One name per line (the first CSV column when a line has commas, as BigEarthNet's
    ``train.csv`` with ``S2,S1`` pairs; the first whitespace-separated field otherwise, as the
    official SpectralGPT EuroSAT lists ``tif/AnnualCrop/AnnualCrop_1.tif    0``), or a single
    comma-separated line (OSCD ``train.txt``). Lines starting with ``#`` are comments (the
    header of :mod:`training.evaluation.subsets` lists). Only the base name is used, so no
    path from the file is ever opened here; :func:`eurosat_split_indices` checks paths and
    labels of a ``path label`` file against the data set.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetFormatError(f"split file '{p}' not found")
    lines = [ln.strip() for ln in p.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) == 1 and "," in lines[0]:
        names = lines[0].split(",")
    else:
        names = [ln.split(",")[0] if "," in ln else ln.split()[0] for ln in lines]
    names = [Path(n.strip()).name for n in names if n.strip()]
    return [re.sub(r"\.(tif{1,2}|jpe?g|png)$", "", n, flags=re.IGNORECASE) for n in names]


def read_split_file(path: str | Path) -> list[tuple[str, int | str]]:
    """``(relative path, label)`` entries of a ``path<whitespace>label`` split file.

    The format of the official SpectralGPT EuroSAT lists (``txt_file/train_euro_result.txt``,
    16,200 lines; ``val_euro_result.txt``, 5,400): ``tif/<Class>/<Class>_<n>.tif``, four
    spaces, the class index 0..9 (:data:`EUROSAT_CLASSES`); LF line ends, no header, no
    comments. The official reader splits each line on whitespace and takes fields 0 and 1
    (``util/datasets.py`` L802-805). Here blank lines, surrounding whitespace and CRLF are
    tolerated; the label is an ``int`` when it is an integer, else the text (a class name).

    Paths are checked as they are read (they come from a file someone else wrote): relative,
    ``/``-separated plain names, no ``..``, no absolute path, at most 4 levels
    (:func:`pipeline.names.safe_relpath`).

    Raises:
        DatasetFormatError: the file is missing, empty, or a line is not exactly two fields
            or names an unsafe path; the message names the file and the 1-based line number.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetFormatError(f"split file '{p}' not found")
    entries: list[tuple[str, int | str]] = []
    for number, line in enumerate(p.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetFormatError(f"{p}:{number}: expected '<relative path> <label>', got "
                                     f"{len(fields)} field(s): {line.strip()[:80]!r}")
        rel, label = fields
        try:
            safe_relpath(rel, "split file path")
        except UnsafeName as exc:
            raise DatasetFormatError(f"{p}:{number}: {exc}") from None
        entries.append((rel, int(label) if re.fullmatch(r"[+-]?\d+", label) else label))
    if not entries:
        raise DatasetFormatError(f"split file '{p}' has no entries")
    return entries


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
    root: Path | None = None
    """The data set folder the reader was given (kept out of ``info``, which goes into results)."""
    files: list[str] = field(default_factory=list)
    """Per sample, its file relative to ``root`` (``<Class>/<Class>_<n>.tif`` for EuroSAT);
    empty when samples are not single files."""


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

    data = ClassificationData(
        ids=[p.stem for p in paths], targets=np.asarray(labels, dtype=np.int64),
        class_names=classes, multilabel=False, load=load,
        split_files=_split_files(base, {"train": ["eurosat-train.txt", "train.txt"],
                                        "test": ["eurosat-test.txt", "test.txt"]}),
        info={"format": "EuroSAT-MS", "band_source": band_source},
        root=base, files=[p.relative_to(base).as_posix() for p in paths])
    # The official SpectralGPT lists, when copied into the data set folder: train on
    # train_euro_result.txt, report on val_euro_result.txt (the official code has no other
    # test split and reports the best epoch on this one, main_finetune.py L402-421).
    official = {"train": base / "train_euro_result.txt", "test": base / "val_euro_result.txt"}
    if "test" not in data.split_files and official["test"].is_file():
        for split, f in official.items():
            if f.is_file():
                data.split_files[split] = [data.ids[i] for i in
                                           eurosat_split_indices(data, read_split_file(f),
                                                                 source=str(f))]
        data.info["split"] = "official SpectralGPT lists (train_euro_result.txt, " \
                             "val_euro_result.txt)"
    return data


def eurosat_split_indices(data: ClassificationData, entries: Sequence[tuple[str, int | str]],
                          *, source: str = "split file", allow_missing: bool = False) -> list[int]:
    """Indices into ``data`` (a :func:`read_eurosat` result) of split-file ``entries``.

    Args:
        data: the EuroSAT data set.
        entries: ``(relative path, label)`` pairs, e.g. from :func:`read_split_file`. A path
            names a file ``<Class>/<file>.tif`` below the data set folder; leading folders
            that are not part of it are ignored (the official lists start with ``tif/``, the
            folder of the EuroSAT-MS archive that holds the class folders). The longest
            matching tail wins.
        source: what to call the entries in error messages (the file name).
        allow_missing: skip entries whose file is not in the data set instead of failing
            (for a partial copy of EuroSAT; the official lists name 21,600 of 27,000 files).

    Returns:
        Sorted, distinct sample indices, ``[n]`` ints in ``0 .. len(data.ids) - 1``.

    Raises:
        DatasetFormatError: an unsafe path, a path that leads outside the data set through a
            link, a file not in the data set (unless ``allow_missing``), or a label that
            contradicts the file's class folder. An integer label is read in the official
            order :data:`EUROSAT_CLASSES` when the data set's classes are EuroSAT classes,
            else as an index into ``data.class_names``; a text label must equal the class
            folder name.
    """
    if data.root is None or len(data.files) != len(data.ids):
        raise DatasetFormatError("eurosat_split_indices needs a data set from read_eurosat")
    where = {rel: i for i, rel in enumerate(data.files)}
    order = EUROSAT_CLASSES if set(data.class_names) <= set(EUROSAT_CLASSES) \
        else tuple(data.class_names)
    found: set[int] = set()
    missing: list[str] = []
    for n, (rel, label) in enumerate(entries, 1):
        try:
            parts = safe_relpath(rel, f"{source} entry {n}").split("/")
        except UnsafeName as exc:
            raise DatasetFormatError(str(exc)) from None
        tail = next(("/".join(parts[k:]) for k in range(len(parts))
                     if "/".join(parts[k:]) in where), None)
        if tail is None:
            missing.append(rel)
            continue
        try:  # a class folder or file that is a link out of the data set is refused
            confined(data.root, tail, f"{source} entry {n}")
        except UnsafeName as exc:
            raise DatasetFormatError(str(exc)) from None
        i = where[tail]
        folder = data.class_names[int(data.targets[i])]
        if isinstance(label, int):
            expected = order[label] if 0 <= label < len(order) else None
        else:
            expected = label
        if expected != folder:
            raise DatasetFormatError(f"{source} entry {n} ('{rel}'): label {label!r} means "
                                     f"{expected!r} but the file is in class folder {folder!r}")
        found.add(i)
    if missing and not allow_missing:
        raise DatasetFormatError(f"{source}: {len(missing)} of {len(entries)} entries name "
                                 f"files not in '{data.root}' (first: '{missing[0]}'); the "
                                 f"data set folder must hold the <Class>/ folders")
    return sorted(found)


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


# --------------------------------------------------------------------------- SegMunich


@cache
def segmunich_labels() -> dict[str, Any]:
    """Classes, official label remapping, ignore value and assumed band order
    (``segmunich_labels.yaml``, with sources)."""
    return dict(yaml.safe_load(SEGMUNICH_FILE.read_text()))


#: The assumed stored order of SegMunich's 10 bands (``segmunich_labels.yaml``: from a
#: third-party loader, not from the official code; unverified).
SEGMUNICH_BANDS: tuple[str, ...] = tuple(segmunich_labels()["bands"])

MissingBands = Literal["official", "official_positional", "error"]


def segmunich_remap(raw: NDArray[Any]) -> NDArray[np.int64]:
    """Official SegMunich label remapping of a raw ``[H, W]`` label image.

    The assignments of ``TUM_128.py`` L77-85 (21->1, 22->2, 23->3, 31->4, 32->6, 33->7,
    41->8, 13->9, 14->10), applied to the raw values (the official in-place sequence gives
    the same result: no target is a later source); other values in 0..12 stay as they are;
    anything else (incl. 255) becomes the ignore value 255, which the official evaluation
    also skips (``distributed_utils.py`` L85 counts ground truth in 0..12 only).

    Returns:
        ``[H, W]`` int64 in 0..12 or 255.
    """
    table = segmunich_labels()
    m = np.asarray(raw).astype(np.int64)
    out = m.copy()
    for src, dst in table["remap"].items():
        out[m == int(src)] = int(dst)
    out[(out < 0) | (out >= table["num_classes"])] = table["ignore_index"]
    return out


def _segmunich_names(root: Path, split: str) -> list[str]:
    """Names listed in ``dataset/<split>.txt`` (one per line, as ``TUM_128.py`` L38-41), else
    the ``<split>/img/*.tif`` stems; each must be a plain file name (they become paths)."""
    listing = root / "dataset" / f"{split}.txt"
    if not listing.is_file():
        return sorted(f.stem for f in (root / split / "img").glob("*.tif"))
    names = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            names.append(safe_name(line.strip(), "SegMunich sample name"))
        except UnsafeName as exc:
            raise DatasetFormatError(f"{listing}:{number}: {exc}") from None
    return names


def read_segmunich(root: str | Path, missing_bands: MissingBands = "official",
                   labels: Literal["official", "raw"] = "official") -> SegmentationData:
    """SegMunich as the official SpectralGPT code reads it (``downstream_tasks/SegMunich/``).

    Layout (``TUM_128.py`` L33-45): ``<root>/train/img/<name>.tif`` (10-band 128x128
    GeoTIFF), ``<root>/train/label/<name>.tif`` (one band of raw label values), likewise
    ``test/``, and ``<root>/dataset/train.txt`` / ``test.txt`` with one name per line (without
    ``.tif``). Sample ids are ``train/<name>`` and ``test/<name>`` (a name may occur in both
    folders); ``split_files`` holds the official train/test split (the official code trains
    on ``train.txt`` and reports ``test.txt``, ``train_multi_GPU_new.py`` L75-76).

    Bands are matched by name: GeoTIFF band descriptions when all are band names, else a
    ``bands`` list in ``<root>/metadata.json``, else the assumed order
    :data:`SEGMUNICH_BANDS` (unverified; ``info["band_source"]`` says which was used).

    Args:
        root: the unpacked archive folder (``TUM_128``).
        missing_bands: what to do about the model bands SegMunich lacks (B08 and B09 under the
            assumed order). The official code appends the per-pixel mean of all stored bands
            twice after the 10 stored ones (``TUM_128.py`` L93-96, also
            ``downstream_predict/SegMunich/predict.py`` L58-61), i.e. the mean sits in input
            channels 10 and 11, whatever bands those are in the pretraining order.

            * ``"official"``: the same filler (per-pixel mean of all stored bands, DN), put in
              the slots of the missing bands by name; the stored bands go to their own slots.
            * ``"official_positional"``: the official tensor itself, ignoring band names: the
              10 stored bands in file order, then the mean twice. Use it to reproduce the
              published numbers; it mis-aligns bands against the pretraining order.
            * ``"error"``: raise :class:`MissingBandsError` naming the missing bands.
        labels: ``"official"`` applies :func:`segmunich_remap`; ``"raw"`` returns the stored
            values untouched (no class names then beyond the 13 official ones).

    Returns:
        :class:`SegmentationData` with images ``[12, H, W]`` float32 DN and masks ``[H, W]``
        int64 in 0..12 or 255 (ignore); 13 classes, background 0 (the official mIoU
        includes it).
    """
    base = _require_dir(root, "SegMunich train/ and test/ folders")
    if missing_bands not in ("official", "official_positional", "error"):
        raise DatasetFormatError(f"missing_bands must be 'official', 'official_positional' or "
                                 f"'error', got {missing_bands!r}")
    if labels not in ("official", "raw"):
        raise DatasetFormatError(f"labels must be 'official' or 'raw', got {labels!r}")
    table = segmunich_labels()
    ids: list[str] = []
    images: list[Path] = []
    masks: list[Path] = []
    split_files: dict[str, list[str]] = {}
    for split in ("train", "test"):
        if not (base / split / "img").is_dir():
            continue
        names = _segmunich_names(base, split)
        for name in names:
            img, lab = base / split / "img" / f"{name}.tif", base / split / "label" / f"{name}.tif"
            for f in (img, lab):
                if not f.is_file():
                    raise DatasetFormatError(f"SegMunich {split} sample '{name}': '{f}' not found")
            ids.append(f"{split}/{name}")
            images.append(img)
            masks.append(lab)
        split_files[split] = [f"{split}/{n}" for n in names]
    if not ids:
        raise DatasetFormatError(f"'{base}' has no SegMunich samples (layout: train/img/<name>"
                                 f".tif, train/label/<name>.tif, dataset/train.txt; same for "
                                 f"test)")
    meta_path = base / "metadata.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    sidecar = [band_name(b) or b for b in meta.get("bands", [])]
    band_source: dict[str, str] = {}

    def load_image(i: int) -> Array:
        data, descriptions = _read(images[i])
        names = _names_from_descriptions(descriptions)
        if names is not None:
            band_source.setdefault("bands", "GeoTIFF band descriptions")
        elif sidecar:
            names = sidecar
            band_source.setdefault("bands", "metadata.json")
        else:
            names = list(SEGMUNICH_BANDS)
            band_source.setdefault("bands", "assumed SegMunich order " + " ".join(names) +
                                   " (third-party loader; unverified)")
        if len(names) != data.shape[0]:
            raise DatasetFormatError(f"'{images[i]}' has {data.shape[0]} bands but "
                                     f"{len(names)} band names ({' '.join(names)})")
        if missing_bands == "error":
            return to_model_order(data, names, str(images[i]))
        # The official filler: np.mean over all stored channels, float32 (TUM_128.py L93).
        mean = data.astype(np.float32).mean(0)
        n_model = len(model_bands())
        if missing_bands == "official_positional":
            if data.shape[0] + 2 != n_model:
                raise DatasetFormatError(f"'{images[i]}' has {data.shape[0]} bands; the official "
                                         f"SegMunich input (stored bands + 2 x mean) needs "
                                         f"{n_model - 2}")
            band_source.setdefault("layout", "official positional: stored bands in file "
                                   "order, then the per-pixel mean twice")
            return np.concatenate([data.astype(np.float32), mean[None], mean[None]])
        absent = [b for b in model_bands() if b not in names]
        if absent:
            band_source.setdefault("filled_with_pixel_mean", " ".join(absent))
        return to_model_order(np.concatenate([data.astype(np.float32),
                                              np.repeat(mean[None], len(absent), 0)]),
                              [*names, *absent], str(images[i]))

    def load_mask(i: int) -> NDArray[np.int64]:
        raw = _read_mask(masks[i])
        return segmunich_remap(raw) if labels == "official" else raw

    return SegmentationData(
        ids=ids, load_image=load_image, load_mask=load_mask,
        class_names=list(table["classes"]), ignore_index=int(table["ignore_index"]),
        background=int(table["background"]), split_files=split_files,
        info={"format": "SegMunich (TUM_128)", "band_source": band_source,
              "missing_bands": missing_bands,
              "labels": "official remapping (TUM_128.py L77-85), values outside 0..12 "
                        "ignored" if labels == "official" else "raw values"})


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
