"""End-to-end runs under the real launchers (deepspeed, torchrun) with 1-2 CPU processes.

Marked slow; CI runs them. Together about 3-4 minutes on a 2-core machine. The resume
tests start from a copy of the full run's end-of-stage-1 checkpoint instead of retraining.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tests.helpers.loopback import free_port

pytestmark = pytest.mark.slow

SCRIPT = REPO / "training" / "pretrain.py"
# Stage 1: 40 steps of 8 at 96 px; stage 2: 10 steps at 128 px (global steps 41-50).
FAST = ["bf16=false", "num_workers=1", "stages.0.samples=320", "stages.0.warmup_samples=40",
        "stages.1.samples=80", "stages.1.warmup_samples=16", "log_every=2",
        "checkpoint_every=10", "image_every=20"]


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"DS_ACCELERATOR": "cpu"}


def _command(nproc: int, launcher: str, args: list[str]) -> list[str]:
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", str(free_port()), str(SCRIPT), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), *args]


def launch(cwd: Path, overrides: list[str], *, nproc: int = 2, launcher: str = "deepspeed",
           resume: bool = False, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    args = [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else [])
    done = _launch_once(cwd, nproc, launcher, args, timeout)
    if done.returncode != 0 and "EADDRINUSE" in done.stdout:
        # the probed port was taken by another process before the launcher bound it: the
        # run never started, so one more try with a new port is the same run
        done = _launch_once(cwd, nproc, launcher, args, timeout)
    return done


def _launch_once(cwd: Path, nproc: int, launcher: str, args: list[str],
                 timeout: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(_command(nproc, launcher, args), cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run timed out after {timeout}s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def latest_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return json.loads((ckpt / tag / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, manifest: Path) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def full_run(workdir: Path, manifest: Path) -> Path:
    """Both stages, ZeRO-2, 2 processes under the deepspeed launcher."""
    proc = launch(workdir, [f"manifest={manifest}", "name=full", *FAST])
    assert proc.returncode == 0, proc.stdout[-4000:]
    return workdir / "runs" / "full"


def test_two_stage_zero2_run(full_run: Path) -> None:
    records = metrics(full_run)
    starts = [r for r in records if r.get("event") == "stage_start"]
    assert [(s["stage"], s["world_size"], s["accumulation"], s["effective_batch"],
             s["tokens_per_step"], s["zero_stage"]) for s in starts] == [
        ("stage1_96px", 2, 1, 8, 8 * 576, 2), ("stage2_128px", 2, 1, 8, 8 * 1024, 2)]
    stage1 = [r["loss"] for r in records if r.get("stage") == "stage1_96px" and "loss" in r]
    assert stage1[-1] < 0.7 * stage1[0], stage1  # the loss falls
    last = records[-1]
    assert last["step"] == 50 and last["stage"] == "stage2_128px"
    for key in ("loss", "loss_token", "loss_spectral", "lr", "samples_per_s", "tokens_per_s",
                "step_time_s", "data_wait_s"):
        assert isinstance(last[key], float), key
    assert latest_state(full_run)["global_step"] == 50
    tags = sorted(p.name for p in (full_run / "checkpoints").glob("global_step*"))
    assert tags == ["global_step40", "global_step50"]  # keep_checkpoints: 2
    pngs = sorted(p.name for p in (full_run / "images").glob("*.png"))
    assert "stage1_96px_step0000040.png" in pngs and "stage2_128px_step0000050.png" in pngs
    assert (full_run / "loss_curve.png").stat().st_size > 1000
    assert (full_run / "config.yaml").is_file() and (full_run / "train.log").is_file()


def test_export_plain_weights(full_run: Path) -> None:
    from training.export import load_exported

    for fmt in ("safetensors", "pt"):
        proc = subprocess.run([sys.executable, "-m", "training.export", str(full_run),
                               "--format", fmt], cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = Path(proc.stdout.strip().splitlines()[-1])
        assert out.suffix == f".{fmt}"
        model = load_exported(out)
        assert model.cfg.img_size == 128
    plain = torch.load(out, map_location="cpu", weights_only=True)
    assert set(plain) == {"model", "config"} and plain["config"]["global_step"] == 50


def from_stage_one(full_run: Path, name: str) -> Path:
    """A new run directory holding only the full run's end-of-stage-1 checkpoint (step 40),
    so the resume tests skip re-training stage 1 (and cover resuming at a stage boundary)."""
    run = full_run.parent / name
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "global_step40",
                    run / "checkpoints" / "global_step40")
    (run / "checkpoints" / "latest").write_text("global_step40")
    return run


@pytest.fixture(scope="module")
def stopped_run(workdir: Path, manifest: Path, full_run: Path) -> tuple[Path, Path]:
    """The full run's config resumed from step 40 and stopped at step 44, inside stage 2."""
    from_stage_one(full_run, "stopped")
    proc = launch(workdir, [f"manifest={manifest}", "name=stopped", "stop_at_step=44", *FAST],
                  resume=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "step 40/40, run step 40" in proc.stdout
    run = workdir / "runs" / "stopped"
    state = latest_state(run)
    assert (state["stage_name"], state["step_in_stage"], state["global_step"]) == \
        ("stage2_128px", 4, 44)
    copy = workdir / "runs" / "stopped_copy"
    shutil.copytree(run, copy)
    return run, copy


def test_resume_on_the_same_world_size_continues_exactly(stopped_run: tuple[Path, Path],
                                                         full_run: Path, manifest: Path,
                                                         workdir: Path) -> None:
    run, _ = stopped_run
    proc = launch(workdir, [f"manifest={manifest}", "name=stopped", *FAST], resume=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "resuming" in proc.stdout and "step 4/10, run step 44" in proc.stdout
    resumed = {s: v for s, v in losses(run).items() if s > 44}
    assert sorted(resumed) == [46, 48, 50]
    # Same weights, optimizer state, LR, data position and masks: the same numbers.
    assert resumed == {s: losses(full_run)[s] for s in resumed}


def test_resume_on_one_process_with_torchrun(stopped_run: tuple[Path, Path], manifest: Path,
                                             workdir: Path) -> None:
    _, copy = stopped_run
    proc = launch(workdir, [f"manifest={manifest}", "name=stopped_copy", *FAST], nproc=1,
                  launcher="torchrun", resume=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "saved with 2 processes, now 1" in proc.stdout
    assert (copy / "checkpoints" / "global_step44_universal").is_dir()
    records = metrics(copy)
    start = [r for r in records if r.get("event") == "stage_start"][-1]
    assert (start["world_size"], start["accumulation"], start["resumed_at_stage_step"]) == \
        (1, 2, 4)
    after = [r["step"] for r in records[records.index(start):] if "loss" in r]
    assert after == [46, 48, 50]
    assert latest_state(copy)["global_step"] == 50


def test_zero3_bf16_two_stages_under_torchrun(workdir: Path, manifest: Path) -> None:
    proc = launch(workdir, [f"manifest={manifest}", "name=zero3", "deepspeed_config=ds_zero3.json",
                            "bf16=true", "num_workers=1", "stages.0.samples=24",
                            "stages.1.samples=16", "log_every=1", "checkpoint_every=100",
                            "image_every=100"], launcher="torchrun")
    assert proc.returncode == 0, proc.stdout[-4000:]
    run = workdir / "runs" / "zero3"
    starts = [r for r in metrics(run) if r.get("event") == "stage_start"]
    assert [(s["zero_stage"], s["bf16"]) for s in starts] == [(3, True), (3, True)]
    assert latest_state(run)["global_step"] == 5
    assert len(list((run / "images").glob("*.png"))) == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(run).values())


def test_sigkill_during_stage_two_then_resume(workdir: Path, manifest: Path,
                                              full_run: Path) -> None:
    """A real kill -9 of every process mid-stage-2; --resume picks up the last complete save."""
    run = from_stage_one(full_run, "killed")
    overrides = [f"manifest={manifest}", "name=killed", *FAST, "checkpoint_every=2"]
    args = [a for o in overrides for a in ("--set", o)] + ["--resume"]
    proc = subprocess.Popen(_command(2, "deepspeed", args), cwd=workdir, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            try:
                state = latest_state(run)
            except (FileNotFoundError, json.JSONDecodeError):
                state = {}
            if state.get("stage_index") == 1 and state.get("step_in_stage", 0) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no stage-2 checkpoint appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = latest_state(run)["global_step"]
    assert 42 <= saved < 50
    resumed = launch(workdir, overrides, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"run step {saved}" in resumed.stdout
    assert latest_state(run)["global_step"] == 50
