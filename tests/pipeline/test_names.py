"""`pipeline.names`: the one check names from catalogs, manifests, configs and samples pass
before they become paths, file names or tar members."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.names import UnsafeName, confined, is_safe_name, mgrs_tile, safe_name, safe_relpath

HOSTILE = ["", ".", "..", "../x", "x/../y", "/etc/passwd", "C:\\x", "a\\b", "a\x00b", "a\nb", "a b", "-rf",
           ".hidden", "x" * 129, "ｓ96", "s96\u200b", "s\u0336", "../../" * 20, "~", "a/b"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_are_refused(value: str) -> None:
    assert not is_safe_name(value)
    with pytest.raises(UnsafeName, match="refused"):
        safe_name(value, "dataset name")


@pytest.mark.parametrize("value", ["s96_g10m", "train-v0001-1f472ea2-29UPU_507a6020-000000.tar", "pack-d64ee973",
                                   "29UPU_507a6020.zarr", "x" * 128, "9"])
def test_plain_names_pass(value: str) -> None:
    assert safe_name(value, "name") == value


@pytest.mark.parametrize(("value", "tile"), [
    ("29UPU", "29UPU"), ("T29UPU", "29UPU"), ("MGRS-29UPU", "29UPU"), ("29/U/PU", "29UPU"), ("9UPU", "9UPU"),
    ("60XVV", "60XVV"), ("29upu", "29UPU"),
    ("61UPU", None), ("00UPU", None), ("29IPU", None), ("29UPU/../x", None), ("../29UPU", None), ("29UPU\n", None),
    ("２９ＵＰＵ", None), ("29UPU\x00", None), ("29UPW", None), ("", None), (29, None), ("29UPUX", None),
])
def test_mgrs_tiles(value: object, tile: str | None) -> None:
    assert mgrs_tile(value) == tile


@pytest.mark.parametrize("rel", ["../../other/x.tar", "/etc/passwd", "s96/../../x.tar", "s96\\x.tar", "s96//x.tar",
                                 "a/b/c/d/e.tar", "s96/x.tar\x00", ""])
def test_hostile_relative_paths_are_refused(rel: str) -> None:
    with pytest.raises(UnsafeName):
        safe_relpath(rel, "shard path")


def test_confined_follows_links_and_refuses_the_way_out(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "s96_g10m").mkdir(parents=True)
    (root / "s96_g10m" / "train.tar").write_bytes(b"x")
    assert confined(root, "s96_g10m/train.tar", "shard") == root / "s96_g10m" / "train.tar"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "s128_g10m")
    with pytest.raises(UnsafeName, match="leads outside"):
        confined(root, "s128_g10m/train.tar", "shard")


def test_inspect_refuses_a_manifest_path_out_of_the_dataset(sample_dataset: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import json
    import shutil

    from pipeline.inspect import main as inspect_main

    ds = tmp_path / "ds"
    shutil.copytree(sample_dataset, ds)
    (tmp_path / "secret.tar").write_bytes(b"not yours")
    man = json.loads((ds / "manifest.json").read_text())
    next(iter(man["datasets"].values()))["splits"]["train"]["shards"][0]["path"] = "../secret.tar"
    (ds / "manifest.json").write_text(json.dumps(man))
    assert inspect_main([str(ds)]) == 2
    assert "'../secret.tar' is not a relative path of plain names inside the dataset: refused" in caplog.text
    assert not (ds / "report").exists()
