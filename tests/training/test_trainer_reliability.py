"""Safety and provenance of what the trainer writes and reads, on a real in-process run.

One tiny run (1 process, 4 steps, pinned to version 1 of a hand-edited two-version
manifest) is trained once for the module; its checkpoints are exported, re-read with
``torch.load(weights_only=True)``, and tampered with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from make_test_shards import write_dataset
from training import checkpoint
from training.errors import CheckpointError

# DeepSpeed 0.19 calls collectives and torch.jit APIs that torch 2.13 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

V1_MEAN = [500.0 + 10 * b for b in range(12)]


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that something was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _two_version_manifest(root: Path) -> Path:
    """Version 1 added the first train shard (its own statistics), version 2 the second."""
    manifest = write_dataset(root, sizes={"s96_g10m": 96}, samples={"train": 9, "val": 2})
    data = json.loads(manifest.read_text())
    entry = data["datasets"]["s96_g10m"]
    train = entry["splits"]["train"]["shards"]
    data["latest_version"] = 2
    data["versions"] = [
        {"version": v, "items": [], "failed": [], "datasets": {"s96_g10m": {
            "splits": {"train": {"num_samples": shard["num_samples"], "shards": [shard]}},
            "dropped": {}, "stats": stats}}}
        for v, shard, stats in ((1, train[0], {**entry["stats"], "mean": V1_MEAN}),
                                (2, train[1], entry["stats"]))]
    manifest.write_text(json.dumps(data))
    return manifest


def _main(*overrides: str, resume: bool = False) -> int:
    from training.pretrain import main

    args = [a for o in overrides for a in ("--set", o)]
    return main(args + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished 4-step run (checkpoints at steps 2 and 4) and the overrides that made it."""
    root = tmp_path_factory.mktemp("pinned")
    manifest = _two_version_manifest(root / "shards")
    overrides = [f"manifest={manifest}", f"output_dir={root / 'run'}", "num_workers=0",
                 "bf16=false", "dataset_version=1", "checkpoint_every=2", "log_every=2",
                 "image_every=100",
                 "stages=[{name: a, dataset: s96_g10m, img_size: 96, samples: 32}]"]
    assert _main(*overrides) == 0
    return root / "run", overrides


def test_the_pinned_version_is_recorded(trained: tuple[Path, list[str]]) -> None:
    run, _ = trained
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in lines if r.get("event") == "stage_start")
    assert start["dataset_version"] == 1 and start["dataset_samples"] == 6
    state = checkpoint.read_state(*checkpoint.resolve(run))
    assert state.global_step == 4 and state.data["version"] == 1
    assert state.data["mean"] == V1_MEAN and len(state.data["std"]) == 12


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_exports_load_with_weights_only_and_carry_the_statistics(
        trained: tuple[Path, list[str]], tmp_path: Path, fmt: str) -> None:
    from safetensors import safe_open

    from training.evaluation.checkpoints import load_checkpoint, resolve_normalisation
    from training.export import export, load_exported

    run, _ = trained
    out = export(run, tmp_path / f"w.{fmt}", fmt)
    if fmt == "pt":
        plain = torch.load(out, map_location="cpu", weights_only=True)
        info = plain["config"]
        assert all(isinstance(v, torch.Tensor) for v in plain["model"].values())
    else:
        with safe_open(str(out), "pt") as f:
            info = json.loads(f.metadata()["spectralgpt"])
    assert info == json.loads(out.with_suffix(".json").read_text())
    assert info["normalisation"] == "dataset_stats"
    assert info["stats"]["mean"] == V1_MEAN and len(info["stats"]["std"]) == 12
    assert info["data"] == {"dataset": "s96_g10m", "split": "train", "version": 1}
    assert load_exported(out).cfg.img_size == 96
    # Evaluation normalises like pretraining from the export alone (no manifest anywhere).
    ckpt = load_checkpoint(out)
    ckpt.run_config = {**(ckpt.run_config or {}), "manifest": str(tmp_path / "gone.json")}
    norm = resolve_normalisation(ckpt, "auto")
    assert norm.source == "checkpoint info" and list(norm.mean) == V1_MEAN


def test_every_deepspeed_file_passes_the_weights_only_check(
        trained: tuple[Path, list[str]]) -> None:
    ckpt_dir, tag = checkpoint.resolve(trained[0])
    assert len(list((ckpt_dir / tag).glob("*.pt"))) >= 2
    checkpoint.check_weights_only(ckpt_dir / tag)  # model and ZeRO optimizer files


def _tamper(run: Path, copy: Path, marker: Path) -> Path:
    """Copy ``run`` and replace its latest model file by a pickle that runs code."""
    shutil.copytree(run, copy)
    ckpt_dir, tag = checkpoint.resolve(copy)
    target = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, target)
    return target


def test_a_malicious_pickle_in_a_checkpoint_is_refused(
        trained: tuple[Path, list[str]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from training.export import export

    run, overrides = trained
    marker = tmp_path / "pickle-ran"
    copy = tmp_path / "tampered"
    target = _tamper(run, copy, marker)
    capsys.readouterr()
    rc = _main(*overrides, f"output_dir={copy}", "stages.0.samples=48", resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: refusing to load checkpoint file '{target}'")
    assert "weights_only" in err[-1]
    with pytest.raises(CheckpointError, match="refusing to load"):
        export(copy, tmp_path / "w.pt", "pt")
    assert not marker.exists()


def test_a_malicious_export_is_refused(trained: tuple[Path, list[str]], tmp_path: Path) -> None:
    from training.export import export, load_exported

    marker = tmp_path / "pickle-ran"
    out = export(trained[0], tmp_path / "w.pt", "pt")
    torch.save({"model": {"x": _Payload(marker)}, "config": {}}, out)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_exported(out)
    assert not marker.exists()
