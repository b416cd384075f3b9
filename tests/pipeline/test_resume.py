"""Determinism and kill -9 resume: whole datasets compared sample by sample and byte by byte."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.build_shards import main
from tests.pipeline.conftest import read_dataset, shard_files

# small shards so a run has many checkpoints to be killed between
CONFIG = "aoi: europe\nshards: {max_samples: 2}\ntiling: [96, 128, {size: 32, gsd: 20}]\n"


def _assert_same_dataset(a: Path, b: Path) -> None:
    sa, sb = read_dataset(a), read_dataset(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k]["npy"], sb[k]["npy"])
        assert sa[k]["json"] == sb[k]["json"]
        assert (sa[k]["dataset"], sa[k]["split"]) == (sb[k]["dataset"], sb[k]["split"])
    assert shard_files(a) == shard_files(b)  # byte-identical shards, same names
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["datasets"] == mb["datasets"] and ma["config_hash"] == mb["config_hash"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ref")
    cfg = d / "cfg.yaml"
    cfg.write_text(CONFIG)
    assert main(["--config", str(cfg), "--output", str(d / "ref")]) == 0
    return cfg, d / "ref"


def test_same_inputs_same_dataset(reference: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, ref = reference
    assert main(["--config", str(cfg), "--output", str(tmp_path / "again")]) == 0
    _assert_same_dataset(ref, tmp_path / "again")
    man = json.loads((ref / "manifest.json").read_text())
    n = sum(sp["num_samples"] for d in man["datasets"].values() for sp in d["splits"].values())
    assert n >= 24 and sum(len(sp["shards"]) for d in man["datasets"].values() for sp in d["splits"].values()) >= 12


def test_second_run_is_up_to_date(reference: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg, ref = reference
    before = shard_files(ref)
    with caplog.at_level(logging.INFO):
        assert main(["--config", str(cfg), "--output", str(ref)]) == 0
    assert "up to date" in caplog.text
    assert shard_files(ref) == before
