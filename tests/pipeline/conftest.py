"""Fixtures for pipeline tests: built datasets and sample readers.

Builds run in-process through `pipeline.build_shards.main` against real STAC APIs on
loopback (the embedded sample catalog or catalogs generated from real pixels).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.build_shards import main as build_main


def read_dataset(out: Path) -> dict[str, dict[str, Any]]:
    """All samples of a dataset dir: key -> {"npy": array, "json": dict, "dataset", "split"}."""
    man = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, Any]] = {}
    for name, d in man["datasets"].items():
        for split, sp in d["splits"].items():
            for sh in sp["shards"]:
                with tarfile.open(out / sh["path"]) as tf:
                    members = tf.getmembers()
                    for m in members:
                        key, ext = m.name.split(".", 1)
                        raw = tf.extractfile(m).read()  # type: ignore[union-attr]
                        s = samples.setdefault(key, {"dataset": name, "split": split})
                        if ext == "npy":
                            import io

                            s["npy"] = np.load(io.BytesIO(raw), allow_pickle=False)
                        else:
                            s["json"] = json.loads(raw)
    return samples


def shard_files(out: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every shard (for byte-exact comparisons)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("s*/*.tar"))}


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main job on the embedded sample catalog, built once per session."""
    out = tmp_path_factory.mktemp("sample") / "europe"
    assert build_main(["--aoi", "europe", "--output", str(out)]) == 0
    return out
