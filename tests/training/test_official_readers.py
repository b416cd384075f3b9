"""Official SpectralGPT downstream formats and protocols (issue 17).

* EuroSAT split files ``path<spaces>label`` (``txt_file/*_euro_result.txt``), paths confined;
* the official OSCD crop score (128 px crops, stride 63, batch 32, ``drop_last``);
* the SegMunich reader (``TUM_128`` layout, official label remap, official band filling);
* the BigEarthNet 10 % subset generator (deterministic, order independent, stratified).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.eval_fixtures import MODEL_ORDER, _write_tif, write_eurosat
from tests.helpers.paths import BIGEARTHNET
from training.evaluation import metrics, readers, subsets
from training.evaluation.errors import DatasetFormatError, EvaluationError, MissingBandsError
from training.evaluation.tasks import make_split

# --------------------------------------------------------------------------- EuroSAT split files

# Lines in the format of the official lists (verified in danfenghong/IEEE_TPAMI_SpectralGPT
# txt_file/train_euro_result.txt: "tif/<Class>/<Class>_<n>.tif", four spaces, label 0..9).
OFFICIAL_LINES = ["tif/AnnualCrop/AnnualCrop_1.tif    0", "tif/River/River_2.tif    8",
                  "tif/Forest/Forest_3.tif    1"]


@pytest.fixture()
def eurosat(tmp_path: Path) -> Path:
    return write_eurosat(tmp_path / "tif", classes=("AnnualCrop", "Forest", "River"),
                         per_class=4, size=16)


def test_read_split_file_official_format(tmp_path: Path) -> None:
    f = tmp_path / "val_euro_result.txt"
    f.write_text("\r\n".join(OFFICIAL_LINES[:2]) + "\r\n\n  tif/Forest/Forest_3.tif\tForest  \n")
    assert readers.read_split_file(f) == [("tif/AnnualCrop/AnnualCrop_1.tif", 0),
                                          ("tif/River/River_2.tif", 8),
                                          ("tif/Forest/Forest_3.tif", "Forest")]
    # The name-list reader used by --split-file takes the file names from such lines too.
    assert readers.read_name_list(f) == ["AnnualCrop_1", "River_2", "Forest_3"]


@pytest.mark.parametrize("line, what", [
    ("tif/AnnualCrop/AnnualCrop_1.tif", "1 field"),
    ("tif/AnnualCrop/AnnualCrop 1.tif 0", "3 field"),
    ("../AnnualCrop/AnnualCrop_1.tif 0", "not a relative path"),
    ("/data/tif/AnnualCrop/AnnualCrop_1.tif 0", "not a relative path"),
    ("tif\\AnnualCrop\\AnnualCrop_1.tif 0", "not a relative path"),
    ("tif/../../etc/passwd 0", "not a relative path"),
])
def test_read_split_file_names_the_bad_line(tmp_path: Path, line: str, what: str) -> None:
    f = tmp_path / "split.txt"
    f.write_text(f"{OFFICIAL_LINES[0]}\n\n{line}\n")
    with pytest.raises(DatasetFormatError, match=rf"split.txt:3: .*{what}"):
        readers.read_split_file(f)


def test_read_split_file_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="not found"):
        readers.read_split_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DatasetFormatError, match="no entries"):
        readers.read_split_file(tmp_path / "empty.txt")


def test_eurosat_split_indices_maps_official_paths(eurosat: Path) -> None:
    data = readers.read_eurosat(eurosat)
    entries = [("tif/AnnualCrop/AnnualCrop_1.tif", 0), ("tif/River/River_2.tif", 8),
               ("Forest/Forest_3.tif", "Forest"), ("tif/River/River_2.tif", 8)]
    got = readers.eurosat_split_indices(data, entries)
    assert [data.ids[i] for i in got] == ["AnnualCrop_1", "Forest_3", "River_2"]
    # Official label indices follow the 10 official classes, not this partial data set's
    # 3 folders (River is 8 officially, 2 here).
    assert data.class_names[int(data.targets[got[2]])] == "River"


def test_eurosat_split_indices_refuses_wrong_labels_and_missing_files(eurosat: Path) -> None:
    data = readers.read_eurosat(eurosat)
    with pytest.raises(DatasetFormatError, match=r"entry 2 .*label 0 means 'AnnualCrop'.*'Forest'"):
        readers.eurosat_split_indices(data, [("tif/Forest/Forest_1.tif", 1),
                                             ("tif/Forest/Forest_2.tif", 0)], source="x.txt")
    with pytest.raises(DatasetFormatError, match="label 10 means None"):
        readers.eurosat_split_indices(data, [("tif/Forest/Forest_1.tif", 10)])
    missing = [("tif/Forest/Forest_1.tif", 1), ("tif/SeaLake/SeaLake_1.tif", 9)]
    with pytest.raises(DatasetFormatError, match="1 of 2 entries .*SeaLake_1"):
        readers.eurosat_split_indices(data, missing)
    assert len(readers.eurosat_split_indices(data, missing, allow_missing=True)) == 1
    with pytest.raises(DatasetFormatError, match="not a relative path"):
        readers.eurosat_split_indices(data, [("../tif/Forest/Forest_1.tif", 1)])


def test_eurosat_split_indices_refuses_links_out_of_the_data_set(tmp_path: Path,
                                                                  eurosat: Path) -> None:
    outside = write_eurosat(tmp_path / "elsewhere", classes=("Pasture",), per_class=1, size=16)
    os.symlink(outside / "Pasture", eurosat / "Pasture")
    data = readers.read_eurosat(eurosat)
    assert "Pasture/Pasture_1.tif" in data.files
    with pytest.raises(DatasetFormatError, match="leads outside"):
        readers.eurosat_split_indices(data, [("tif/Pasture/Pasture_1.tif", 5)])


def test_read_eurosat_uses_official_lists_in_the_folder(eurosat: Path) -> None:
    (eurosat / "train_euro_result.txt").write_text(
        "\n".join(f"tif/{c}/{c}_{n}.tif    {k}" for c, k in (("AnnualCrop", 0), ("Forest", 1))
                  for n in (1, 2)) + "\n")
    (eurosat / "val_euro_result.txt").write_text("\n".join(OFFICIAL_LINES) + "\n")
    data = readers.read_eurosat(eurosat)
    assert data.split_files["test"] == ["AnnualCrop_1", "Forest_3", "River_2"]
    assert data.split_files["train"] == ["AnnualCrop_1", "AnnualCrop_2", "Forest_1", "Forest_2"]
    assert "official" in data.info["split"] and "root" not in data.info
    train, test, record = make_split(data.ids, data.split_files, seed=0)
    assert [data.ids[i] for i in test] == ["AnnualCrop_1", "Forest_3", "River_2"]
    # A sample in both lists is a test sample only (make_split's rule).
    assert [data.ids[i] for i in train] == ["AnnualCrop_2", "Forest_1", "Forest_2"]
    (eurosat / "val_euro_result.txt").write_text("tif/Forest/Forest_3.tif    3\n")
    with pytest.raises(DatasetFormatError, match="val_euro_result.txt entry 1"):
        readers.read_eurosat(eurosat)


# --------------------------------------------------------------------------- OSCD crop score


def test_oscd_crop_corners_as_the_official_dataset_builds_them() -> None:
    # n = ceil((side - 128 + 1) / 63) crops per axis at 0, 63, ...; all fully inside.
    assert metrics.oscd_crop_corners(200, 200) == [(0, 0), (0, 63), (63, 0), (63, 63)]
    assert metrics.oscd_crop_corners(190, 254) == [(0, 0), (0, 63), (0, 126)]
    assert metrics.oscd_crop_corners(191, 128) == [(0, 0), (63, 0)]
    assert metrics.oscd_crop_corners(127, 500) == []
    for h in range(128, 400, 7):
        last = max(r for r, _ in metrics.oscd_crop_corners(h, 128))
        assert last + 128 <= h  # fully inside
        assert h - (last + 128) < 63  # the strip no crop reaches is narrower than the stride


def _hand_example() -> tuple[np.ndarray, np.ndarray]:
    """200 x 200; crops at rows/cols {0, 63}: rows 0-62 in 1 crop row, 63-127 in 2, 128-190
    in 1, 191-199 in none (same for columns)."""
    mask = np.zeros((200, 200), np.uint8)
    pred = np.zeros((200, 200), np.uint8)
    mask[10, 10] = pred[10, 10] = 1      # TP, in crop (0, 0) only            -> 1
    mask[100, 100] = pred[100, 100] = 1  # TP, in all 4 crops                 -> 4
    pred[100, 10] = 1                    # FP, rows 2 crops x cols 1          -> 2
    mask[195, 195] = 1                   # FN, in no crop                     -> 0
    mask[150, 100] = 1                   # FN, rows 1 (crop row 63) x cols 2  -> 2
    return mask, pred


def test_official_crop_score_hand_computed() -> None:
    mask, pred = _hand_example()
    got = metrics.official_crop_change_scores([mask], [pred], drop_last=False)
    assert (got["tp"], got["fp"], got["fn"]) == (5, 2, 2)
    assert got["tn"] == 4 * 128 * 128 - 9
    assert got["precision"] == pytest.approx(5 / 7) and got["recall"] == pytest.approx(5 / 7)
    assert got["f1"] == pytest.approx(5 / 7)
    assert (got["crops"], got["crops_dropped"]) == (4, 0)
    # Official loader: batch 32 with drop_last drops all 4 crops (one incomplete batch).
    none = metrics.official_crop_change_scores([mask], [pred])
    assert (none["tp"], none["fp"], none["fn"], none["crops_dropped"]) == (0, 0, 0, 4)
    # Batch 3: crop (63, 63), the 4th, is dropped.
    b3 = metrics.official_crop_change_scores([mask], [pred], batch_size=3)
    assert (b3["tp"], b3["fp"], b3["fn"], b3["tn"]) == (1 + 3, 2, 1, 3 * 128 * 128 - 7)
    # Beside it, the full-image score counts every pixel once.
    both = metrics.oscd_change_scores([mask], [pred], drop_last=False)
    assert (both["full_image"]["tp"], both["full_image"]["fp"],
            both["full_image"]["fn"], both["full_image"]["tn"]) == (2, 1, 2, 200 * 200 - 5)
    assert both["official_crops"]["f1"] == pytest.approx(5 / 7)


def test_official_crop_score_drops_the_tail_of_the_last_image() -> None:
    mask, pred = _hand_example()
    small = np.ones((128, 191), np.uint8)  # 1 x 2 crops, all change, all predicted
    # Images in test.txt order: 4 + 2 crops; batch 4 drops the 2 crops of the second image.
    got = metrics.official_crop_change_scores([mask, small], [pred, small], batch_size=4)
    assert (got["tp"], got["fp"], got["fn"], got["crops"]) == (5, 2, 2, 4)
    # Batch 5 keeps the first crop (0, 0) of the second image: 128 x 128 more TP.
    got = metrics.official_crop_change_scores([mask, small], [pred, small], batch_size=5)
    assert got["tp"] == 5 + 128 * 128 and got["crops_dropped"] == 1
    # Reversed order: the dropped crops are the hand example's last two.
    got = metrics.official_crop_change_scores([small, mask], [small, pred], batch_size=4)
    # small: 2 whole crops; hand example keeps (0, 0) and (0, 63): (10, 10) once,
    # (100, 100) twice, FP (100, 10) once, FN (150, 100) in neither.
    assert (got["tp"], got["fp"], got["fn"]) == (2 * 128 * 128 + 1 + 2, 1, 0)


def test_official_crop_score_per_crop_predictions() -> None:
    mask, pred = _hand_example()
    corners = metrics.oscd_crop_corners(200, 200)
    crops = np.stack([pred[r:r + 128, c:c + 128] for r, c in corners])
    full = metrics.official_crop_change_scores([mask], [pred], drop_last=False)
    cut = metrics.official_crop_change_scores([mask], [crops], drop_last=False)
    assert {k: full[k] for k in ("tp", "fp", "fn", "tn")} == \
        {k: cut[k] for k in ("tp", "fp", "fn", "tn")}
    crops[3, 100 - 63, 100 - 63] = 0  # the 4th crop misses (100, 100): one TP becomes FN
    cut = metrics.official_crop_change_scores([mask], [crops], drop_last=False)
    assert (cut["tp"], cut["fn"]) == (4, 3)
    with pytest.raises(ValueError, match="one map per crop"):
        metrics.official_crop_change_scores([mask], [crops[:3]])


def test_official_crop_score_random_matches_crop_by_crop() -> None:
    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < 0.2 for h, w in ((300, 257), (140, 400))]
    preds = [rng.random(m.shape) < 0.3 for m in masks]
    got = metrics.official_crop_change_scores(masks, preds, batch_size=7)
    flat = [(k, r, c) for k, m in enumerate(masks)
            for r, c in metrics.oscd_crop_corners(*m.shape)]
    flat = flat[:len(flat) - len(flat) % 7]
    tp = sum(int((masks[k][r:r + 128, c:c + 128] & preds[k][r:r + 128, c:c + 128]).sum())
             for k, r, c in flat)
    fp = sum(int((~masks[k][r:r + 128, c:c + 128] & preds[k][r:r + 128, c:c + 128]).sum())
             for k, r, c in flat)
    assert (got["tp"], got["fp"], got["crops"]) == (tp, fp, len(flat))


# --------------------------------------------------------------------------- SegMunich


RAW_VALUES = np.array([0, 21, 22, 23, 31, 32, 33, 41, 13, 14, 5, 11, 12, 255, 50, 3],
                      np.uint8)


def _write_segmunich(root: Path, descriptions: list[str] | None = None) -> dict[str, np.ndarray]:
    """The official TUM_128 layout: {train,test}/img/<name>.tif (10 bands, 128 x 128 in the
    real data; 16 x 16 here), {train,test}/label/<name>.tif (uint8), dataset/{train,test}.txt."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, names in (("train", ["0", "1", "7"]), ("test", ["0", "2"])):
        for name in names:
            img = rng.integers(100, 5000, (10, 16, 16)).astype(np.uint16)
            label = rng.choice(RAW_VALUES, (16, 16)).astype(np.uint8)
            _write_tif(root / split / "img" / f"{name}.tif", img, descriptions=descriptions)
            _write_tif(root / split / "label" / f"{name}.tif", label)
            arrays[f"{split}/{name}"] = img
        (root / "dataset").mkdir(parents=True, exist_ok=True)
        # Only listed names are samples (7 is not listed in train.txt).
        listed = [n for n in names if n != "7"]
        (root / "dataset" / f"{split}.txt").write_text("\n".join(listed) + "\n\n")
    return arrays


