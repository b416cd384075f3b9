"""The same build on a real Dask cluster (a scheduler and two workers as separate processes
on 127.0.0.1) gives the same dataset as a local run, sample by sample."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.build_shards import main
from tests.helpers.paths import REPO
from tests.pipeline.conftest import read_dataset, shard_files


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path_factory.mktemp("dask")
    procs = [
        subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                          "--no-dashboard"], env=env, stdout=open(log / "s.log", "w"), stderr=subprocess.STDOUT)
    ]
    time.sleep(2)
    for i in range(2):
        procs.append(subprocess.Popen(
            [str(bindir / "dask"), "worker", addr, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}",
             "--local-directory", str(log / f"w{i}")],
            env=env, cwd=str(log), stdout=open(log / f"w{i}.log", "w"), stderr=subprocess.STDOUT,
        ))
    from distributed import Client

    with Client(addr, timeout="30s") as c:
        c.wait_for_workers(2, timeout=60)
    try:
        yield addr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_cluster_build_equals_local(cluster: str, sample_dataset: Path, tmp_path: Path) -> None:
    from distributed import Client

    out = tmp_path / "remote"
    assert main(["--aoi", "europe", "--scheduler", cluster, "--output", str(out)]) == 0
    with Client(cluster) as c:  # the cube work really ran on the two workers
        done = c.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert len(done) == 2 and all(n > 0 for n in done.values())
    a, b = read_dataset(sample_dataset), read_dataset(out)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k]["npy"], b[k]["npy"])
        assert a[k]["json"] == b[k]["json"]
    assert shard_files(sample_dataset) == shard_files(out)


def test_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    assert main(["--aoi", "ireland", "--scheduler", f"tcp://127.0.0.1:{_free_port()}", "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
