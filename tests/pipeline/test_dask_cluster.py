"""The build on a real Dask cluster whose workers share no disk with the client.

A `dask scheduler` and two `dask worker` processes on 127.0.0.1; each worker runs in its own
mount namespace (`unshare -m`) with private tmpfs mounts over /tmp (the client's output,
temporary and pytest folders) and the client's cache folder, so no file the client writes is
visible to it. COGs are served over HTTP on loopback and the output is an S3 API on loopback
(moto). The dataset must equal a local build sample for sample and byte for byte, also with
a worker killed part way or the client killed and restarted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.build_shards import main
from tests.helpers.faulty_http import FaultPolicy, rewrite_hrefs_to_http, serve_files
from tests.helpers.loopback import free_port
from tests.helpers.paths import REPO
from tests.helpers.s3 import moto_s3
from tests.pipeline.test_resume import _assert_same_dataset

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs unshare and root (mount namespaces), as on CI")

# one unit per sample grid (11 units), two specs: enough tasks to spread over two workers
CONFIG = "pack_pixels: 14400\ntiling: [96, {size: 32, gsd: 20}]\nretries: 1\nretry_backoff_s: 0.2\n"
UNITS = 11
BUCKET = "eo-datasets"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def http_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FaultPolicy]]:
    """The sample catalog with its COGs served over HTTP (the workers read by URL only)."""
    d = tmp_path_factory.mktemp("http")
    shutil.copytree(REPO / "catalogs" / "sample", d / "catalog")
    with serve_files(d / "catalog") as (url, policy):
        rewrite_hrefs_to_http(d / "catalog", url)
        yield d / "catalog" / "catalog.json", policy


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "cluster.yaml"
    p.write_text(CONFIG)
    return p


@pytest.fixture(scope="module")
def local_reference(http_catalog: tuple[Path, FaultPolicy], config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "ds"
    assert main(["--catalog", str(http_catalog[0]), "--config", str(config), "--output", str(out)]) == 0
    return out


class Cluster:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.env = env
        dask = str(Path(sys.executable).parent / "dask")
        self.scheduler = subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            env=env, stdout=open(log_dir / "scheduler.log", "w"), stderr=subprocess.STDOUT)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for i in range(2):
                self.start_worker(f"w{i}")
            self.wait_for(2)
        except BaseException:
            self.close()  # a cluster that did not come up leaves no process behind
            raise

    def start_worker(self, name: str) -> None:
        dask = str(Path(sys.executable).parent / "dask")
        cache = Path.home() / ".cache" / "spectralgpt"
        # the worker sees none of the client's files: fresh tmpfs over /tmp and the cache. A
        # checkout or environment under /tmp (a CI clone, say) is bound back over the tmpfs:
        # the worker gets the code, still none of the client's data, outputs or caches.
        keep = sorted({p for p in (REPO, Path(sys.prefix)) if p.is_relative_to("/tmp")})
        keep = [p for p in keep if not any(p != q and p.is_relative_to(q) for q in keep)]
        held = [f"/mnt/keep{i}" for i in range(len(keep))]
        script = " && ".join(
            (["mount -t tmpfs tmpfs /mnt"] if keep else [])  # the hold points, private to the worker
            + [f"mkdir -p {h} && mount --bind {p} {h}" for p, h in zip(keep, held, strict=True)]
            + ["mount -t tmpfs tmpfs /tmp"]
            + [f"mkdir -p {p} && mount --move {h} {p}" for p, h in zip(keep, held, strict=True)]
            + [f"mkdir -p {cache} && mount -t tmpfs tmpfs {cache} && cd /tmp && "
               f"exec {dask} worker {self.address} --nthreads 1 --no-nanny --no-dashboard --name {name} "
               f"--local-directory /tmp/{name}"])
        self.workers[name] = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=self.env,
            stdout=open(self.log_dir / f"{name}.log", "w"), stderr=subprocess.STDOUT)

    def wait_for(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s", set_as_default=False) as c:
            c.wait_for_workers(n, timeout=60)

    def executed(self) -> dict[str, int]:
        from distributed import Client

        with Client(self.address, timeout="30s", set_as_default=False) as c:
            return c.run(lambda dask_worker: dask_worker.state.executed_count)

    def close(self) -> None:
        for p in [*self.workers.values(), self.scheduler]:
            p.terminate()
        for p in [*self.workers.values(), self.scheduler]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # the workers get the S3 endpoint and credentials from their environment, nothing else
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    c = Cluster(tmp_path_factory.mktemp("dask"), env)
    try:
        yield c
    finally:
        c.close()


def _download(url: str, dst: Path) -> Path:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.get(url.removeprefix("s3://") + "/", str(dst), recursive=True)
    return dst


def _records(url: str) -> list[str]:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    try:
        return [p for p in fs.find(url.removeprefix("s3://") + "/_work/v0001/units") if p.endswith(".json")]
    except FileNotFoundError:
        return []


def test_isolated_workers_build_on_s3_equals_a_local_build(cluster: Cluster, http_catalog: tuple[Path, FaultPolicy],
                                                           config: Path, local_reference: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRALGPT_STATE", str(tmp_path / "state"))
    before = cluster.executed()
    url = f"s3://{BUCKET}/cluster/a"
    assert main(["--catalog", str(http_catalog[0]), "--config", str(config), "--scheduler", cluster.address,
                 "--output", url]) == 0
    after = cluster.executed()
    assert all(after[w] > before.get(w, 0) for w in after) and len(after) == 2, (before, after)
    _assert_same_dataset(local_reference, _download(url, tmp_path / "a"))
    # the client kept nothing but the dataset's lock on its disk
    assert [p.name for p in (tmp_path / "state").rglob("*") if p.is_file()] == [".lock"]


def test_a_local_output_the_workers_cannot_see_is_one_line(cluster: Cluster, http_catalog: tuple[Path, FaultPolicy],
                                                           config: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "only-here"
    rc = main(["--catalog", str(http_catalog[0]), "--config", str(config), "--scheduler", cluster.address,
               "--output", str(out)])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert rc == 2 and len(errors) == 1
    assert "cannot see the output" in errors[0] and "do not share the client's disk" in errors[0]
    assert not (out / "manifest.json").exists() and not list(out.glob("s*/*.tar"))


def test_client_killed_at_random_moments_resumes_only_unfinished_units(
        cluster: Cluster, http_catalog: tuple[Path, FaultPolicy], config: Path, local_reference: Path,
        tmp_path: Path) -> None:
    """kill -9 of the client (a subprocess) at random moments; each run again submits only the
    units without a completion record, and the last one gives the local build's dataset."""
    url = f"s3://{BUCKET}/cluster/killed-client"
    cmd = [sys.executable, "-m", "pipeline.build_shards", "--catalog", str(http_catalog[0]), "--config", str(config),
           "--scheduler", cluster.address, "--output", url]
    env = {**os.environ, "SPECTRALGPT_STATE": str(tmp_path / "state")}
    policy = http_catalog[1]
    policy.rate, policy.kinds, policy.slow_s = 1.0, ("slow",), 0.02  # every COG request 20 ms late: units take a while
    policy.__post_init__()
    try:
        t = time.monotonic()
        timing = subprocess.run([*cmd[:-1], f"{url}-timing"], env=env, capture_output=True, text=True, timeout=600)
        assert timing.returncode == 0, timing.stderr[-2000:]
        seconds = time.monotonic() - t
        rng = random.Random(7)
        kills_mid_units = resumed = 0
        for _ in range(8):
            recorded = len(_records(url))
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(rng.uniform(0.45, 0.85) * seconds)
            finished_alone = p.poll() is not None
            if not finished_alone:
                p.send_signal(signal.SIGKILL)
                kills_mid_units += len(_records(url)) < UNITS  # else it landed while publishing
            out = p.communicate()[0]
            m = re.search(r"units: (\d+) planned \(\d+ grids\), (\d+) finished by an earlier run, (\d+) to run", out)
            if m:  # this run got as far as planning: it submitted exactly the units without a record
                planned, finished, to_run = map(int, m.groups())
                assert planned == UNITS and finished >= recorded and to_run == UNITS - finished, (recorded, m.group(0))
                resumed += finished > 0
            if finished_alone:
                assert p.returncode == 0, out[-2000:]
                break
            assert p.returncode == -signal.SIGKILL
            time.sleep(0.5)  # tasks of the killed client that were running may still finish
        else:
            pytest.fail("the build never finished within 8 runs")
        assert kills_mid_units >= 1 and resumed >= 1, (kills_mid_units, resumed)
    finally:
        policy.rate, policy.kinds = 0.0, ()
        policy.__post_init__()
    _assert_same_dataset(local_reference, _download(url, tmp_path / "killed-client"))


