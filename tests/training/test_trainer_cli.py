"""User errors end with one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from make_test_shards import write_dataset
from training.cli import main as cli_main
from training.pretrain import main


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_unknown_config_key(capsys: pytest.CaptureFixture[str], manifest: Path) -> None:
    assert main(["--set", f"manifest={manifest}", "--set", "stages.0.bogus=1"]) == 2
    assert "unknown config key 'stages.0.bogus'" in _one_error_line(capsys)


def test_missing_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--set", f"manifest={tmp_path / 'none' / 'manifest.json'}"]) == 2
    assert "build the shards first" in _one_error_line(capsys)


def test_empty_shard_set(capsys: pytest.CaptureFixture[str], manifest: Path,
                         tmp_path: Path) -> None:
    root = tmp_path / "empty"
    shutil.copytree(manifest.parent, root)
    data = json.loads((root / "manifest.json").read_text())
    data["datasets"]["s128_g10m"]["splits"]["train"] = {"num_samples": 0, "shards": []}
    (root / "manifest.json").write_text(json.dumps(data))
    assert main(["--set", f"manifest={root / 'manifest.json'}"]) == 2
    assert "'s128_g10m' in" in _one_error_line(capsys)


def test_band_count_mismatch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, samples={"train": 2}, bands=13)
    assert main(["--set", f"manifest={manifest}"]) == 2
    assert "13 bands" in _one_error_line(capsys)


def test_image_larger_than_chips(capsys: pytest.CaptureFixture[str], manifest: Path) -> None:
    assert main(["--set", f"manifest={manifest}", "--set", "stages.0.img_size=160"]) == 2
    assert "96x96 px chips" in _one_error_line(capsys)


def test_dispatcher_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 2
    assert "usage" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def test_script_entry_reports_one_line(tmp_path: Path) -> None:
    """As a user runs it (a script, not a module): exit 2, one stderr line."""
    proc = subprocess.run([sys.executable, str(REPO / "training" / "pretrain.py"), "--set",
                           "stages.1.warmup=3"], cwd=tmp_path, capture_output=True, text=True,
                          env=_env() | {"PYTHONPATH": ""}, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[20")]
    assert lines == ["error: unknown config key 'stages.1.warmup' (known: name, dataset, "
                     "datasets, img_size, dates, split, samples, epochs, blr, warmup_samples, warmup_epochs, "
                     "min_lr, pos_embed, micro_batch, global_batch)"]


def test_export_of_a_missing_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "training", "export", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no checkpoint found")


def test_sizes_command_prints_the_official_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["sizes"]) == 0
    out = capsys.readouterr().out
    assert "base  128 px: encoder    85.4 M" in out and "huge  128 px: encoder   630.3 M" in out
