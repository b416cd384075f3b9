"""End to end on the embedded sample catalog: real patches, real STAC API on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import rioxarray  # noqa: F401
import xarray as xr

from pipeline.catalogs import sensor
from pipeline.contract import FORMAT_ID
from tests.helpers.paths import BIGEARTHNET
from tests.pipeline.conftest import read_dataset


def test_manifest_contract(sample_dataset: Path) -> None:
    man = json.loads((sample_dataset / "manifest.json").read_text())
    assert man["format"] == FORMAT_ID == "spectralgpt-shards/2"
    assert man["bands"] == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    assert man["scenes"]["found"] == 11 and man["scenes"]["used"] == 11
    assert set(man["datasets"]) == {"s96_g10m", "s128_g10m"}
    for name, size in (("s96_g10m", 96), ("s128_g10m", 128)):
        d = man["datasets"][name]
        assert d["shape"] == [12, size, size]
        total = sum(sp["num_samples"] for sp in d["splits"].values())
        # one chip per 120 px patch (128: resized 120 -> 128, as SpectralGPT did); a patch lying across
        # a boundary between a train block and a val block is dropped, never split
        straddling = d["dropped"].get("straddles a train/val block boundary", 0)
        assert total + straddling == 11 and total >= 8
        assert set(d["dropped"]) <= {"straddles a train/val block boundary"}
        assert d["splits"]["val"]["num_samples"] >= 1
        for sp in d["splits"].values():
            assert sp["num_samples"] == sum(s["num_samples"] for s in sp["shards"])
            for s in sp["shards"]:
                assert (sample_dataset / s["path"]).stat().st_size == s["bytes"]
        st = d["stats"]
        assert len(st["mean"]) == 12 and all(c > 0 for c in st["count"])
    assert len(man["config_hash"]) == 64
    assert not (sample_dataset / "_work").exists()


def test_known_pixel_is_its_reflectance(sample_dataset: Path) -> None:
    """A 96 px chip starts at the patch origin: its pixels are the source DN exactly."""
    samples = read_dataset(sample_dataset)
    patch = "S2A_MSIL2A_20170617T113321_36_85"
    ((key, s),) = [(k, s) for k, s in samples.items() if s["dataset"] == "s96_g10m" and s["json"]["scene_ids"] == [patch]]
    with rasterio.open(BIGEARTHNET / patch / f"{patch}_B04.tif") as r:
        b04 = r.read(1)
    chip = s["npy"]
    assert chip.dtype == np.uint16 and chip.shape == (12, 96, 96)
    i = sensor().band_names.index("B04")
    np.testing.assert_array_equal(chip[i], b04[:96, :96])
    # the value a user reads is the reflectance its DN says: baseline 02.05 -> no offset
    assert chip[i, 0, 0] * s["json"]["value_scale"] == b04[0, 0] / 10000
    meta = s["json"]
    assert meta["harmonisation"][0]["rule"] == "pb<04.00:none"
    assert meta["quality"]["scl"] is False and meta["quality"]["cloud"] is None
    assert meta["crs"] == "EPSG:32629" and meta["tile"] == "29UPU"
    assert meta["datetimes"] == ["2017-06-17T11:33:21Z"]
    assert meta["transform"][2] == 643200.0 and meta["transform"][5] == 5798040.0


def test_128_is_resized_and_recorded(sample_dataset: Path) -> None:
    samples = read_dataset(sample_dataset)
    big = [s for s in samples.values() if s["dataset"] == "s128_g10m"]
    small = [s for s in samples.values() if s["dataset"] == "s96_g10m"]
    assert len(big) == len(small) >= 8  # the same patches in both stage datasets
    assert all(s["json"]["small_scene_rule"] == "resize:120x120->128x128:bilinear" for s in big)
    assert all(s["npy"].shape == (12, 128, 128) and (s["npy"] > 0).all() for s in big)


def test_cube_is_georeferenced_zarr(sample_dataset: Path) -> None:
    cubes = sorted((sample_dataset / "cube" / "v0001").glob("*.zarr"))
    assert len(cubes) == 11  # every patch is its own grid
    ds = xr.open_zarr(cubes[0], consolidated=False)
    assert ds["dn"].dims == ("time", "band", "y", "x") and ds["dn"].dtype == np.uint16
    assert ds.rio.crs.to_epsg() == ds.attrs["epsg"]
    assert list(ds.rio.transform())[:6] == ds.attrs["grid_transform"]


def test_split_is_spatial_and_stats_from_train(sample_dataset: Path) -> None:
    samples = read_dataset(sample_dataset)
    by_scene: dict[str, set[str]] = {}
    for s in samples.values():
        by_scene.setdefault(s["json"]["scene_ids"][0], set()).add(s["split"])
    assert all(len(v) == 1 for v in by_scene.values())  # a location is in one split for every chip size
    man = json.loads((sample_dataset / "manifest.json").read_text())
    st = man["datasets"]["s96_g10m"]["stats"]
    train = np.stack([s["npy"] for s in samples.values() if s["dataset"] == "s96_g10m" and s["split"] == "train"])
    v = train[:, 3].ravel().astype(float)
    assert abs(st["mean"][3] - v[v > 0].mean()) < 1e-3
