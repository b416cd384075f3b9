"""The trainer reads what the pipeline writes to object storage: an S3 API on 127.0.0.1
(moto), shards written there by ``python -m pipeline.build_shards --output s3://...``,
then a few steps of the tiny model from ``s3://.../manifest.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tests.helpers.s3 import moto_s3
from training.config import load_config
from training.data import DataPosition, ShardStream, iterate, make_loader, read_shard_set
from training.errors import DataError

pytestmark = pytest.mark.slow

URL = "s3://eo-datasets/ds"


@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pipeline's europe sample data set published to a loopback S3; yields its URL."""
    from pipeline.build_shards import main

    staging = tmp_path_factory.mktemp("state")  # the lock of the remote dataset
    saved = os.environ.get("SPECTRALGPT_STATE")
    os.environ["SPECTRALGPT_STATE"] = str(staging)
    try:
        with moto_s3():
            assert main(["--aoi", "europe", "--output", URL]) == 0
            yield URL
    finally:
        if saved is None:
            os.environ.pop("SPECTRALGPT_STATE", None)
        else:
            os.environ["SPECTRALGPT_STATE"] = saved


def _batches(manifest: str) -> tuple[list[dict], object]:
    run = load_config(overrides=[f"manifest={manifest}", "shuffle_buffer=4", "shuffle_initial=1"])
    stage = run.stages[0]
    ss = read_shard_set(run.manifest, stage.dataset, stage.split, run.model_for(stage))
    stream = ShardStream(ss, run, stage, stage_index=0, rank=0, world_size=1,
                         position=DataPosition.start(1, 1))
    return list(iterate(make_loader(stream, micro_batch=2, num_workers=1, num_batches=3))), ss


def test_shard_set_and_samples_from_s3(s3_dataset: str, tmp_path: Path) -> None:
    """The same samples, value for value, as the same build read from a local folder."""
    from pipeline.build_shards import main

    batches, ss = _batches(f"{s3_dataset}/manifest.json")
    assert ss.shards and all(s.startswith(f"{s3_dataset}/s96_g10m/train-v0001-") for s in ss.shards)
    assert ss.version == 1 and all(b for b in ss.shard_bytes)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 12, 96, 96)] * 3
    assert all(int(b["bad_shards"].sum()) == 0 for b in batches)
    assert main(["--aoi", "europe", "--output", str(tmp_path / "local")]) == 0
    local, _ = _batches(str(tmp_path / "local" / "manifest.json"))
    for a, b in zip(batches, local, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    run = load_config(overrides=[f"manifest={s3_dataset}/manifest.json"])
    stage = run.stages[0]
    with pytest.raises(DataError, match="manifest 's3://eo-datasets/nothing/manifest.json' "
                                        "not found"):
        read_shard_set("s3://eo-datasets/nothing/manifest.json", stage.dataset, stage.split,
                       run.model_for(stage))


def test_pretrain_from_an_s3_manifest(s3_dataset: str, tmp_path: Path) -> None:
    """One process, no launcher: 2 steps of 8 at 96 px, shards streamed from S3."""
    overrides = [f"manifest={s3_dataset}/manifest.json", f"output_dir={tmp_path / 'run'}",
                 "bf16=false", "num_workers=1", "log_every=1", "image_every=100",
                 "stages=[{name: a, dataset: s96_g10m, img_size: 96, samples: 16}]"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(REPO / "training" / "pretrain.py"),
                           *[a for o in overrides for a in ("--set", o)]],
                          cwd=tmp_path, env=env | {"DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in lines if r.get("event") == "stage_start")
    assert start["steps"] == 2 and start["dataset_version"] == 1
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 < r["loss"] < float("inf") for r in steps)
    assert not [r for r in lines if r.get("event") == "bad_data"]
