"""Checkpoints: atomic DeepSpeed saves, trainer state, universal conversion, fp32 weights.

Layout under ``<run_dir>/checkpoints/``::

    global_step40/                 DeepSpeed files of every rank (model + ZeRO partitions)
      trainer_state.json           our state: stage, steps, data position, world size, config
    global_step40_universal/       made on demand when resuming on another world size
    latest                         the tag of the newest *complete* checkpoint

Atomicity: DeepSpeed writes ``global_stepN/`` file by file; ``latest`` is replaced (tmp +
rename) by rank 0 only after a barrier that every rank reaches after its own writes. A run
killed mid-save leaves ``latest`` pointing at the previous complete checkpoint; the partial
folder is overwritten or pruned later.

Disk full: a save that fails on any rank (ENOSPC; ``torch.save`` reports it as a bare
``RuntimeError``, so a probe write tells, see :func:`training.errors.disk_full_cause`) is
agreed on by all ranks with one all-reduce, the partial folder and temporary files are
removed, ``latest`` is not touched and every rank raises
:class:`~training.errors.DiskFullError` (exit code 6): one line with the folder, the errno
text, the bytes written before it failed and the size of the previous checkpoint (about
what a save needs). Limit: a rank that fails before one of DeepSpeed's own collectives
inside ``save_checkpoint`` (ZeRO-3 gathers) leaves the others waiting there until the
launcher ends the job.

Safety: DeepSpeed 0.19 reads its own files with ``torch.load(weights_only=False)`` (its
``TorchCheckpointEngine``, ``zero_to_fp32`` and ``ds_to_universal``), which would run any
pickled code a tampered checkpoint holds. Before DeepSpeed touches a checkpoint (resume,
universal conversion, export) :func:`check_weights_only` loads every ``*.pt`` file of it
with ``torch.load(weights_only=True)``, allowing tensors, plain containers and the three
plain-data DeepSpeed types below, and refuses the checkpoint otherwise. Our own state is
JSON (``trainer_state.json``).

Different world size: ZeRO partitions depend on the number of processes, so ``--resume`` on
another world size converts the checkpoint once with DeepSpeed's
``deepspeed.checkpoint.ds_to_universal`` and loads it with ``checkpoint.load_universal``.
The ``universal_checkpoint_info`` the converter needs is attached to the model before the
first save (:func:`mark_universal`); DeepSpeed 0.19 reserves that client-state key and reads
it from the module attribute instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.errors import (
    CheckpointError,
    DiskFullError,
    TrainingError,
    disk_full_cause,
    no_space,
    tree_bytes,
)

logger = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"


@dataclass(frozen=True)
class TrainerState:
    """Where a run is: enough to rebuild the model, the schedule and the data streams."""

    stage_index: int
    stage_name: str
    step_in_stage: int
    """Optimizer steps done in this stage."""
    stage_steps: int
    """Optimizer steps this stage has in total."""
    global_step: int
    """Optimizer steps done in the whole run (all stages)."""
    samples_seen: int
    """Samples consumed in the whole run (global_step x effective batch, summed over stages)."""
    world_size: int
    data_position: dict[str, Any]
    config: dict[str, Any]
    """The resolved run config (``RunConfig.to_dict()``)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The stage's data: data set, split, dataset version, bands and the per-band mean/std
    used to normalise (``ShardSet.describe()``); exports carry it, so evaluation normalises
    alike without the manifest. Empty in checkpoints written before it existed."""

    @property
    def stage_done(self) -> bool:
        return self.step_in_stage >= self.stage_steps


def tag_for(global_step: int) -> str:
    return f"global_step{global_step}"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through ``.<name>.tmp`` and a rename; the temporary file is removed
    when the write fails (a full disk leaves neither it nor a half-written ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # a full disk may only say so when the data is flushed
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """:func:`_write_atomic` for files of the run directory (``config.yaml``).

    Raises:
        DiskFullError: no space for ``what`` at ``path`` (nothing written under its name).
    """
    try:
        _write_atomic(path, text)
    except OSError as exc:
        cause = no_space(exc)
        if cause is None:
            raise
        raise DiskFullError.at(what, path, cause, needed=len(text.encode())) from None


def _latest_tag(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text().strip() or None
    except OSError:
        return None


def _agree(code: int, engine: Any) -> int:
    """The largest ``code`` of all ranks (0: this rank's writes succeeded, 1: disk full,
    2: another failure). Collective; it also waits for every rank's writes, as a barrier."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return code
    device = getattr(engine, "device", None)  # NCCL reduces device tensors only
    flag = torch.tensor([code], dtype=torch.int64, device="cpu" if device is None else device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _settle(error: BaseException | None, engine: Any, ckpt_dir: Path, tag: str,
            previous: str | None) -> None:
    """Every rank calls this after a phase of :func:`save`: if any rank failed, remove the
    unpublished checkpoint folder (rank 0) and raise on every rank; else return.

    A full disk becomes :class:`DiskFullError` (one line: where, the errno text, the bytes
    written before it failed and about what a checkpoint needs, i.e. the size of the previous
    one); any other failure is re-raised as it was (or, on the ranks where it did not
    happen, as :class:`CheckpointError`).
    """
    folder = ckpt_dir / tag
    # Probe while the failed write's files still fill the disk (torch.save says no errno).
    full = disk_full_cause(error, folder) if error is not None else None
    code = _agree(0 if error is None else 1 if full is not None else 2, engine)
    if code == 0:
        return
    written = needed = None
    if _is_rank0():
        written = tree_bytes(folder)
        needed = tree_bytes(ckpt_dir / previous) if previous else None
        if tag != previous:  # never the checkpoint `latest` names (a re-save of that step)
            shutil.rmtree(folder, ignore_errors=True)
        for tmp in (ckpt_dir / f".{LATEST}.tmp", folder / f".{STATE_FILE}.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    if error is not None and full is None:
        raise error
    if code == 2 and full is None:
        raise CheckpointError(f"checkpoint {tag} could not be written by another process; "
                              f"'{ckpt_dir / LATEST}' still names {previous or 'nothing'}")
    if full is None:  # another rank ran out of space
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    after = (f"'{LATEST}' still names {previous}" if previous else "no checkpoint of this "
             "run is complete yet") + "; free space, then resume with --resume"
    raise DiskFullError.at(f"checkpoint {tag}", folder, full, written=written, needed=needed,
                           after=after) from None


def mark_universal(model: nn.Module) -> None:
    """Attach the metadata ``ds_to_universal`` requires (plain data-parallel model)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    setattr(model, UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def save(engine: Any, ckpt_dir: Path, state: TrainerState, keep: int) -> str:
    """Save on all ranks, then publish ``latest`` atomically; return the tag.

    Must be called by every rank (ZeRO partitions are written by their owners). When any
    rank fails to write its part, every rank raises and the partial ``global_stepN/`` is
    removed; ``latest`` keeps naming the previous complete checkpoint.

    Raises:
        DiskFullError: no space for the checkpoint (on this or another rank).
    """
    tag = tag_for(state.global_step)
    previous = _latest_tag(ckpt_dir) if _is_rank0() else None
    error: BaseException | None = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"trainer": asdict(state)},
                               save_latest=False)
    except Exception as exc:  # torch.save reports a full disk as a RuntimeError
        error = exc
        _barrier()  # DeepSpeed's closing barrier, where the other ranks wait
    if error is None and _is_rank0():
        try:
            _write_atomic(ckpt_dir / tag / STATE_FILE, json.dumps(asdict(state), indent=1))
        except OSError as exc:
            error = exc
    _settle(error, engine, ckpt_dir, tag, previous)  # every rank's files are on disk
    if _is_rank0():
        try:
            _write_atomic(ckpt_dir / LATEST, tag)
        except OSError as exc:
            error = exc
        else:
            prune(ckpt_dir, keep)
            logger.info("checkpoint %s saved (stage %s, step %d/%d)", ckpt_dir / tag,
                        state.stage_name, state.step_in_stage, state.stage_steps)
    _settle(error, engine, ckpt_dir, tag, previous)
    return tag


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never the ``latest`` one)."""
    latest = (ckpt_dir / LATEST).read_text().strip()
    tags = sorted((p for p in ckpt_dir.glob("global_step*") if p.is_dir()
                   and not p.name.endswith(UNIVERSAL_SUFFIX)),
                  key=lambda p: int(p.name.removeprefix("global_step")))
    latest_step = int(latest.removeprefix("global_step"))
    complete = [p for p in tags if (p / STATE_FILE).is_file()]
    # Partial folders newer than latest belong to a save in flight on no rank (we are past
    # the barrier); older partial ones are leftovers of a killed save.
    doomed = [p for p in complete[:-keep] if p.name != latest]
    doomed += [p for p in tags if not (p / STATE_FILE).is_file()
               and int(p.name.removeprefix("global_step")) < latest_step]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path.with_name(path.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def resolve(path: Path) -> tuple[Path, str]:
    """``(checkpoint dir, tag)`` for a run dir, a checkpoints dir or a tag folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    for candidate in (path, path / "checkpoints"):
        if (candidate / LATEST).is_file():
            tag = (candidate / LATEST).read_text().strip()
            if not (candidate / tag / STATE_FILE).is_file():
                raise CheckpointError(f"'{candidate / LATEST}' names {tag}, which is incomplete")
            return candidate, tag
    raise CheckpointError(f"no checkpoint found at '{path}' (expected a run directory with "
                          f"checkpoints/{LATEST}, or a global_stepN folder)")


def read_state(ckpt_dir: Path, tag: str) -> TrainerState:
    data = json.loads((ckpt_dir / tag / STATE_FILE).read_text())
    return TrainerState(**data)


def _deepspeed_types() -> list[type]:
    """The plain-data DeepSpeed classes in ZeRO optimizer files (0.19: stage enum, loss
    scaler settings, fragment offsets); nothing else beyond torch's weights_only set."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_weights_only(folder: Path) -> None:
    """Load every ``*.pt`` file under ``folder`` with ``torch.load(weights_only=True)``.

    Memory-mapped, so only the pickled structure is read. Call it before DeepSpeed loads
    the folder (module doc: DeepSpeed itself does not use ``weights_only``).

    Raises:
        CheckpointError: a file holds anything else (code, unknown classes), or is not a
            ``torch.save`` zip file.
    """
    types = _deepspeed_types()
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(types):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # unpickling errors come in many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"refusing to load checkpoint file '{path}': it does not "
                                  f"load with torch.load(weights_only=True) ({reason}); "
                                  f"use checkpoints written by this trainer only") from None


def universal_tag(ckpt_dir: Path, tag: str) -> str:
    """Convert ``tag`` to a universal checkpoint once (rank 0); return the universal tag.

    All ranks call this; the others wait at the barrier. The conversion writes to a
    temporary folder that is renamed when complete, so a killed conversion is redone.
    """
    utag = tag + UNIVERSAL_SUFFIX
    target = ckpt_dir / utag
    error: TrainingError | None = None
    if _is_rank0() and not (target / STATE_FILE).is_file():
        try:
            _convert_universal(ckpt_dir, tag, target)
        except TrainingError as exc:
            error = exc  # raised after the barrier, where the other ranks wait
    _barrier()
    if error is not None:
        raise error
    if not (target / STATE_FILE).is_file():
        raise CheckpointError(f"universal checkpoint {target} was not produced")
    return utag


def _convert_universal(ckpt_dir: Path, tag: str, target: Path) -> None:
    """Rank 0's part of :func:`universal_tag`; the temporary folder goes on any failure."""
    check_weights_only(ckpt_dir / tag)  # ds_to_universal unpickles everything
    tmp = ckpt_dir / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("world size changed: converting %s to a universal checkpoint", tag)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp),
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            failure = RuntimeError(tail[0])
            full = disk_full_cause(failure, ckpt_dir)  # the converter's errors are text
            if full is not None:
                raise DiskFullError.at(f"the universal checkpoint of {tag}", tmp, full,
                                       written=tree_bytes(tmp), needed=tree_bytes(ckpt_dir / tag),
                                       after="free space, then resume again")
            raise CheckpointError(f"ds_to_universal failed for {ckpt_dir / tag}: {tail[0]}")
        shutil.copy2(ckpt_dir / tag / STATE_FILE, tmp / STATE_FILE)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as exc:
        full = no_space(exc)
        if full is None:
            raise
        raise DiskFullError.at(f"the universal checkpoint of {tag}", tmp, full,
                               written=tree_bytes(tmp), needed=tree_bytes(ckpt_dir / tag),
                               after="free space, then resume again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else a partial folder


def full_fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The fp32 master weights of ``engine``'s module on CPU, on every rank (collective in ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return out


def fp32_state_dict_from_checkpoint(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a saved checkpoint (any ZeRO stage, any world size).

    Raises:
        CheckpointError: a file of the checkpoint does not load with weights_only=True.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_weights_only(ckpt_dir / tag)  # zero_to_fp32 unpickles with weights_only=False
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float().contiguous() for k, v in state.items()}
