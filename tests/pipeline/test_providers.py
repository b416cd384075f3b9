"""Provider conventions end to end, on catalogs made from REAL STAC items and REAL pixels:
Planetary Computer baseline 05.10 (offset in the data), Earth Search with the offset already
applied, a real 13-date time series, and a real mixed-collection search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.build_shards import main
from pipeline.catalogs import sensor
from pipeline.config import load_config
from pipeline.stages import build
from tests.helpers import stac_fixtures as fx
from tests.helpers.paths import BIGEARTHNET
from tests.pipeline.conftest import read_dataset

PATCHES = sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir())
B = sensor().band_names


def _items(catalog: Path) -> list[dict]:
    return fx._walk_items(catalog)


def _bbox_arg(catalog: Path) -> str:
    bb = np.array([it["bbox"] for it in _items(catalog)])
    w, s, e, n = bb[:, 0].min() - 0.01, bb[:, 1].min() - 0.01, bb[:, 2].max() + 0.01, bb[:, 3].max() + 0.01
    return f"{w},{s},{e},{n}"


def _build(catalog: Path, out: Path, *extra: str) -> dict:
    rc = main(["--catalog", str(catalog), "--bbox", _bbox_arg(catalog), "--max-cloud", "100", "--output", str(out), *extra])
    assert rc == 0
    return read_dataset(out)


def test_planetary_computer_0510_offset_removed(tmp_path: Path) -> None:
    cat = fx.make_pc_baseline_0510_catalog(tmp_path / "cat", PATCHES[0])
    samples = _build(cat, tmp_path / "out")
    (s,) = [s for s in samples.values() if s["dataset"] == "s96_g10m"]
    (item_id, exp), = fx.expected_dn(cat).items()
    assert s["json"]["scene_ids"] == [item_id]
    h = s["json"]["harmonisation"][0]
    assert h["processing_baseline"] == "05.10" and h["offset_dn_removed"] == 1000 and h["rule"] == "pb>=04.00:dn-1000"
    for band in ("B02", "B04", "B08"):  # 10 m bands: exact pixels, offset removed
        np.testing.assert_array_equal(s["npy"][B.index(band)], exp[band][:96, :96])
    # SCL present: real cloud and shadow fractions are measured
    q = s["json"]["quality"]
    assert q["scl"] is True and q["cloud"] is not None and 0 <= q["cloud"] <= 0.3
    scl = np.repeat(np.repeat(exp["SCL"], 2, 0), 2, 1)[:96, :96]
    assert q["cloud"] == pytest.approx(np.isin(scl, [3, 8, 9, 10]).mean())
    assert q["shadow"] == pytest.approx((scl == 3).mean())


def test_earth_search_offset_applied_not_corrected_twice(tmp_path: Path) -> None:
    cat = fx.make_earth_search_offset_applied_catalog(tmp_path / "cat", PATCHES[1])
    samples = _build(cat, tmp_path / "out")
    (s,) = [s for s in samples.values() if s["dataset"] == "s96_g10m"]
    (_, exp), = fx.expected_dn(cat).items()
    h = s["json"]["harmonisation"][0]
    assert h["rule"] == "provider-applied:none" and h["offset_dn_removed"] == 0
    np.testing.assert_array_equal(s["npy"][B.index("B04")], exp["B04"][:96, :96])  # not DN - 1000


def test_timeseries_stacks_in_date_order(tmp_path: Path) -> None:
    cat = fx.make_timeseries_catalog(tmp_path / "cat", PATCHES)
    cfg = tmp_path / "ts.yaml"
    cfg.write_text("tiling: [{size: 96, time_steps: 4}, 96]\nquality: {max_invalid: 1.0, max_cloud: 1.0}\n")
    samples = _build(cat, tmp_path / "out", "--config", str(cfg))
    exp = fx.expected_dn(cat)
    by_date = {it["properties"]["datetime"]: it["id"] for it in _items(cat)}
    dates = sorted(by_date)
    assert len(dates) == 13
    stacks = sorted((s for s in samples.values() if s["dataset"] == "s96_g10m_t4"), key=lambda s: s["json"]["datetimes"][0])
    assert len(stacks) == 3  # 13 dates -> 3 stacks of 4 consecutive dates (the 13th is left over)
    for i, s in enumerate(stacks):
        assert s["npy"].shape == (4, 12, 96, 96) and s["json"]["layout"] == "TCHW"
        got_dates = [d.replace("Z", "") for d in s["json"]["datetimes"]]
        assert got_dates == sorted(got_dates)
        for t in range(4):
            item_id = s["json"]["scene_ids"][t]
            np.testing.assert_array_equal(s["npy"][t, B.index("B03")], exp[item_id]["B03"][:96, :96])
        assert s["json"]["scene_ids"] == [by_date[d] for d in dates[4 * i : 4 * i + 4]]
    singles = [s for s in samples.values() if s["dataset"] == "s96_g10m"]
    assert len(singles) == 13
    # one location: every stack and every single-date chip lands in the same split
    assert len({s["split"] for s in samples.values()}) == 1


def test_mixed_collections_rejected_with_reasons(tmp_path: Path) -> None:
    cat = fx.make_mixed_collection_catalog(tmp_path / "cat")
    cfg = load_config(
        None,
        {
            "catalog": str(cat),
            "collection": "sentinel-1-grd,sentinel-2-c1-l2a,sentinel-2-l2a,sentinel-2-l1c",
            "bbox": (-180.0, -89.0, 180.0, 89.0),
            "max_cloud": 100,
            "output": str(tmp_path / "out"),
        },
    )
    summary = build(cfg, dry_run=True)
    assert summary.found == 20
    assert summary.rejected["not L2A (collection sentinel-1-grd)"] == 3
    assert summary.rejected["not L2A (collection sentinel-2-l1c)"] == 5
    # the same 6 acquisitions are in sentinel-2-c1-l2a and sentinel-2-l2a: each is used once
    assert summary.rejected["duplicate acquisition (same grid and datetime)"] == 6
    assert summary.used == 6
    assert not (tmp_path / "out").exists()


def test_proj_code_only_items_are_placed(tmp_path: Path) -> None:
    """CDSE items carry only proj:code: drop every proj:epsg from a real-pixel catalog."""
    cat = fx.make_pc_baseline_0510_catalog(tmp_path / "cat", PATCHES[2])
    for p in cat.parent.rglob("*.json"):
        d = json.loads(p.read_text())
        if d.get("type") == "Feature":
            epsg = d["properties"].pop("proj:epsg", None) or next(a["proj:epsg"] for a in d["assets"].values() if "proj:epsg" in a)
            d["properties"]["proj:code"] = f"EPSG:{epsg}"
            for a in d["assets"].values():
                a.pop("proj:epsg", None)
            p.write_text(json.dumps(d))
    samples = _build(cat, tmp_path / "out")
    (s,) = [s for s in samples.values() if s["dataset"] == "s96_g10m"]
    assert s["json"]["crs"].startswith("EPSG:326")
