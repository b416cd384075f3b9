"""Fixtures of the trainer tests: seeded synthetic shards in the pipeline's format."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))  # make_test_shards
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from make_test_shards import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two data sets (96 and 128 px), 9 train / 2 val samples each, 2 train shards each."""
    return write_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def official_shapes() -> dict[str, dict[str, list[int]]]:
    """Key -> shape of the official SpectralGPT checkpoints (copied from the research note)."""
    import json

    return json.loads((HERE / "data" / "official_state_dict_shapes.json").read_text())