def _official_sequence(target: np.ndarray) -> np.ndarray:
    """The official remapping statements (TUM_128.py L77-85), one after the other in place."""
    t = target.copy()
    for src, dst in ((21, 1), (22, 2), (23, 3), (31, 4), (32, 6), (33, 7), (41, 8), (13, 9),
                     (14, 10)):
        t[t == src] = dst
    return t


def test_segmunich_layout_split_and_labels(tmp_path: Path) -> None:
    _write_segmunich(tmp_path)
    data = readers.read_segmunich(tmp_path)
    assert data.ids == ["train/0", "train/1", "test/0", "test/2"]
    assert data.split_files == {"train": ["train/0", "train/1"], "test": ["test/0", "test/2"]}
    assert len(data.class_names) == 13 and data.class_names[0] == "Background"
    assert (data.ignore_index, data.background) == (255, 0)
    for i, sample in enumerate(data.ids):
        path = tmp_path / sample.split("/")[0] / "label" / f"{sample.split('/')[1]}.tif"
        # As the official loader reads it: PIL, convert("P"), then the remap statements.
        official = _official_sequence(np.array(Image.open(path).convert("P")))
        mask = data.load_mask(i)
        assert mask.dtype == np.int64
        counted = official < 13  # the official confusion matrix counts gt 0..12 only
        assert np.array_equal(mask[counted], official[counted])
        assert (mask[~counted] == 255).all()
        assert set(np.unique(mask)) <= set(range(13)) | {255}
    every = np.arange(256)
    assert np.array_equal(readers.segmunich_remap(every)[every != 255][:13],
                          _official_sequence(every)[:13])
    raw = readers.read_segmunich(tmp_path, labels="raw")
    assert 21 in np.unique(raw.load_mask(0)) or 21 in np.unique(raw.load_mask(1))
    train, test, _ = make_split(data.ids, data.split_files, seed=0)
    assert (train, test) == ([0, 1], [2, 3])


