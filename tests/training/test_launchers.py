"""Launchers that describe the processes in their own variables (Open MPI, MVAPICH2, MPICH/Intel
MPI, Slurm) and not in RANK: the trainer takes rank and world size from them, never defaulting
to a one-process run while a launcher said otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.loopback import free_port
from tests.helpers.paths import REPO
from training.errors import ConfigError
from training.pretrain import LAUNCHER_VARS, launcher_env


@pytest.mark.parametrize("name", list(LAUNCHER_VARS))
def test_each_launchers_variables_give_rank_and_world(name: str) -> None:
    rank, size, local, local_size = LAUNCHER_VARS[name]
    env = {rank: "3", size: "4", local: "1", local_size: "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert launcher_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_rank_from_the_launcher_wins_only_when_rank_is_unset_and_several_need_a_meeting_point() -> None:
    assert launcher_env({"RANK": "0", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == {}
    assert launcher_env({"PATH": "/bin"}) == {}
    # one process needs no meeting point; Slurm's per-node count "2(x3)" reads as 2
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "2(x3)"})["WORLD_SIZE"] == "1"
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT are not set"):
        launcher_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    with pytest.raises(ConfigError, match="not integers"):
        launcher_env({"PMI_RANK": "x", "PMI_SIZE": "2"})


_CHILD = ("import json, os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); "
          "from training.pretrain import _init_distributed; import torch.distributed as dist; "
          "r, w, lr = _init_distributed(); t = [None] * w; dist.all_gather_object(t, r); "
          "print(json.dumps({'rank': r, 'world': w, 'local': lr, 'seen': t}))")


def test_two_processes_started_as_open_mpi_does_form_one_group() -> None:
    """Two processes with Open MPI's variables (what `mpirun -np 2` sets) and no RANK join one
    2-process group with distinct ranks (before: two independent 1-process runs)."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**base, "PYTHONPATH": str(REPO), "OMPI_COMM_WORLD_RANK": str(i),
                                   "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
                                   "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port}) for i in range(2)]
    import json

    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["rank"] for o in outs) == [0, 1] and all(o["world"] == 2 for o in outs)
    assert all(o["seen"] == [0, 1] for o in outs)


def test_mpirun_without_a_meeting_point_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "training/pretrain.py"], cwd=REPO, capture_output=True, text=True,
                       env={**env, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
                            "DS_ACCELERATOR": "cpu"}, timeout=180)
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1 and "started by Open MPI as 2 processes" in err[0], p.stderr[-2000:]
