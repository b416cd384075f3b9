"""Output locations: a local directory, or an fsspec URL (`s3://bucket/prefix`, ...).

A remote dataset is built in a local staging directory (resume state, zarr cubes and shards
live there while the build runs) and then published: every file is uploaded, and
`manifest.json` last, so readers of the remote location only ever see complete versions.
Object stores write an object atomically, so a killed upload leaves the previous manifest
(and every shard it lists) intact; the next run finishes the upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_NOT_PUBLISHED = ("_work", ".lock")


def is_url(path: str | os.PathLike[str] | None) -> bool:
    return bool(path) and bool(_URL.match(str(path))) and not str(path).startswith("file://")


def staging_dir(url: str) -> Path:
    """Local staging directory of a remote output (env SPECTRALGPT_STAGING overrides the root)."""
    root = Path(os.environ.get("SPECTRALGPT_STAGING", Path.home() / ".cache" / "spectralgpt" / "staging"))
    h = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return root / h


def filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    # a fresh instance, without listing cache: fsspec would otherwise reuse a filesystem made
    # for an earlier endpoint/credentials in this process and answer from stale listings
    opts = {"skip_instance_cache": True, "use_listings_cache": False} if not url.startswith("file:") else {}
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/")


def check_remote(url: str) -> None:
    """Fail early (one line) when the remote location cannot be reached; writes nothing."""
    from pipeline.errors import OutputError

    try:
        fs, path = filesystem(url)
        root = path.split("/", 1)[0]
        if not fs.exists(root):
            raise OutputError(f"--output {url!r}: bucket/container {root!r} does not exist")
    except OutputError:
        raise
    except ImportError as e:
        raise OutputError(f"--output {url!r}: no filesystem driver for this URL ({e})") from None
    except Exception as e:  # credentials, endpoint, DNS
        raise OutputError(f"--output {url!r} is not reachable: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def read_remote_manifest(url: str) -> dict[str, Any] | None:
    fs, path = filesystem(url)
    p = f"{path}/manifest.json"
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def pull_state(url: str, local: Path) -> None:
    """Bring the remote manifest and version statistics into the staging dir (refresh on a new machine)."""
    fs, path = filesystem(url)
    remote = read_remote_manifest(url)
    if remote is None:
        return
    local.mkdir(parents=True, exist_ok=True)
    lm = local / "manifest.json"
    if lm.is_file() and json.loads(lm.read_text()).get("latest_version", 1) >= remote.get("latest_version", 1):
        return
    if fs.exists(f"{path}/stats"):
        for rp in fs.find(f"{path}/stats"):
            dst = local / "stats" / Path(rp).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.get(rp, str(dst))
    lm.write_text(json.dumps(remote, indent=1))


def needs_publish(url: str, local: Path) -> bool:
    lm = local / "manifest.json"
    if not lm.is_file():
        return False
    remote = read_remote_manifest(url)
    return remote != json.loads(lm.read_text())


def publish(local: Path, url: str) -> int:
    """Upload the staged dataset, manifest.json last. Returns bytes uploaded."""
    fs, path = filesystem(url)
    sent = 0
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.relative_to(local).parts[0] not in _NOT_PUBLISHED)
    manifest = local / "manifest.json"
    for p in files:
        if p == manifest:
            continue
        rel = p.relative_to(local).as_posix()
        dst = f"{path}/{rel}"
        size = p.stat().st_size
        try:
            if fs.exists(dst) and fs.size(dst) == size and not rel.startswith("stats/"):
                continue  # shards and cube chunks are immutable once named
        except FileNotFoundError:
            pass
        fs.put_file(str(p), dst)
        sent += size
    fs.put_file(str(manifest), f"{path}/manifest.json")
    sent += manifest.stat().st_size
    log.info("published %.1f MB to %s (manifest.json last)", sent / 1e6, url)
    return sent
