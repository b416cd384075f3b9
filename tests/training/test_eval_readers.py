"""Readers map bands by name and read labels as published (training/evaluation/readers.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from tests.helpers.eval_fixtures import (EUROSAT_ORDER, MODEL_ORDER, write_eurosat, write_oscd,
                                         write_segmentation)
from tests.helpers.paths import BIGEARTHNET
from training.evaluation import readers
from training.evaluation.errors import DatasetFormatError, MissingBandsError


def _band(path: Path, index: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(index)


def test_model_band_order_comes_from_the_catalog() -> None:
    assert readers.model_bands() == MODEL_ORDER


# --------------------------------------------------------------------------- BigEarthNet


def test_bigearthnet_labels_match_metadata_files() -> None:
    data = readers.read_bigearthnet(BIGEARTHNET, label_set=43)
    assert len(data.ids) == 11
    for i, patch in enumerate(data.ids):
        meta = json.loads((BIGEARTHNET / patch / f"{patch}_labels_metadata.json").read_text())
        got = {data.class_names[c] for c in np.flatnonzero(data.targets[i])}
        assert got == set(meta["labels"])


def test_bigearthnet_19_class_mapping() -> None:
    table = readers.bigearthnet_labels()
    assert len(table["labels_43"]) == 43 and len(table["labels_19"]) == 19
    assert sum(v is None for v in table["old2new"].values()) == 11
    # Spot checks against label_indices.json (label_conversion rows).
    assert table["old2new"]["Peatbogs"] == "Inland wetlands"
    assert table["old2new"]["Transitional woodland/shrub"] == "Transitional woodland, shrub"
    assert table["old2new"]["Annual crops associated with permanent crops"] == "Permanent crops"
    assert table["old2new"]["Sparsely vegetated areas"] == \
        "Natural grassland and sparsely vegetated areas"
    data = readers.read_bigearthnet(BIGEARTHNET, label_set=19)
    for i, patch in enumerate(data.ids):
        meta = json.loads((BIGEARTHNET / patch / f"{patch}_labels_metadata.json").read_text())
        expected = {table["old2new"][x] for x in meta["labels"]} - {None}
        assert {data.class_names[c] for c in np.flatnonzero(data.targets[i])} == expected
    first = data.ids.index("S2A_MSIL2A_20170617T113321_36_85")
    assert {data.class_names[c] for c in np.flatnonzero(data.targets[first])} == \
        {"Arable land", "Pastures"}


def test_bigearthnet_bands_by_name_and_resampled_to_10m() -> None:
    data = readers.read_bigearthnet(BIGEARTHNET)
    patch = data.ids[0]
    img = data.load(0)
    assert img.shape == (12, 120, 120) and img.dtype == np.float32
    for b in ("B02", "B08"):  # 10 m: unchanged
        assert np.array_equal(img[MODEL_ORDER.index(b)], _band(BIGEARTHNET / patch /
                                                               f"{patch}_{b}.tif"))
    for b, side in (("B8A", 60), ("B01", 20), ("B12", 60)):
        raw = _band(BIGEARTHNET / patch / f"{patch}_{b}.tif").astype(np.float32)
        assert raw.shape == (side, side)
        up = F.interpolate(torch.from_numpy(raw)[None, None], size=(120, 120),
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(img[MODEL_ORDER.index(b)], up, rtol=1e-6)
    # B8A and B08 really are different bands in these patches.
    assert not np.allclose(img[MODEL_ORDER.index("B8A")], img[MODEL_ORDER.index("B08")])


def test_bigearthnet_missing_band_is_named(tmp_path: Path) -> None:
    patch = sorted(p.name for p in BIGEARTHNET.iterdir() if p.is_dir())[0]
    shutil.copytree(BIGEARTHNET / patch, tmp_path / patch)
    (tmp_path / patch / f"{patch}_B8A.tif").unlink()
    data = readers.read_bigearthnet(tmp_path)
    with pytest.raises(MissingBandsError, match="B8A"):
        data.load(0)


# --------------------------------------------------------------------------- EuroSAT


def test_eurosat_maps_b8a_by_name(tmp_path: Path) -> None:
    write_eurosat(tmp_path, classes=("Forest", "River"), per_class=2)
    data = readers.read_eurosat(tmp_path)
    assert data.class_names == ["Forest", "River"] and data.targets.tolist() == [0, 0, 1, 1]
    path = tmp_path / "Forest" / "Forest_1.tif"
    with rasterio.open(path) as src:
        raw = src.read()
    assert raw.shape[0] == 13
    img = data.load(0)
    for b in MODEL_ORDER:  # every model channel is the file band of the same name
        assert np.array_equal(img[MODEL_ORDER.index(b)], raw[EUROSAT_ORDER.index(b)])
    assert np.array_equal(img[8], raw[12])  # B8A: model index 8, stored last
    assert not np.array_equal(img[8], raw[8])  # not the file's 9th band (B09)
    assert "official EuroSAT-MS order" in data.info["band_source"]["bands"]


def test_eurosat_band_descriptions_win(tmp_path: Path) -> None:
    write_eurosat(tmp_path, classes=("Forest",), per_class=1)
    path = tmp_path / "Forest" / "Forest_1.tif"
    shuffled = list(EUROSAT_ORDER)[::-1]
    with rasterio.open(path, "r+") as dst:
        raw = dst.read()
        for i, name in enumerate(shuffled, 1):  # claim the bands are stored reversed
            dst.set_band_description(i, name)
    img = readers.read_eurosat(tmp_path).load(0)
    assert np.array_equal(img[MODEL_ORDER.index("B01")], raw[12])
    assert np.array_equal(img[MODEL_ORDER.index("B8A")], raw[0])


def test_eurosat_bad_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="class folders"):
        readers.read_eurosat(tmp_path)


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("sidecar", [True, False])
def test_segmentation_bands_by_name(tmp_path: Path, sidecar: bool) -> None:
    write_segmentation(tmp_path, n=2, size=24, sidecar=sidecar)
    data = readers.read_segmentation(tmp_path)
    with rasterio.open(tmp_path / "images" / "tile_0.tif") as src:
        raw = src.read()  # stored in reverse model order
    img = data.load_image(0)
    assert np.array_equal(img[0], raw[11]) and np.array_equal(img[11], raw[0])
    mask = data.load_mask(0)
    assert mask.shape == (24, 24) and mask[0, 0] == 255 and data.ignore_index == 255
    assert len(data.class_names) == 3


def test_segmentation_missing_bands_and_fill(tmp_path: Path) -> None:
    write_segmentation(tmp_path, n=1, size=16)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    with rasterio.open(tmp_path / "images" / "tile_0.tif") as src:
        raw, profile = src.read(), src.profile
    keep = [i for i, b in enumerate(meta["bands"]) if b not in ("B01", "B09")]  # 10 bands
    profile.update(count=len(keep))
    with rasterio.open(tmp_path / "images" / "tile_0.tif", "w", **profile) as dst:
        dst.write(raw[keep])
    meta["bands"] = [meta["bands"][i] for i in keep]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MissingBandsError, match="B01, B09"):
        readers.read_segmentation(tmp_path).load_image(0)
    meta["fill_missing"] = "mean"  # the official SegMunich choice
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    img = readers.read_segmentation(tmp_path).load_image(0)
    np.testing.assert_allclose(img[0], raw[keep].astype(np.float32).mean(0), rtol=1e-6)


# --------------------------------------------------------------------------- OSCD


def test_oscd_official_layout(tmp_path: Path) -> None:
    write_oscd(tmp_path, size=24)
    data = readers.read_oscd(tmp_path)
    assert data.ids == ["abudhabi", "beirut", "cupertino", "lasvegas"]
    assert data.split_files == {"train": ["abudhabi", "beirut", "cupertino"],
                                "test": ["lasvegas"]}
    a, b = data.load_pair(0)
    images = tmp_path / readers.OSCD_IMAGES / "abudhabi"
    assert a.shape == b.shape == (12, 24, 24)
    assert np.array_equal(a[MODEL_ORDER.index("B8A")], _band(images / "imgs_1_rect" / "B8A.tif"))
    assert np.array_equal(b[MODEL_ORDER.index("B11")], _band(images / "imgs_2_rect" / "B11.tif"))
    png = _band(tmp_path / "Onera Satellite Change Detection dataset - Train Labels" /
                "abudhabi" / "cm" / "cm.png")
    assert set(np.unique(png)) == {0, 255}
    assert np.array_equal(data.load_mask(0), (png > 0).astype(np.int64))
    tif = _band(tmp_path / "Onera Satellite Change Detection dataset - Test Labels" /
                "lasvegas" / "cm" / "lasvegas-cm.tif")
    assert set(np.unique(tif)) == {1, 2}
    assert np.array_equal(data.load_mask(3), (tif == 2).astype(np.int64))


def test_oscd_missing_band(tmp_path: Path) -> None:
    write_oscd(tmp_path, size=16, cities=("a", "b"), test=("b",))
    (tmp_path / readers.OSCD_IMAGES / "a" / "imgs_2_rect" / "B05.tif").unlink()
    with pytest.raises(MissingBandsError, match="B05"):
        readers.read_oscd(tmp_path).load_pair(0)


def test_name_lists(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("S2A_x_1_2,S1A_y\nS2B_z_3_4,S1B_w\n")
    (tmp_path / "b.txt").write_text("aguasclaras,bercy,bordeaux\n")
    (tmp_path / "c.txt").write_text("Forest/Forest_1.tif\nRiver_2.jpg\n")
    assert readers.read_name_list(tmp_path / "a.csv") == ["S2A_x_1_2", "S2B_z_3_4"]
    assert readers.read_name_list(tmp_path / "b.txt") == ["aguasclaras", "bercy", "bordeaux"]
    assert readers.read_name_list(tmp_path / "c.txt") == ["Forest_1", "River_2"]
