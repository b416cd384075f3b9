"""Remote output checks and the lock location of a remote dataset.

The build writes a remote dataset directly (`pipeline.location`): workers upload cubes,
shards and their completion records, the client writes `manifest.json` last, so readers of
the remote location only ever see complete versions. Nothing is staged on the client.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pipeline.location import Location, is_url

log = logging.getLogger(__name__)

__all__ = ["check_remote", "is_url", "lock_dir"]


def lock_dir(url: str) -> Path:
    """Where this machine keeps the lock of a remote dataset (env SPECTRALGPT_STATE overrides the
    root): one build or refresh of a dataset at a time from this machine. Nothing else is kept."""
    root = Path(os.environ.get("SPECTRALGPT_STATE", Path.home() / ".cache" / "spectralgpt" / "locks"))
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def check_remote(url: str) -> None:
    """Fail early (one line) when the remote location cannot be reached; writes nothing."""
    from pipeline.errors import OutputError

    try:
        fs, path = Location(url)._fs()
        root = path.split("/", 1)[0]
        if not fs.exists(root):
            raise OutputError(f"--output {url!r}: bucket/container {root!r} does not exist")
    except OutputError:
        raise
    except ImportError as e:
        raise OutputError(f"--output {url!r}: no filesystem driver for this URL ({e})") from None
    except Exception as e:  # credentials, endpoint, DNS
        raise OutputError(f"--output {url!r} is not reachable: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