def test_segmunich_official_band_handling(tmp_path: Path) -> None:
    arrays = _write_segmunich(tmp_path)
    stored = list(readers.SEGMUNICH_BANDS)
    img = arrays["train/0"].astype(np.float32)
    mean = img.mean(0)

    by_name = readers.read_segmunich(tmp_path).load_image(0)
    assert by_name.shape == (12, 16, 16) and by_name.dtype == np.float32
    for k, band in enumerate(MODEL_ORDER):
        want = img[stored.index(band)] if band in stored else mean
        assert np.allclose(by_name[k], want), band
    data = readers.read_segmunich(tmp_path)
    data.load_image(0)
    assert data.info["band_source"]["filled_with_pixel_mean"] == "B08 B09"
    assert "unverified" in data.info["band_source"]["bands"]

    # Exactly the official input tensor: stored order, then the mean twice (TUM_128.py L93-96).
    positional = readers.read_segmunich(tmp_path, missing_bands="official_positional")
    official = np.concatenate([np.moveaxis(img, 0, 2), mean[..., None], mean[..., None]], axis=2)
    assert np.allclose(positional.load_image(0), np.moveaxis(official, 2, 0))

    with pytest.raises(MissingBandsError, match="B08, B09"):
        readers.read_segmunich(tmp_path, missing_bands="error").load_image(0)
    with pytest.raises(DatasetFormatError, match="missing_bands"):
        readers.read_segmunich(tmp_path, missing_bands="zeros")  # type: ignore[arg-type]


