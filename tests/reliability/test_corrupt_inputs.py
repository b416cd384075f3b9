"""Corrupt inputs and bad user input: each is rejected with a reason, the rest goes on."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.build_shards import main
from tests.helpers.loopback import serve_get
from tests.helpers.paths import REPO
from tests.pipeline.conftest import read_dataset

# one patch per kind of corruption; the other 6 sample patches must come through untouched
TRUNCATED = "S2A_MSIL2A_20170617T113321_36_85"
WRONG_CRS = "S2A_MSIL2A_20170617T113321_4_55"
WRONG_SHAPE = "S2A_MSIL2A_20171221T112501_56_35"
MISSING_BAND = "S2B_MSIL2A_20170914T093029_32_39"
INVALID_ITEM = "S2B_MSIL2A_20170924T093019_43_47"


def _item_path(cat: Path, pid: str) -> Path:
    return cat / "sentinel-2-l2a" / pid / f"{pid}.json"


def _corrupt_catalog(tmp: Path) -> Path:
    cat = tmp / "catalog"
    shutil.copytree(REPO / "catalogs" / "sample", cat)
    # a COG cut in half (its header survives, its tiles do not)
    cog = next((cat / "sentinel-2-l2a" / TRUNCATED).glob("*B04*.tif"))
    data = cog.read_bytes()
    cog.write_bytes(data[: len(data) // 2])
    # a COG in another CRS than its item says
    cog = next((cat / "sentinel-2-l2a" / WRONG_CRS).glob("*B03*.tif"))
    with rasterio.open(cog) as r:
        prof, arr = r.profile, r.read()
    prof.update(crs="EPSG:32630", driver="GTiff")
    with rasterio.open(cog, "w", **prof) as w:
        w.write(arr)
    # proj:shape of one asset contradicting the file
    p = _item_path(cat, WRONG_SHAPE)
    d = json.loads(p.read_text())
    d["assets"]["B05"]["proj:shape"] = [61, 61]
    p.write_text(json.dumps(d))
    # an item without one band
    p = _item_path(cat, MISSING_BAND)
    d = json.loads(p.read_text())
    del d["assets"]["B11"]
    p.write_text(json.dumps(d))
    # an item failing validation: a self-intersecting footprint (a bow tie), well-formed JSON
    # that the STAC server passes on, but not a valid geometry
    p = _item_path(cat, INVALID_ITEM)
    d = json.loads(p.read_text())
    w, s_, e, n = d["bbox"]
    d["geometry"] = {"type": "Polygon", "coordinates": [[[w, s_], [e, n], [e, s_], [w, n], [w, s_]]]}
    p.write_text(json.dumps(d))
    return cat / "catalog.json"


def test_corrupt_inputs_rejected_with_reasons(tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    cat = _corrupt_catalog(tmp_path)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling: [96]\nretries: 1\nretry_backoff_s: 0.1\n")
    rc = main(["--catalog", str(cat), "--config", str(cfg), "--output", str(out)])
    man = json.loads((out / "manifest.json").read_text())
    failed = {f["id"]: f["reason"] for f in man["versions"][0]["failed"]}
    rejected = man["scenes"]["rejected"]
    for name, outcome in (
        ("truncated COG", failed.get(TRUNCATED)),
        ("COG with another CRS than its item", failed.get(WRONG_CRS)),
        ("asset shape contradicting proj:shape", failed.get(WRONG_SHAPE)),
        ("item missing band B11", "rejected: missing bands B11" if rejected.get("missing bands B11") else None),
        ("item failing validation", "rejected: " + next((r for r in rejected if r.startswith("invalid STAC item")), "-")),
    ):
        report(name, "1 scene", f"exit {rc}; {outcome}")
    assert rc == 5
    assert "read failed" in failed[TRUNCATED]
    assert "CRS EPSG:32630 differs" in failed[WRONG_CRS]
    assert "differs from proj:shape 61x61" in failed[WRONG_SHAPE]
    assert rejected.get("missing bands B11") == 1
    assert rejected.get("invalid STAC item (invalid geometry)") == 1
    got = {s["json"]["scene_ids"][0] for s in read_dataset(out).values()}
    assert not got & {TRUNCATED, WRONG_CRS, WRONG_SHAPE, MISSING_BAND, INVALID_ITEM}
    assert man["scenes"]["used"] == 6  # the healthy patches, all processed
    assert len(got) + sum(man["datasets"]["s96_g10m"]["dropped"].values()) == 6
    # the healthy chips are the same pixels a clean build gives
    clean = tmp_path / "clean"
    assert main(["--config", str(cfg), "--output", str(clean)]) == 0
    ref = read_dataset(clean)
    for k, s in read_dataset(out).items():
        np.testing.assert_array_equal(s["npy"], ref[k]["npy"])


@pytest.fixture
def not_stac() -> Iterator[str]:
    with serve_get(lambda _path: (b"<html><body>a web page, not a STAC API</body></html>", "text/html")) as url:
        yield url + "/"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--aoi", "../../etc/passwd"], "invalid AOI name"),
        (["--aoi", "a/b"], "invalid AOI name"),
        (["--bbox=-190,10,20,30"], "[-180, 180]"),
        (["--bbox", "20,10,10,30"], "W < E"),
        (["--start", "2020-02-01", "--end", "2020-01-01"], "after --end"),
    ],
)
def test_bad_user_input_one_line_nothing_written(args: list[str], needle: str, tmp_path: Path, caplog, report) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR):
        rc = main([*args, "--output", str(out)])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    report(f"user input {' '.join(args)}", "-", f"exit {rc}: {errors[-1] if errors else '?'}")
    assert rc == 2 and len(errors) == 1 and needle in errors[0] and not out.exists()


def test_catalog_url_that_is_not_stac(not_stac: str, tmp_path: Path, caplog, report) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.ERROR):
        rc = main(["--catalog", not_stac, "--output", str(tmp_path / "o")])
    msg = caplog.records[-1].getMessage()
    report("catalog URL serving HTML", "-", f"exit {rc}: {msg[:80]}")
    assert rc == 2 and ("cannot open STAC API" in msg or "not a STAC API" in msg)
    assert not (tmp_path / "o").exists()


def test_output_inside_input_catalog(tmp_path: Path, caplog, report) -> None:  # type: ignore[no-untyped-def]
    cat = tmp_path / "catalog"
    shutil.copytree(REPO / "catalogs" / "sample", cat)
    with caplog.at_level(logging.ERROR):
        rc = main(["--catalog", str(cat / "catalog.json"), "--output", str(cat / "shards")])
    msg = caplog.records[-1].getMessage()
    report("output inside the input catalog", "-", f"exit {rc}: {msg[:80]}")
    assert rc == 2 and "inside the input catalog" in msg and not (cat / "shards").exists()
