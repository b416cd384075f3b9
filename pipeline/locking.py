"""One build or refresh at a time per dataset: an exclusive `flock` on `<output>/.lock`.

The lock is released by the kernel when the process dies (kill -9 included), so a crashed
run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class Busy(PipelineError):
    """Another build or refresh holds the dataset's lock."""

    exit_code = 4


@contextlib.contextmanager
def dataset_lock(out: Path, *, wait: bool = False, poll_s: float = 0.5) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise Busy(f"another build or refresh (pid {holder}) is writing {str(out)!r}; "
                               "try again later or pass --wait") from None
                log.info("waiting for the lock on %s", out)
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