def test_segmunich_band_descriptions_take_precedence(tmp_path: Path) -> None:
    order = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    arrays = _write_segmunich(tmp_path, descriptions=order)
    data = readers.read_segmunich(tmp_path)
    x = data.load_image(0)
    img = arrays["train/0"].astype(np.float32)
    assert np.allclose(x[MODEL_ORDER.index("B08")], img[order.index("B08")])
    assert np.allclose(x[MODEL_ORDER.index("B01")], img.mean(0))
    assert data.info["band_source"] == {"bands": "GeoTIFF band descriptions",
                                        "filled_with_pixel_mean": "B01 B09"}


def test_segmunich_refuses_unsafe_names_and_missing_files(tmp_path: Path) -> None:
    _write_segmunich(tmp_path)
    (tmp_path / "dataset" / "test.txt").write_text("0\n../../etc/passwd\n")
    with pytest.raises(DatasetFormatError, match=r"test.txt:2: .*not a plain name"):
        readers.read_segmunich(tmp_path)
    (tmp_path / "dataset" / "test.txt").write_text("0\n9\n")
    with pytest.raises(DatasetFormatError, match="test sample '9'"):
        readers.read_segmunich(tmp_path)
    with pytest.raises(DatasetFormatError, match="no SegMunich samples"):
        readers.read_segmunich(tmp_path / "dataset")


