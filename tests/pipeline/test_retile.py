"""Re-tiling at another size, GSD or time window reads the zarr cubes, never the COGs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.build_shards import main
from tests.helpers.paths import REPO
from tests.pipeline.conftest import read_dataset


def test_retile_without_cogs(tmp_path: Path) -> None:
    cat_dir = tmp_path / "sample"
    shutil.copytree(REPO / "catalogs" / "sample", cat_dir)
    out = tmp_path / "ds"
    cfg1 = tmp_path / "a.yaml"
    cfg1.write_text("tiling: [96]\n")
    assert main(["--catalog", str(cat_dir / "catalog.json"), "--config", str(cfg1), "--output", str(out)]) == 0
    first = read_dataset(out)
    cogs = list(cat_dir.rglob("*.tif"))
    assert len(cogs) == 132
    for c in cogs:
        c.unlink()  # any COG read from now on would fail the build
    cfg2 = tmp_path / "b.yaml"
    cfg2.write_text("tiling: [96, 64, {size: 32, gsd: 20}]\n")
    assert main(["--catalog", str(cat_dir / "catalog.json"), "--config", str(cfg2), "--output", str(out)]) == 2  # needs --overwrite
    assert main(["--catalog", str(cat_dir / "catalog.json"), "--config", str(cfg2), "--output", str(out), "--overwrite"]) == 0
    second = read_dataset(out)
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["datasets"]) == {"s96_g10m", "s64_g10m", "s32_g20m"}
    for k, s in first.items():  # the 96 px chips are unchanged
        np.testing.assert_array_equal(second[k]["npy"], s["npy"])
    g20 = [s for s in second.values() if s["dataset"] == "s32_g20m"]
    assert g20 and all(s["json"]["gsd"] == 20.0 and s["npy"].shape == (12, 32, 32) for s in g20)
