"""Trainer-side safety: shard paths confined to the dataset, an escaped run page, a resume
that keeps its data and optimisation config, and a full disk reported as one line.

Real parts throughout: manifests and shards of ``make_test_shards.py``, the trainer's
``main`` in this process (tiny model, one process, DeepSpeed on CPU), and for the disk a
real full filesystem: a small tmpfs mounted in a private mount namespace (``unshare -m``,
root only), in which the trainer, the export, the run page, the metrics writer and the
image writer run until the disk is full. Two further disk-full tests inject ENOSPC at the
file-write layer (said in their docstrings) for what a real full disk does not reach
reliably: the publication of ``latest`` and a metrics line cut in the middle.

Run as a script (``python test_safety_training.py SCENARIO_ARGS``) it is the scenario run
inside the mount namespace; see :func:`_disk_full_scenario`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if __name__ == "__main__":  # the scenario, run by the disk-full test in its own namespace
    sys.path[:0] = [str(REPO), str(HERE)]

from make_test_shards import write_dataset  # noqa: E402

# DeepSpeed 0.19 calls collectives and torch.jit APIs that torch 2.13 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

#: One stage of 4 steps of 2 samples, a checkpoint every 2 steps, stopped at step 2 or 4.
STAGE = "stages=[{name: a, dataset: s96_g10m, img_size: 96, samples: 8, blr: 0.1}]"
FAST = ["num_workers=0", "bf16=false", "micro_batch=2", "global_batch=2", "log_every=1",
        "checkpoint_every=2", "image_every=1000", STAGE]


def _main(overrides: list[str], *flags: str) -> int:
    from training.pretrain import main

    return main([a for o in overrides for a in ("--set", o)] + list(flags))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error")]
    assert len(err) == 1, err
    return err[0]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- 1. shard paths


def _dataset(tmp_path: Path) -> tuple[Path, dict]:
    """A one-data-set manifest three folders down (so ``../../`` stays inside tmp_path) and
    a real shard outside the dataset, where a traversal would lead."""
    manifest = write_dataset(tmp_path / "a" / "b" / "ds", sizes={"s96_g10m": 96},
                             samples={"train": 3, "val": 2}, shard_size=3)
    (tmp_path / "a" / "other").mkdir()
    shutil.copy(manifest.parent / "s96_g10m" / "train-000000.tar",
                tmp_path / "a" / "other" / "x.tar")
    return manifest, json.loads(manifest.read_text())


def _list_shard(manifest: Path, data: dict, path: str) -> None:
    data["datasets"]["s96_g10m"]["splits"]["train"]["shards"][0]["path"] = path
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize(("path", "why"), [
    ("../../other/x.tar", "is not a relative path of plain names inside the dataset"),
    ("/etc/passwd", "is not a relative path inside the dataset"),
    ("s96_g10m\\train-000000.tar", "is not a relative path inside the dataset"),
    ("s96_g10m/train-000000.tar\x00", "is not a relative path of plain names inside the dataset"),
], ids=["dotdot", "absolute", "backslash", "nul"])
def test_a_shard_path_leaving_the_dataset_is_refused_before_anything_is_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, why: str) -> None:
    from training import data as tdata
    from training.config import load_config
    from training.errors import DataError, UnsafeShardPath

    manifest, data = _dataset(tmp_path)
    _list_shard(manifest, data, path)

    def opened(*_: object) -> None:
        raise AssertionError("a shard was looked at before the path was checked")

    monkeypatch.setattr(tdata, "_missing_shards", opened)
    monkeypatch.setattr(tdata, "open_shard", opened)
    model = load_config().model_for(load_config().stages[0])
    with pytest.raises(UnsafeShardPath) as info:
        tdata.read_shard_set(manifest, "s96_g10m", "train", model)
    assert isinstance(info.value, DataError)
    assert str(info.value) == f"manifest '{manifest}': shard path {path!r} {why}: refused"
    assert "\n" not in str(info.value) and "\x00" not in str(info.value)


def test_a_link_leading_out_of_the_dataset_is_refused(tmp_path: Path) -> None:
    from training.config import load_config
    from training.data import read_shard_set
    from training.errors import UnsafeShardPath

    manifest, data = _dataset(tmp_path)
    (manifest.parent / "s96_g10m" / "evil.tar").symlink_to(tmp_path / "a" / "other" / "x.tar")
    _list_shard(manifest, data, "s96_g10m/evil.tar")
    model = load_config().model_for(load_config().stages[0])
    with pytest.raises(UnsafeShardPath, match=r"shard path 's96_g10m/evil.tar' leads outside "
                                              r".*\(a link\): refused$"):
        read_shard_set(manifest, "s96_g10m", "train", model)
    # A link that stays inside the dataset is still a shard like any other.
    (manifest.parent / "s96_g10m" / "evil.tar").unlink()
    (manifest.parent / "s96_g10m" / "same.tar").symlink_to("train-000000.tar")
    _list_shard(manifest, data, "s96_g10m/same.tar")
    ss = read_shard_set(manifest, "s96_g10m", "train", model)
    assert ss.shards[0] == str((manifest.parent / "s96_g10m" / "train-000000.tar").resolve())


@pytest.mark.parametrize("path", ["../../x.tar", "/etc/passwd", "s96_g10m\\x.tar"])
def test_a_url_manifest_is_checked_alike(manifest: Path, path: str) -> None:
    """An fsspec URL manifest (the in-memory filesystem here, S3 in production): the shard
    path is refused before any listing or download."""
    import fsspec

    from training.config import load_config
    from training.data import read_shard_set
    from training.errors import UnsafeShardPath

    data = json.loads(manifest.read_text())
    data["datasets"]["s96_g10m"]["splits"]["train"]["shards"][1]["path"] = path
    url = f"memory://safety-{abs(hash(path))}/ds/manifest.json"
    with fsspec.open(url, "w") as fh:
        fh.write(json.dumps(data))
    model = load_config().model_for(load_config().stages[0])
    with pytest.raises(UnsafeShardPath) as info:
        read_shard_set(url, "s96_g10m", "train", model)
    assert str(info.value).startswith(f"manifest '{url}': shard path {path!r} is not a relative")


def test_the_trainer_prints_one_line_and_exits_2(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    manifest, data = _dataset(tmp_path)
    _list_shard(manifest, data, "../../other/x.tar")
    assert _main([f"manifest={manifest}", f"output_dir={tmp_path / 'run'}", *FAST]) == 2
    assert _one_error_line(capsys) == (
        f"error: manifest '{manifest}': shard path '../../other/x.tar' is not a relative path "
        "of plain names inside the dataset: refused")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 2. run page


def _page_run(tmp_path: Path) -> Path:
    """A run directory as the trainer leaves it: config, a stage_start and three loss lines."""
    from training.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, ["name=page"])))
    start = {"event": "stage_start", "stage": "stage1_96px", "stage_index": 0,
             "dataset": "s96_g10m/train", "img_size": 96, "world_size": 1, "device": "cpu",
             "micro_batch": 4, "accumulation": 2, "effective_batch": 8, "blr": 0.1,
             "lr": 0.003, "steps": 200, "warmup_steps": 12, "tokens_per_step": 4608,
             "step": 0, "resumed_at_stage_step": None}
    lines = [start] + [
        {"step": s, "stage": "stage1_96px", "stage_step": s, "samples": 8 * s, "loss": 1.5 / s,
         "loss_token": 0.5 / s, "loss_spectral": 1.0 / s, "lr": 0.003, "samples_per_s": 50.0,
         "tokens_per_s": 28800.0, "step_time_s": 0.16, "data_wait_s": 0.01, "grad_norm": 1.2,
         "time": 1.7e9 + s} for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


SCRIPT = "<script>alert(1)</script>"


def test_a_string_in_a_logged_number_is_escaped(tmp_path: Path) -> None:
    """A value the page prints without computing with it (``samples`` in the headline)."""
    from training.run_page import write_run_page

    run = _page_run(tmp_path)
    lines = _metrics(run)
    lines[-1]["samples"] = SCRIPT
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    html = write_run_page(run).read_text()
    assert "<script" not in html.lower()
    # The record is skipped and counted, the one before it stands.
    assert "1 line(s) of metrics.jsonl are not JSON records of the trainer's kind" in html
    assert '<span id="step-count">20</span>' in html


def test_tampered_values_everywhere_are_escaped_or_skipped(tmp_path: Path) -> None:
    from training.run_page import main

    run = _page_run(tmp_path)
    lines = _metrics(run)
    lines[0].update(dataset=SCRIPT, device=SCRIPT, steps=SCRIPT, micro_batch=SCRIPT,
                    resumed_at_stage_step=SCRIPT)
    good = lines[-1]
    lines.append({"step": 40, "loss": SCRIPT})  # the example, nothing else
    lines.append({**good, "step": 50, "stage_step": 50, "loss": SCRIPT})
    lines.append({**good, "step": 60, "stage_step": 60, "stage": SCRIPT})
    lines.append({"event": "config_change", "step": 20, "stage": "stage1_96px",
                  "checkpoint": "global_step20", "keys": [SCRIPT, "stages.0.blr"]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    tag = "<b onmouseover=alert(1)>"
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag)
    (run / "checkpoints" / tag / "trainer_state.json").write_text(json.dumps({
        "stage_index": 0, "stage_name": SCRIPT, "step_in_stage": SCRIPT, "stage_steps": 200,
        "global_step": SCRIPT, "samples_seen": SCRIPT, "world_size": SCRIPT}))
    (run / "train.log").write_text(f"00:00:00 WARNING {SCRIPT}\n")
    assert main([str(run)]) == 0
    html = (run / "report" / "index.html").read_text()
    assert "<script" not in html.lower() and "<b onmouseover" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert html.count(escaped) >= 5  # dataset, device, stage, config change, checkpoint, log
    assert "&lt;b onmouseover=alert(1)&gt;" in html
    assert "2 line(s) of metrics.jsonl are not JSON records" in html  # the two string losses
    assert f"step 20: {escaped}, stages.0.blr" in html


# --------------------------------------------------------------------------- 3. resume config


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A run stopped at step 2 of 4 (checkpoint global_step2) and the overrides that made it."""
    root = tmp_path_factory.mktemp("resume")
    manifest = write_dataset(root / "shards", sizes={"s96_g10m": 96},
                             samples={"train": 6, "val": 2}, shard_size=3)
    overrides = [f"manifest={manifest}", *FAST]
    assert _main([*overrides, f"output_dir={root / 'run'}", "stop_at_step=2"]) == 0
    return root / "run", overrides


