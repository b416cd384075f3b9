"""Exceptions of the trainer.

Every user-facing failure is a :class:`TrainingError`; the CLI turns it into one line on
stderr and the error's :attr:`~TrainingError.exit_code`. Messages say which file or config
key to change.

Exit codes (``pretrain``, ``export``, ``run_page``): 0 done, 1 non-finite loss, 2
configuration, data or checkpoint error, 6 disk full (the same code as the pipeline's
build and refresh); 1 from anything else means a bug (with a traceback).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

#: errno values that mean "no room to write": the disk, or the user's quota on it.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: Bytes a probe write tries when a writer failed without saying why (see `disk_full_cause`).
PROBE_BYTES = 1 << 20


class TrainingError(Exception):
    """Base class for errors the user can fix (config, data, a diverging run)."""

    exit_code = 2


class ConfigError(TrainingError, ValueError):
    """The YAML config or a ``--set`` override is invalid (unknown key, bad value)."""


class DataError(TrainingError):
    """The manifest or the shards do not match the contract or the model."""


class UnsafeShardPath(DataError):
    """A manifest names a shard outside its dataset folder (``..``, an absolute path, a
    backslash, NUL, or a link leading out): refused before anything is opened."""


class CheckpointError(TrainingError):
    """A checkpoint to resume from or export is missing or inconsistent."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the run stops at once (fail fast, mae engine_pretrain)."""

    exit_code = 1


class DiskFullError(TrainingError):
    """No space left where the trainer writes (ENOSPC, or EDQUOT): the temporary files of
    the failed write are removed and nothing is published under its final name (``latest``
    keeps naming the previous complete checkpoint). Free space, then run again
    (``--resume``)."""

    exit_code = 6

    @classmethod
    def at(cls, what: str, path: str | Path, cause: OSError, *, written: int | None = None,
           needed: int | None = None, after: str = "") -> DiskFullError:
        """The one-line error for writing ``what`` at ``path``: errno text, bytes written
        before it failed and bytes needed where known, free space now."""
        facts = [f"[Errno {cause.errno}] {os.strerror(cause.errno or errno.ENOSPC)}"]
        if written is not None:
            facts.append(f"{human_bytes(written)} written before it failed")
        if needed is not None:
            facts.append(f"about {human_bytes(needed)} needed")
        free = free_bytes(path)
        if free is not None:
            facts.append(f"{human_bytes(free)} free now")  # after the clean-up
        tail = f"; {after}" if after else ""
        return cls(f"disk full: cannot write {what} at '{path}' ({', '.join(facts)}); "
                   f"nothing was published{tail}")


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``3.4 MiB`` (bytes below 1 KiB as ``512 B``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        with contextlib.suppress(OSError):
            if candidate.exists():
                return shutil.disk_usage(candidate).free
    return None


def tree_bytes(path: str | Path) -> int:
    """Bytes in the files under ``path`` (a file's size for a file; 0 when absent)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for f in p.rglob("*") if p.is_dir() else ():
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


def no_space(error: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``error`` (itself or its cause chain), if any."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def disk_full_cause(error: BaseException, folder: str | Path) -> OSError | None:
    """The ENOSPC behind a failed write into ``folder``, or None when it was something else.

    Some writers do not report the errno: ``torch.save`` (PyTorch's zip writer) raises a
    ``RuntimeError`` such as ``unexpected pos 576 vs 534`` on a full disk, and safetensors
    its own error type. For those, a probe of :data:`PROBE_BYTES` is written (and removed)
    in ``folder`` while the failed write's files are still there: if the probe meets
    ENOSPC/EDQUOT, the disk is full and that error is returned.
    """
    found = no_space(error)
    if found is not None or isinstance(error, OSError):
        return found  # an OSError with another errno is not a full disk
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".diskfull-probe-", dir=folder)
    except OSError as exc:
        return exc if exc.errno in _NO_SPACE else None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc if exc.errno in _NO_SPACE else None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None
