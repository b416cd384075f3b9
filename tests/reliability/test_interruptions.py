"""Interruptions: kill -9 at random moments of build_shards and refresh (several seeds).

The next run completes with exactly the dataset an uninterrupted run makes; no partial
shard is ever visible under its final name; the last published version stays readable;
no loopback STAC server outlives a killed build. (Training interruptions:
test_training_faults.py.)
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.refresh import main as refresh_main
from tests.helpers.paths import REPO
from tests.pipeline.conftest import read_dataset, shard_files
from tests.pipeline.test_refresh import _catalog, v1  # noqa: F401  (module fixture)
from tests.pipeline.test_resume import _assert_same_dataset, reference  # noqa: F401  (module fixture)


def _build_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.build_shards", "--config", str(cfg), "--output", str(out)]


@pytest.fixture(scope="module")
def build_seconds(reference: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> float:
    """Wall time of one uninterrupted build as a subprocess on this machine, so that kill
    moments fall inside a run whatever the machine's speed."""
    t = time.monotonic()
    subprocess.run(_build_cmd(reference[0], tmp_path_factory.mktemp("timing") / "out"), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return time.monotonic() - t


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_build_and_resume_equals_uninterrupted(reference: tuple[Path, Path], build_seconds: float, tmp_path: Path, seed: int, report) -> None:  # type: ignore[no-untyped-def]
    cfg, ref = reference
    out = tmp_path / "killed"
    rng = random.Random(seed)
    cmd = _build_cmd(cfg, out)
    kills = 0
    ref_shards = shard_files(ref)
    for _attempt in range(4):  # four runs killed at random moments, then one left to finish
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # anywhere from start-up (imports, loopback STAC server, Dask) to the last shard
        deadline = time.monotonic() + rng.uniform(0.1, 0.8) * build_seconds
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is not None:
            assert p.returncode == 0
            continue
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        # a killed run never leaves a partial shard under its final name: every final-named
        # shard already equals the uninterrupted run's shard of that name, byte for byte
        for name, data in shard_files(out).items():
            assert data == ref_shards[name], f"{name} is visible but differs from the reference"
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    orphans = subprocess.run(["pgrep", "-f", f"pipeline.stac_server .*{REPO}/catalogs/sample"], capture_output=True, text=True)
    report(f"kill -9 of build_shards (seed {seed})", f"{kills} kill(s) at random moments",
           f"resumed; identical dataset: {shard_files(out) == shard_files(ref)}; orphan STAC servers: {len(orphans.stdout.split())}")
    assert not orphans.stdout.split(), "a killed build left its loopback STAC server running"
    # the fault happened: kill moments are fractions of a measured build, so runs end killed
    assert kills >= 2, f"only {kills} of 4 runs were killed before they finished ({build_seconds:.1f} s build)"
    _assert_same_dataset(ref, out)
    assert not (out / "_work").exists()


@pytest.mark.slow
def test_killed_refresh_keeps_last_version_and_resumes(v1: tuple[Path, Path], tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    d, base = v1
    cat = _catalog(tmp_path, ())
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    assert refresh_main(["--catalog", str(cat), "--output", str(ref)]) == 0
    # the kill moments are fractions of a refresh measured here, as a subprocess (the same
    # work: a copy of version 1 refreshed), never a fixed clock
    timing = tmp_path / "timing"
    shutil.copytree(base, timing)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pipeline.refresh", "--catalog", str(cat), "--output", str(timing)],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    refresh_seconds = time.monotonic() - t0
    out = tmp_path / "killed"
    shutil.copytree(base, out)
    v1_manifest = (out / "manifest.json").read_bytes()
    cmd = [sys.executable, "-m", "pipeline.refresh", "--catalog", str(cat), "--output", str(out)]
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + rng.uniform(0.2, 0.8) * refresh_seconds
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        man = (out / "manifest.json").read_bytes()
        if man != v1_manifest:  # the refresh finished before the kill
            break
        # the last version stays readable and complete while a refresh is half done
        m = json.loads(man)
        for ds in m["datasets"].values():
            for sp in ds["splits"].values():
                for sh in sp["shards"]:
                    assert (out / sh["path"]).stat().st_size == sh["bytes"]
        assert len(read_dataset(out)) == sum(
            sp["num_samples"] for ds in m["datasets"].values() for sp in ds["splits"].values()
        )
    assert kills >= 1, f"no refresh was killed before it finished ({refresh_seconds:.1f} s refresh)"
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    report("kill -9 of refresh", f"{kills} kill(s) at random moments of a {refresh_seconds:.1f} s refresh",
           f"last version stayed complete; resumed; identical to an uninterrupted refresh: {shard_files(ref) == shard_files(out)}")
    a, b = read_dataset(ref), read_dataset(out)
    assert sorted(a) == sorted(b)
    assert all((a[k]["npy"] == b[k]["npy"]).all() and a[k]["json"] == b[k]["json"] for k in a)
    assert shard_files(ref) == shard_files(out)


def test_ctrl_c_exits_130_in_one_line_and_the_next_run_finishes(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) in the middle of a build: exit 130 with one line saying how to
    resume, nothing published; the same command then finishes the dataset."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "pipeline.build_shards", "--aoi", "europe", "--output", str(out)]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "_work" / "state.json").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # interrupt once the build has started its units
    assert p.poll() is None, "the build ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "interrupted: run the same command again to resume" in errors[0]
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["latest_version"] == 1


@pytest.mark.parametrize("left", [[], ["state.json.tmp-4242"]])
def test_a_build_stopped_before_its_state_file_landed_is_resumed(tmp_path: Path, left: list[str], caplog) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C (or kill -9) between making `_work/` and renaming its state file into it leaves
    an empty `_work/`, or one with the torn temporary file: that is the build's own, so the
    next run goes on (CI once hit this window); any other file there still stops it."""
    from pipeline.build_shards import main

    out = tmp_path / "ds"
    (out / "_work").mkdir(parents=True)
    for name in left:
        (out / "_work" / name).write_text('{"config_h')
    assert main(["--aoi", "europe", "--output", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["latest_version"] == 1
    assert not (out / "_work").exists()
    other = tmp_path / "other"
    (other / "_work").mkdir(parents=True)
    (other / "_work" / "state.json.tmp-x").write_text("someone else's")
    caplog.clear()
    assert main(["--aoi", "europe", "--output", str(other)]) == 2
    assert "was not made by a build" in caplog.records[-1].getMessage()
    assert (other / "_work" / "state.json.tmp-x").read_text() == "someone else's"