def _copy(stopped: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    run, overrides = stopped
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", [*overrides, f"output_dir={tmp_path / 'run'}"]


def test_resume_refuses_a_changed_data_or_optimisation_config(
        stopped: tuple[Path, list[str]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, overrides = _copy(stopped, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    rc = _main([*overrides, "global_batch=4", "hflip=false", "stages.0.blr=0.2"], "--resume")
    assert rc == 2
    assert _one_error_line(capsys) == (
        "error: --resume: the config differs from checkpoint global_step2 in global_batch "
        "(2 -> 4), hflip (true -> false), stages.0.blr (0.1 -> 0.2); resume with the config "
        "the run started with, or pass --allow-config-change to change it deliberately")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_allows_new_stop_and_output_settings(stopped: tuple[Path, list[str]],
                                                    tmp_path: Path) -> None:
    from training import checkpoint

    run, overrides = _copy(stopped, tmp_path)  # output_dir differs from the checkpoint's too
    rc = _main([*overrides, "stop_at_step=3", "log_every=3", "checkpoint_every=3",
                "image_every=500", "keep_checkpoints=1"], "--resume")
    assert rc == 0
    assert checkpoint.resolve(run)[1] == "global_step3"
    assert not [r for r in _metrics(run) if r.get("event") == "config_change"]


def test_allow_config_change_logs_records_and_carries_the_new_config(
        stopped: tuple[Path, list[str]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from training import checkpoint

    run, overrides = _copy(stopped, tmp_path)
    assert _main([*overrides, "stages.0.blr=0.2"], "--resume", "--allow-config-change") == 0
    events = [r for r in _metrics(run) if r.get("event") == "config_change"]
    assert events == [{"event": "config_change", "step": 2, "stage": "a",
                       "checkpoint": "global_step2", "keys": ["stages.0.blr"],
                       "changes": {"stages.0.blr": {"checkpoint": 0.1, "now": 0.2}}}]
    log = (run / "train.log").read_text()
    assert "WARNING --allow-config-change: resuming global_step2 with a changed config: " \
           "stages.0.blr 0.1 -> 0.2" in log
    state = checkpoint.read_state(*checkpoint.resolve(run))
    assert state.global_step == 4 and state.config["stages"][0]["blr"] == 0.2
    # The checkpoint now holds the new value: it is what a next resume must keep.
    capsys.readouterr()
    assert _main([*overrides, "stages.0.blr=0.1"], "--resume") == 2
    assert "stages.0.blr (0.2 -> 0.1)" in _one_error_line(capsys)
    assert _main([*overrides, "stages.0.blr=0.2"], "--resume") == 0


def test_allow_config_change_needs_resume(manifest: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = _main([f"manifest={manifest}", f"output_dir={tmp_path / 'run'}"],
               "--allow-config-change")
    assert rc == 2
    assert _one_error_line(capsys) == "error: --allow-config-change only applies to --resume"


def test_config_changes_names_the_data_read_and_refuses_structural_changes(
        manifest: Path) -> None:
    import copy

    from training.config import load_config
    from training.data import read_shard_set
    from training.errors import ConfigError
    from training.pretrain import config_changes

    run = load_config(None, [f"manifest={manifest}"])
    sets = [read_shard_set(manifest, s.dataset, s.split, run.model_for(s)) for s in run.stages]
    saved = run.to_dict()
    data = sets[0].describe()
    assert config_changes(run, saved, 0, data, sets) == {}
    # Same keys, other data: the manifest was refreshed under dataset_version: latest.
    old = {**data, "version": 1, "mean": [m + 1 for m in data["mean"]]}
    changed = config_changes(run, saved, 0, old, sets)
    assert list(changed) == ["stages.0.data"]
    assert changed["stages.0.data"]["checkpoint"]["version"] == 1
    # Stage-level batch keys left unset are absent on both sides: no change.
    assert "stages.1.micro_batch" not in config_changes(run, saved, 1)
    other = copy.deepcopy(saved)
    other["stages"][1]["micro_batch"] = 2
    assert config_changes(run, other, 1) == {
        "stages.1.micro_batch": {"checkpoint": 2, "now": None}}
    other = copy.deepcopy(saved)
    other["model"]["mask_ratio"] = 0.75
    with pytest.raises(ConfigError, match="the model section differs"):
        config_changes(run, other, 0)
    other = copy.deepcopy(saved)
    other["stages"][0]["img_size"] = 64
    with pytest.raises(ConfigError, match=r"stages.0.img_size changed from 64 to 96"):
        config_changes(run, other, 0)
    # A later stage's image size is an ordinary (flagged) change.
    other = copy.deepcopy(saved)
    other["stages"][1]["img_size"] = 96
    assert list(config_changes(run, other, 0)) == ["stages.1.img_size"]


# --------------------------------------------------------------------------- 4. disk full


@pytest.fixture(scope="module")
def process_group() -> None:
    """A world of one (DeepSpeed needs torch.distributed even for one process)."""
    from training.pretrain import _init_distributed

    _init_distributed()


def _engine():
    import deepspeed
    import torch

    from training import checkpoint
    from training.models.spectral_mae import build_model
    from training.optim import param_groups

    torch.manual_seed(0)
    model = build_model("tiny", img_size=32)
    checkpoint.mark_universal(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _state(step: int):
    from training.checkpoint import TrainerState
    from training.config import load_config

    return TrainerState(0, "a", step, 10, step, 2 * step, 1, {"consumed": [[step]]},
                        load_config().to_dict())


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_checkpoint_disk_full_keeps_latest_injected(process_group: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected into DeepSpeed's file writer (its ``checkpoint_engine.save``, which
    calls ``torch.save``) after 1000 bytes of the model file: the injected variant runs
    without root; the tmpfs test below fills a disk for real."""
    from training import checkpoint
    from training.errors import DiskFullError, human_bytes

    engine = _engine()
    assert checkpoint.save(engine, tmp_path, _state(2), keep=2) == "global_step2"
    good = _files(tmp_path)
    previous = sum((tmp_path / "global_step2" / f).stat().st_size
                   for f in os.listdir(tmp_path / "global_step2"))

    def full(state_dict: object, path: str) -> None:
        Path(path).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(engine.checkpoint_engine, "save", full)
    with pytest.raises(DiskFullError) as info:
        checkpoint.save(engine, tmp_path, _state(4), keep=2)
    message = str(info.value)
    assert message.startswith(
        f"disk full: cannot write checkpoint global_step4 at '{tmp_path / 'global_step4'}' "
        f"([Errno 28] No space left on device, 1000 B written before it failed, about "
        f"{human_bytes(previous)} needed, ")
    assert message.endswith("free now); nothing was published; 'latest' still names global_step2; "
                            "free space, then resume with --resume")
    assert info.value.exit_code == 6
    assert _files(tmp_path) == good  # the partial folder is gone, nothing else changed
    assert checkpoint.resolve(tmp_path) == (tmp_path, "global_step2")


def test_latest_is_not_moved_when_it_cannot_be_written_injected(
        process_group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected where ``latest`` is flushed (``os.fsync`` of ``.latest.tmp``): the
    last step of a save, too small to hit on a real disk at will."""
    from training import checkpoint
    from training.errors import DiskFullError

    engine = _engine()
    checkpoint.save(engine, tmp_path, _state(2), keep=2)
    good = _files(tmp_path)
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".latest.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=r"^disk full: cannot write checkpoint global_step4 "
                                            r".*'latest' still names global_step2"):
        checkpoint.save(engine, tmp_path, _state(4), keep=2)
    assert _files(tmp_path) == good and (tmp_path / "latest").read_text() == "global_step2"


def test_a_metrics_line_is_whole_or_absent_injected(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected at ``os.write`` after half of a line went out (a real full disk cuts
    lines where its last block ends; the tmpfs test shows one too)."""
    from training.errors import DiskFullError
    from training.report import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write({"step": 1, "loss": 1.0})
    before = path.read_bytes()
    record = {"step": 2, "loss": 0.5, "pad": "x" * 1000}
    size = len(json.dumps(record)) + 1
    real = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            return real(fd, data)
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(data)[:500])

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DiskFullError) as info:
        writer.write(record)
    monkeypatch.undo()
    assert str(info.value).startswith(
        f"disk full: cannot write a metrics line at '{path}' ([Errno 28] No space left on "
        f"device, 500 B written before it failed, about {size / 1024:.1f} KiB needed, ")
    assert path.read_bytes() == before  # the half line was cut off again
    writer.write(record)  # and the next write appends a whole line
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


FS_SIZE = "8m"  # one checkpoint of this run (5.4 MB) fits, a second one does not


def _unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_real_full_disk(tmp_path: Path) -> None:
    """A real full filesystem: an 8 MiB tmpfs, mounted in a private mount namespace
    (``unshare -m``, so nothing is mounted outside this test), holds the run directory.

    In it (see :func:`_disk_full_scenario`): the trainer saves its step-2 checkpoint and runs
    out of space in the step-4 one; then, with the disk filled to its last 8 KiB, a metrics
    line, a reconstruction image, an export and the run page are written; then the tmpfs
    is grown and ``--resume`` finishes the run.
    """
    if not _unshare_works():
        pytest.skip("needs root and unshare -m (a private mount namespace for a tmpfs)")
    manifest = write_dataset(tmp_path / "shards", sizes={"s96_g10m": 96},
                             samples={"train": 6, "val": 2}, shard_size=3)
    (tmp_path / "fs").mkdir()
    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT")} | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                           __file__, str(tmp_path / "fs"), str(manifest), str(results)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(results.read_text())
    fs = tmp_path / "fs"
    ckpt = f"{fs}/run/checkpoints"

    train = out["train"]
    assert train["rc"] == 6, train["stderr"][-2000:]
    assert "Traceback" not in train["stderr"] and "Logging error" not in train["stderr"]
    errors = [ln for ln in train["stderr"].splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0] == train["stderr"].strip().splitlines()[-1]
    assert errors[0].startswith(
        f"error: disk full: cannot write checkpoint global_step4 at '{ckpt}/global_step4' "
        "([Errno 28] No space left on device, ")
    assert re.search(r"written before it failed, about 5\.\d MiB needed, \d", errors[0])
    assert errors[0].endswith("nothing was published; 'latest' still names global_step2; "
                              "free space, then resume with --resume")
    assert train["latest"] == "global_step2"
    assert [f for f in train["files"] if f.startswith("run/checkpoints/")
            and not f.endswith(".py")] == [  # DeepSpeed's zero_to_fp32.py & co. beside them
        "run/checkpoints/global_step2", "run/checkpoints/global_step2/mp_rank_00_model_states.pt",
        "run/checkpoints/global_step2/trainer_state.json",
        "run/checkpoints/global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "run/checkpoints/latest"]
    assert not [f for f in train["files"] if ".tmp" in f or "probe" in f]

    metrics = out["metrics"]
    assert metrics["error"].startswith(f"disk full: cannot write a metrics line at "
                                       f"'{fs}/run/metrics.jsonl' ([Errno 28] No space left "
                                       "on device, ")
    # The line was cut in the middle by the full disk, then cut back off.
    written = re.search(r"device, ([\d.]+) (B|KiB) written before it failed, about 195\.4 KiB "
                        r"needed, ", metrics["error"])
    assert written and float(written[1]) > 0 and metrics["unchanged"]

    image = out["image"]
    assert image["error"].startswith(f"disk full: cannot write an image at "
                                     f"'{fs}/run/images/b_step0000004.png' ([Errno 28] ")
    assert image["unchanged"]  # no PNG, no temporary file

    export = out["export"]
    assert export["rc"] == 6
    assert export["stderr"].strip().splitlines()[-1].startswith(
        f"error: disk full: cannot write the export at '{fs}/export/w.safetensors' "
        "([Errno 28] No space left on device, ")
    assert "Traceback" not in export["stderr"] and export["files"] == []

    page = out["page"]
    assert page["rc"] == 6 and len(page["stderr"].strip().splitlines()) == 1
    assert re.fullmatch(rf"error: disk full: cannot write the run page at '{fs}/run/report' "
                        r"\(\[Errno 28\] No space left on device, \d.* free now\); nothing was "
                        r"published", page["stderr"].strip())
    assert not [f for f in page["files"] if "report" in f]

    resume = out["resume"]
    assert resume["rc"] == 0, resume["stderr"][-2000:]
    assert resume["latest"] == "global_step4"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _disk_full_scenario(fs: Path, manifest: Path, results: Path) -> None:
    """Inside a private mount namespace: mount the tmpfs and fill it, step by step."""
    import numpy as np

    from training.errors import DiskFullError
    from training.report import MetricsWriter, save_reconstruction

    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(fs)],
                   check=True)
    run = fs / "run"
    train = [sys.executable, str(REPO / "training" / "pretrain.py"), *[
        a for o in [f"manifest={manifest}", f"output_dir={run}", *FAST, "stop_at_step=4",
                    "keep_checkpoints=2"] for a in ("--set", o)]]
    out: dict = {}

    proc = subprocess.run(train, capture_output=True, text=True, cwd=fs.parent)
    out["train"] = {"rc": proc.returncode, "stderr": proc.stderr, "files": _listing(fs),
                    "latest": (run / "checkpoints" / "latest").read_text()}

    # Fill the disk to its last 8 KiB.
    (fs / "export").mkdir()
    (run / "images").mkdir(exist_ok=True)  # the trainer's image of step 4 is there
    images = _listing(run / "images")
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.ftruncate(fd, max(os.fstat(fd).st_size - (8 << 10), 0))
    os.close(fd)

    metrics = run / "metrics.jsonl"
    before = metrics.read_bytes()
    try:
        MetricsWriter(metrics).write({"event": "pad", "step": 0, "pad": "x" * 200_000})
        out["metrics"] = {"error": None}
    except DiskFullError as exc:
        out["metrics"] = {"error": str(exc), "unchanged": metrics.read_bytes() == before}

    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 96, 96)).astype(np.float32)
    try:
        save_reconstruction(run / "images" / "b_step0000004.png", image, image,
                            (rng.random((12, 96, 96)) > 0.5).astype(np.float32),
                            ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                             "B09", "B11", "B12"))
        out["image"] = {"error": None}
    except DiskFullError as exc:
        out["image"] = {"error": str(exc)}
    out["image"]["unchanged"] = _listing(run / "images") == images

    proc = subprocess.run([sys.executable, "-m", "training.export", str(run), "--out",
                           str(fs / "export" / "w.safetensors")], capture_output=True,
                          text=True, cwd=REPO)
    out["export"] = {"rc": proc.returncode, "stderr": proc.stderr,
                     "files": _listing(fs / "export")}

    proc = subprocess.run([sys.executable, "-m", "training.run_page", str(run)],
                          capture_output=True, text=True, cwd=REPO)
    out["page"] = {"rc": proc.returncode, "stderr": proc.stderr, "files": _listing(run)}

    # Free space (and more: a second checkpoint needs it), then resume.
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=32m", str(fs)], check=True)
    proc = subprocess.run([*train, "--resume"], capture_output=True, text=True, cwd=fs.parent)
    out["resume"] = {"rc": proc.returncode, "stderr": proc.stderr,
                     "latest": (run / "checkpoints" / "latest").read_text()}
    results.write_text(json.dumps(out))


if __name__ == "__main__":
    _disk_full_scenario(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
