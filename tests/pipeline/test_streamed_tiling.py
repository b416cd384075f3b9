"""A grid of several chunk-row blocks is written and tiled at once (the tiling takes the rows
from the writer's memory): the dataset is the same, byte for byte, as tiling the finished cube."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline.build_shards import main
from tests.pipeline.conftest import shard_files
from tests.pipeline.test_resume import _assert_same_dataset
from tools.synth import generate_scenes


def test_streamed_build_equals_tiling_the_finished_cube(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cat = generate_scenes(tmp_path / "scenes", 1, size=1536, seed=3)  # 1536 rows: two row blocks of 1024
    item = next((tmp_path / "scenes").rglob("S2*_L2A.json"))
    w, s, e, n = json.loads(item.read_text())["bbox"]
    args = ["--catalog", str(cat), "--bbox", f"{w + 0.001},{s + 0.001},{e - 0.001},{n - 0.001}", "--max-cloud", "100"]
    caplog.set_level(logging.DEBUG, logger="pipeline.units")
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert any("written and tiled at once" in r.getMessage() for r in caplog.records)
    assert shard_files(tmp_path / "a")

    # the same build where the finished cube is there already: it is verified and tiled from disk
    shutil.copytree(tmp_path / "a" / "cube", tmp_path / "b" / "cube")
    caplog.clear()
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    assert not any("written and tiled at once" in r.getMessage() for r in caplog.records)
    _assert_same_dataset(tmp_path / "a", tmp_path / "b")
