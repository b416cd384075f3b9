"""Scheduled refresh: new items become a new dataset version; nothing new adds nothing;
a lock keeps two runs apart; a refresh killed half way leaves the last version intact."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline.locking import dataset_lock
from pipeline.refresh import main as refresh_main
from tests.helpers.paths import REPO
from tests.pipeline.conftest import read_dataset, shard_files

LATER = ("S2B_MSIL2A_20180502T093039_43_14", "S2A_MSIL2A_20180510T94033_19_86")  # the two newest patches


def _catalog(tmp: Path, hide: tuple[str, ...]) -> Path:
    """A copy of the sample catalog without the items in `hide` (as if not yet published)."""
    cat = tmp / "catalog"
    if cat.exists():
        shutil.rmtree(cat)
    shutil.copytree(REPO / "catalogs" / "sample", cat)
    coll = cat / "sentinel-2-l2a" / "collection.json"
    d = json.loads(coll.read_text())
    d["links"] = [ln for ln in d["links"] if not (ln["rel"] == "item" and any(h in ln["href"] for h in hide))]
    coll.write_text(json.dumps(d, indent=1))
    return cat / "catalog.json"


def _band_stats(chips: list) -> dict:
    """Per-band count, min, max, mean and (population) std of the valid (DN > 0) pixels."""
    import numpy as np

    cube = np.stack(chips).astype(np.float64)  # [N, C, H, W]
    out: dict = {"count": [], "min": [], "max": [], "mean": [], "std": []}
    for b in range(cube.shape[1]):
        v = cube[:, b][cube[:, b] > 0]
        out["count"].append(int(v.size))
        out["min"].append(int(v.min()))
        out["max"].append(int(v.max()))
        out["mean"].append(float(v.mean()))
        out["std"].append(float(v.std()))
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("refresh")
    cat = _catalog(d, LATER)
    out = d / "v1"
    assert refresh_main(["--catalog", str(cat), "--output", str(out)]) == 0  # no dataset yet: builds version 1
    return d, out


def test_refresh_adds_exactly_the_new_items(v1: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d, base = v1
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    before = read_dataset(out)
    m1 = _manifest(out)
    assert m1["latest_version"] == 1 and not set(LATER) & set(m1["versions"][0]["items"])
    cat = _catalog(tmp_path, ())
    assert refresh_main(["--catalog", str(cat), "--output", str(out)]) == 0
    m2 = _manifest(out)
    assert m2["latest_version"] == 2 and [v["version"] for v in m2["versions"]] == [1, 2]
    assert sorted(m2["versions"][1]["items"]) == sorted(LATER)
    after = read_dataset(out)
    added = {k: s for k, s in after.items() if k not in before}
    assert set(before) <= set(after)
    assert {s["json"]["scene_ids"][0] for s in added.values()} == set(LATER)
    for k, s in before.items():  # version 1 samples untouched
        assert (after[k]["npy"] == s["npy"]).all()
    for name, ds in m2["datasets"].items():  # cumulative view = v1 + v2
        for sp in ("train", "val"):
            n = sum(v["datasets"][name]["splits"][sp]["num_samples"] for v in m2["versions"])
            assert ds["splits"][sp]["num_samples"] == n
    assert m2["datasets"]["s96_g10m"]["stats"]["count"] != m1["datasets"]["s96_g10m"]["stats"]["count"]
    # statistics of a version are those of every train sample up to it, counted here from
    # the samples themselves (valid = DN > 0, per band), not from the stored histograms
    for name in m2["datasets"]:
        for version, samples, stats in ((1, before, m2["versions"][0]["datasets"][name]["stats"]),
                                        (2, after, m2["versions"][1]["datasets"][name]["stats"]),
                                        (2, after, m2["datasets"][name]["stats"])):
            want = _band_stats([s["npy"] for s in samples.values() if s["dataset"] == name and s["split"] == "train"])
            assert stats["count"] == want["count"], (name, version)
            assert stats["min"] == want["min"] and stats["max"] == want["max"], (name, version)
            assert stats["mean"] == pytest.approx(want["mean"], abs=1e-3), (name, version)
            assert stats["std"] == pytest.approx(want["std"], abs=1e-3), (name, version)
    # a second refresh with nothing new adds nothing and says so
    files = shard_files(out)
    with caplog.at_level(logging.INFO):
        assert refresh_main(["--catalog", str(cat), "--output", str(out)]) == 0
    assert "nothing new" in caplog.text
    assert shard_files(out) == files and _manifest(out)["latest_version"] == 2


def test_concurrent_refresh_exits_with_clear_line(v1: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d, base = v1
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    cat = _catalog(tmp_path, ())
    with dataset_lock(out), caplog.at_level(logging.ERROR):
        assert refresh_main(["--catalog", str(cat), "--output", str(out)]) == 4
    assert "another build or refresh" in caplog.records[-1].getMessage()
    assert _manifest(out)["latest_version"] == 1


def test_refresh_refuses_other_tiling(v1: tuple[Path, Path], tmp_path: Path) -> None:
    d, base = v1
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    cfg = tmp_path / "other.yaml"
    cfg.write_text("tiling: [64]\n")
    assert refresh_main(["--catalog", str(_catalog(tmp_path, ())), "--config", str(cfg), "--output", str(out)]) == 2


def test_refresh_takes_a_reprocessed_item_with_the_same_id(v1: tuple[Path, Path], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """An item republished under its id with a newer processing baseline (03.01, still
    without the DN offset) is new to the dataset: the refresh adds a version with exactly it,
    and its samples record the new baseline."""
    d, base = v1
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    m1 = _manifest(out)
    cat = _catalog(tmp_path, LATER)
    target = sorted(m1["versions"][0]["items"])[0]
    item_path = next(cat.parent.rglob(f"{target}.json"))
    item = json.loads(item_path.read_text())
    assert item["properties"]["s2:processing_baseline"] < "03.01"
    item["properties"]["s2:processing_baseline"] = "03.01"
    item_path.write_text(json.dumps(item))
    with caplog.at_level(logging.INFO):
        assert refresh_main(["--catalog", str(cat), "--output", str(out)]) == 0
    assert "1 new or reprocessed scenes -> version 2" in caplog.text
    m2 = _manifest(out)
    assert m2["latest_version"] == 2 and m2["versions"][1]["items"] == [target]
    added = {k: s for k, s in read_dataset(out).items() if s["json"]["scene_ids"] == [target]}
    baselines = {s["json"]["harmonisation"][0]["processing_baseline"] for s in added.values()}
    assert added and "03.01" in baselines


def test_wait_waits_for_the_other_run_then_refreshes(v1: tuple[Path, Path], tmp_path: Path) -> None:
    """--wait: while another run holds the dataset's lock the refresh waits (and says so);
    once it is released, the refresh runs to the end."""
    import subprocess
    import sys
    import time

    d, base = v1
    out = tmp_path / "ds"
    shutil.copytree(base, out)
    cat = _catalog(tmp_path, ())
    cmd = [sys.executable, "-m", "pipeline.refresh", "--catalog", str(cat), "--output", str(out), "--wait"]
    with dataset_lock(out):
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4.0)  # ample for start-up: it must still be waiting
        assert p.poll() is None and _manifest(out)["latest_version"] == 1
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "waiting for the lock" in err
    assert _manifest(out)["latest_version"] == 2