# --------------------------------------------------------------------------- BigEarthNet subset


def _synthetic_bigearthnet(n: int = 20_000,
                           seed: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    """``n`` BigEarthNet-like names with multi-labels of very different frequencies (19 labels
    from ~60 % of patches down to ~0.4 %) and ~15 % of patches without a label."""
    rng = np.random.default_rng(seed)
    freq = 0.6 / (1 + np.arange(19)) ** 1.3
    freq[-1] = 0.004
    names = [f"S2A_MSIL2A_2017{k % 365:03d}T{k:06d}_{k % 97}_{k % 89}" for k in range(n)]
    labels = {name: [f"class {c:02d}" for c in range(19) if rng.random() < freq[c]]
              for name in names}
    return names, labels


def test_subset_is_deterministic_pinned_and_versioned() -> None:
    names = [f"patch_{k}" for k in range(100)]
    got = subsets.bigearthnet_subset(names)
    # Pinned: rule ben10-v1 must select these forever (a change needs a new version).
    assert got == ["patch_20", "patch_27", "patch_33", "patch_37", "patch_41", "patch_74",
                   "patch_8", "patch_83", "patch_89", "patch_96"]
    assert subsets.subset_key("patch_20") == hashlib.sha256(b"ben10-v1:patch_20").digest()
    with pytest.raises(EvaluationError, match="unknown subset rule"):
        subsets.bigearthnet_subset(names, version="ben10-v2")
    with pytest.raises(EvaluationError, match="fraction"):
        subsets.bigearthnet_subset(names, fraction=0)


def test_subset_order_independent_and_about_ten_percent_per_label() -> None:
    names, labels = _synthetic_bigearthnet()
    got = subsets.bigearthnet_subset(names, labels)
    shuffled = names[::-1] + names[:500]  # other order, duplicates
    random.Random(1).shuffle(shuffled)
    assert subsets.bigearthnet_subset(shuffled, dict(reversed(list(labels.items())))) == got
    assert got == sorted(got) and len(set(got)) == len(got)
    assert abs(len(got) - 2000) <= 5
    total = Counter(label for n in names for label in labels[n])
    chosen = Counter(label for n in got for label in labels[n])
    for label, count in total.items():
        assert abs(chosen[label] - max(1, round(0.1 * count))) <= 2, (label, count, chosen[label])
    unlabelled = [n for n in names if not labels[n]]
    assert abs(sum(n in set(got) for n in unlabelled) - 0.1 * len(unlabelled)) <= 0.1 * \
        len(unlabelled) * 0.1
    # A label with 3 patches keeps one (max(1, round(0.3)) = 1).
    rare = {**labels, names[0]: ["rare"], names[1]: ["rare"], names[2]: ["rare"]}
    assert sum("rare" in rare[n] for n in subsets.bigearthnet_subset(names, rare)) == 1
    # Without labels: exactly round(0.1 N), also order independent.
    plain = subsets.bigearthnet_subset(names)
    assert len(plain) == 2000 and subsets.bigearthnet_subset(shuffled) == plain


def test_subset_cli_writes_header_and_list(tmp_path: Path) -> None:
    names, labels = _synthetic_bigearthnet(n=500)
    (tmp_path / "train.csv").write_text("".join(f"{n},S1_{n}\n" for n in reversed(names)))
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    out = tmp_path / "sub.txt"
    assert subsets.main(["bigearthnet", "--names", str(tmp_path / "train.csv"),
                         "--labels", str(tmp_path / "labels.json"), "--out", str(out)]) == 0
    text = out.read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert "rule ben10-v1" in header[0] and header[1].startswith("# rule: key = sha256")
    assert "of 500 names" in header[2] and subsets.input_digest(names) in header[3]
    assert readers.read_name_list(out) == subsets.bigearthnet_subset(names, labels)
    assert subsets.main(["bigearthnet", "--names", str(tmp_path / "train.csv"), "--no-header",
                         "--out", str(out)]) == 0
    assert out.read_text().splitlines() == subsets.bigearthnet_subset(names)


def test_subset_cli_reads_bigearthnet_labels(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    patches = sorted(d.name for d in BIGEARTHNET.iterdir() if d.is_dir())
    (tmp_path / "names.txt").write_text("\n".join(patches) + "\n")
    out = tmp_path / "sub.txt"
    assert subsets.main(["bigearthnet", "--names", str(tmp_path / "names.txt"), "--data",
                         str(BIGEARTHNET), "--out", str(out)]) == 0
    assert "19-class labels" in out.read_text()
    assert 1 <= len(readers.read_name_list(out)) <= len(patches)
    (tmp_path / "bad.txt").write_text("../x\n")
    assert subsets.main(["bigearthnet", "--names", str(tmp_path / "bad.txt"), "--data",
                         str(BIGEARTHNET), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
