"""Training under faults: kill -9 during a checkpoint write and at seeded random moments,
then ``--resume``; truncated and corrupt shards and bad samples at training time.

The kills hit real ``python training/pretrain.py`` processes (1 process, 1 DataLoader worker,
the tiny preset on the seeded shards of tests/training/make_test_shards.py); the bad-data
runs are in-process. About 2-3 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.training.make_test_shards import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
# Micro-batch 2, one step per 2 samples: short steps, so saves come often.
FAST = ["bf16=false", "num_workers=1", "micro_batch=2", "global_batch=2", "log_every=1",
        "image_every=1000", "keep_checkpoints=2",
        f"stages=[{{name: a, dataset: s96_g10m, img_size: 96, samples: {2 * STEPS}}}]"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shards"), sizes={"s96_g10m": 96},
                         samples={"train": 12, "val": 2}, shard_size=3)


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop} | {
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _start(run: Path, overrides: list[str], log: Path) -> subprocess.Popen[bytes]:
    resume = ["--resume"] if (run / "checkpoints" / "latest").is_file() else []
    args = [a for o in [f"output_dir={run}", *overrides] for a in ("--set", o)]
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "training" / "pretrain.py"), *args,
                                 *resume], cwd=run.parent, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader worker
    proc.wait()


def _latest(run: Path) -> int | None:
    """The step of the checkpoint ``latest`` names (it must be complete), or None."""
    ckpt = run / "checkpoints"
    try:
        tag = (ckpt / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    if not tag:
        return None
    state = json.loads((ckpt / tag / "trainer_state.json").read_text())
    assert state["global_step"] == int(tag.removeprefix("global_step"))
    return int(state["global_step"])


def _in_flight(run: Path, latest: int) -> int | None:
    """A checkpoint folder newer than ``latest``: a save under way."""
    steps = [int(p.name.removeprefix("global_step"))
             for p in (run / "checkpoints").glob("global_step*") if p.name[11:].isdigit()]
    newer = [s for s in steps if s > latest]
    return min(newer) if newer else None


def _finish(run: Path, overrides: list[str], log: Path) -> str:
    proc = _start(run, overrides, log)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"resumed run timed out:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _losses(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_sigkill_during_a_checkpoint_write_then_resume(manifest: Path, tmp_path: Path,
                                                       report) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    overrides = [f"manifest={manifest}", "checkpoint_every=1", *FAST]
    proc = _start(run, overrides, log)
    seen: tuple[int, int, bool] | None = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            latest = _latest(run) if (run / "checkpoints").is_dir() else None
            flight = _in_flight(run, latest) if latest is not None else None
            if flight is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                partial = run / "checkpoints" / f"global_step{flight}"
                seen = (latest, flight, (partial / "trainer_state.json").is_file())
                break
            time.sleep(0.002)
    finally:
        _kill(proc)
    assert seen is not None, f"no save was caught in flight:\n{log.read_text()[-2000:]}"
    latest, flight, state_written = seen
    assert _latest(run) == latest < flight  # latest still names the last complete save
    text = _finish(run, overrides, log)
    assert f"run step {latest}" in text.split("resuming", 1)[1].splitlines()[0]
    assert _latest(run) == STEPS
    after = _losses(run)
    assert after[-(STEPS - latest):] == list(range(latest + 1, STEPS + 1))
    report("SIGKILL during a checkpoint write",
           f"kill -9 while global_step{flight} was being written (trainer_state.json "
           f"{'written' if state_written else 'not yet written'}, latest = global_step{latest})",
           f"--resume continued from step {latest}, finished at step {STEPS}")


def test_sigkill_at_seeded_random_moments_then_resume(manifest: Path, tmp_path: Path,
                                                      report) -> None:
    rng = random.Random(20260101)
    run, log = tmp_path / "run", tmp_path / "train.log"
    overrides = [f"manifest={manifest}", "checkpoint_every=3", *FAST]
    kills, resumed_at = [], []
    for _ in range(2):
        before = _latest(run) or 0
        proc = _start(run, overrides, log)
        delay = rng.uniform(0.0, 1.5)
        try:
            deadline = time.time() + 240
            while (_latest(run) or 0) <= before and proc.poll() is None:
                assert time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.01)
            time.sleep(delay)  # a random moment after a fresh save: mid-step or mid-save
        finally:
            _kill(proc)
        kills.append(f"{delay:.2f}s")
        latest = _latest(run)
        assert latest is not None and latest % 3 == 0 and latest > before
        resumed_at.append(latest)
        if latest >= STEPS - 3:
            break
    text = _finish(run, overrides, log)
    # Every resume started from the last complete checkpoint at the time of the kill.
    starts = [line.split("run step ", 1)[1].split()[0] for line in text.splitlines()
              if "resuming" in line]
    assert [int(s) for s in starts] == resumed_at
    assert _latest(run) == STEPS and _losses(run)[-1] == STEPS
    report("SIGKILL at seeded random moments",
           f"kill -9 {', '.join(kills)} after a fresh checkpoint (seed 20260101)",
           f"resumed from steps {', '.join(map(str, resumed_at))}; finished at step {STEPS}")


# --------------------------------------------------------------------------- bad data


def _main(*overrides: str) -> int:
    from training.pretrain import main

    return main([a for o in overrides for a in ("--set", o)])


def _bad_data_run(manifest: Path, out: Path, *extra: str) -> int:
    return _main(f"manifest={manifest}", f"output_dir={out}", "num_workers=0", "bf16=false",
                 "micro_batch=2", "global_batch=2", "log_every=2", "checkpoint_every=100",
                 "image_every=100", "stages=[{name: a, dataset: s96_g10m, img_size: 96, "
                 "samples: 24}]", *extra)


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of 4 shards: shard 0 cut in half, shard 1 garbage, shard 2 with one chip of
    each wrong kind (shape, dtype, pickled object array) beside 3 good ones."""
    manifest = write_dataset(tmp_path / "shards", sizes={"s96_g10m": 96},
                             samples={"train": 12}, shard_size=3)
    shards = manifest.parent / "s96_g10m"
    data = (shards / "train-000000.tar").read_bytes()
    (shards / "train-000000.tar").write_bytes(data[: len(data) // 2])
    size = (shards / "train-000001.tar").stat().st_size
    (shards / "train-000001.tar").write_bytes(
        np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    marker = tmp_path / "pickle-ran"
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(shards / "train-000002.tar")) as sink:
        for i in range(3):
            chip = rng.integers(1, 10000, (12, 96, 96), dtype=np.uint16)
            sink.write({"__key__": f"good{i}", "npy": _npy(chip), "json": {}})
        sink.write({"__key__": "shape", "npy": _npy(np.ones((12, 48, 48), np.uint16)),
                    "json": {}})
        sink.write({"__key__": "dtype", "npy": _npy(np.ones((12, 96, 96), np.float32)),
                    "json": {}})
        sink.write({"__key__": "pickle", "npy": _npy(np.array([_Payload(marker)], dtype=object),
                                                     allow_pickle=True), "json": {}})
    man = json.loads(manifest.read_text())
    entry = man["datasets"]["s96_g10m"]["splits"]["train"]["shards"][2]
    entry.update(bytes=(shards / "train-000002.tar").stat().st_size, num_samples=6)
    manifest.write_text(json.dumps(man))
    return manifest, marker


def test_bad_shards_and_samples_are_skipped_and_counted(damaged: tuple[Path, Path],
                                                        tmp_path: Path, report) -> None:
    manifest, marker = damaged
    out = tmp_path / "run"
    assert _bad_data_run(manifest, out) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in lines if r.get("event") == "bad_data"]
    assert bad, "no bad_data line in metrics.jsonl"
    assert bad[-1]["bad_shards"] == 2 and bad[-1]["bad_samples"] % 3 == 0
    assert bad[-1]["bad_samples"] >= 3
    assert [r["step"] for r in lines if "loss" in r][-1] == 12
    assert not marker.exists()
    report("corrupt shards at training time",
           "shard cut in half; shard of random bytes (same size); chips of wrong shape, "
           "dtype and a pickled object array (on_bad_data: skip)",
           f"skipped with warnings, bad_shards={bad[-1]['bad_shards']} "
           f"bad_samples={bad[-1]['bad_samples']} in metrics.jsonl; 12/12 steps; "
           f"nothing unpickled")


def test_on_bad_data_fail_stops_the_run_naming_the_shard(
        damaged: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        report) -> None:
    manifest, _ = damaged
    capsys.readouterr()
    rc = _bad_data_run(manifest, tmp_path / "run", "on_bad_data=fail")
    err = capsys.readouterr().err.strip().splitlines()
    # The first bad thing the stream meets: a damaged shard or a wrong chip in shard 2.
    assert rc == 2 and err[-1].startswith("error: ") and "on_bad_data: fail" in err[-1]
    assert "is unreadable" in err[-1] or "expected uint16 [12, 96, 96]" in err[-1], err[-1]
    what = "shard" if "is unreadable" in err[-1] else "sample"
    report("corrupt shard, on_bad_data: fail", "the same shards",
           f"exit 2, one line on stderr naming the first bad {what} and on_bad_data")