def test_a_worker_killed_part_way_gives_the_same_dataset(cluster: Cluster, http_catalog: tuple[Path, FaultPolicy],
                                                         config: Path, local_reference: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of one worker after the first unit finished and before the last: Dask runs its
    units on the other worker, and the dataset is the same."""
    monkeypatch.setenv("SPECTRALGPT_STATE", str(tmp_path / "state"))
    url = f"s3://{BUCKET}/cluster/killed-worker"
    policy = http_catalog[1]
    policy.rate, policy.kinds, policy.slow_s = 1.0, ("slow",), 0.02
    policy.__post_init__()
    result: dict[str, int] = {}
    build = threading.Thread(target=lambda: result.setdefault("rc", main([
        "--catalog", str(http_catalog[0]), "--config", str(config), "--scheduler", cluster.address, "--output", url])))
    victim = cluster.workers["w1"]
    try:
        build.start()
        deadline = time.monotonic() + 300
        while not _records(url) and time.monotonic() < deadline and build.is_alive():
            time.sleep(0.05)
        done_at_kill = len(_records(url))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        build.join(timeout=600)
    finally:
        policy.rate, policy.kinds = 0.0, ()
        policy.__post_init__()
    assert victim.returncode == -signal.SIGKILL
    assert 1 <= done_at_kill < UNITS, f"the kill did not land part way ({done_at_kill} of {UNITS} units done)"
    assert result.get("rc") == 0
    _assert_same_dataset(local_reference, _download(url, tmp_path / "b"))
    cluster.start_worker("w1")  # for any test after this one
    cluster.wait_for(2)


def test_unreachable_scheduler_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    assert main(["--aoi", "ireland", "--scheduler", address, "--output", str(tmp_path / "o")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "cannot reach the Dask scheduler" in errors[0] and address in errors[0]
    assert not (tmp_path / "o").exists()
