"""Re-tiling at another size, GSD or time window reads the zarr cubes, never the COGs."""

from __future__ import annotations

import json
import re
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


def test_a_missing_cube_chunk_is_rebuilt_or_fails_never_read_as_zeros(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A cube that lost a chunk file is not reused: with its COGs it is rebuilt (the same chips);
    without them its grid fails loudly (exit 5, listed in the manifest), never zeros as nodata."""
    cat_dir = tmp_path / "sample"
    shutil.copytree(REPO / "catalogs" / "sample", cat_dir)
    out = tmp_path / "ds"
    args = ["--catalog", str(cat_dir / "catalog.json"), "--output", str(out)]
    (tmp_path / "a.yaml").write_text("tiling: [96]\n")
    assert main([*args, "--config", str(tmp_path / "a.yaml")]) == 0
    first = read_dataset(out)
    cube = sorted((out / "cube" / "v0001").glob("*.zarr"))[0]
    chunk = next(p for p in (cube / "dn" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    (tmp_path / "b.yaml").write_text("tiling: [96, 64]\n")
    caplog.clear()
    assert main([*args, "--config", str(tmp_path / "b.yaml"), "--overwrite"]) == 0
    assert any(re.search(r"\d+ of \d+ chunks of 'dn' present: rebuilding it", r.getMessage()) for r in caplog.records)
    assert chunk.is_file()
    second = read_dataset(out)
    for k, s in first.items():
        np.testing.assert_array_equal(second[k]["npy"], s["npy"])

    chunk.unlink()
    for c in cat_dir.rglob("*.tif"):
        c.unlink()
    (tmp_path / "c.yaml").write_text("tiling: [96, 64, 32]\n")
    assert main([*args, "--config", str(tmp_path / "c.yaml"), "--overwrite"]) == 5
    man = json.loads((out / "manifest.json").read_text())
    failed = [it for it in man["items"] if it.get("failed")]
    assert len(failed) == 1 and failed[0]["grid"] is None and "No such file" in failed[0]["failed"]
    assert "permanent, not retried" in failed[0]["failed"]
    grid_id = cube.name.removesuffix(".zarr")
    assert not any(s["json"]["key"].startswith(grid_id.split("_")[0]) and s["json"]["scene_ids"] == failed[0]["id"]
                   for s in read_dataset(out).values())
