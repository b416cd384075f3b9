"""A dataset's location: a local folder or an fsspec URL (`s3://bucket/prefix`, `gs://`, ...).

The client and every Dask worker address the output by this one value; nothing is staged on
the client's disk. Files become visible under their final name only when complete:

- local: written to `<name>.tmp-<pid>` beside the target, fsynced, then renamed;
- remote: written to the worker's own scratch folder, then uploaded with one `put`; object
  stores make an object visible only when its upload has finished.

`Location` is small and picklable (a string), so unit tasks carry it to the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(target: str | os.PathLike[str] | None) -> bool:
    """True for an fsspec URL other than `file://` (which is a local path)."""
    return bool(target) and bool(_URL.match(str(target))) and not str(target).startswith("file://")


@dataclass(frozen=True)
class Location:
    """The root of a dataset: `target` is a local path or a URL; members are '/'-separated
    relative names (`s96_g10m/train-....tar`, `cube/v0001/<grid>.zarr`)."""

    target: str

    @property
    def remote(self) -> bool:
        return is_url(self.target)

    @property
    def local_root(self) -> Path:
        if self.remote:
            raise ValueError(f"{self.target} is not a local folder")
        return Path(self.target.removeprefix("file://"))

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        # a fresh instance without listing cache: fsspec would otherwise reuse a filesystem
        # made for an earlier endpoint/credentials in this process and answer from stale listings
        fs, root = fsspec.core.url_to_fs(self.target, skip_instance_cache=True, use_listings_cache=False)
        return fs, root.rstrip("/")

    def url(self, rel: str = "") -> str:
        """What zarr, xarray and the trainer open: a local path or a full URL."""
        if not rel:
            return self.target.rstrip("/")
        return f"{self.target.rstrip('/')}/{rel}" if self.remote else str(self.local_root / rel)

    # -- reading ---------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.local_root / rel).exists()
        fs, root = self._fs()
        return bool(fs.exists(f"{root}/{rel}"))

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of `rel`; FileNotFoundError when it is not there."""
        if not self.remote:
            return (self.local_root / rel).read_bytes()
        fs, root = self._fs()
        try:
            return bytes(fs.cat_file(f"{root}/{rel}"))
        except FileNotFoundError:
            raise
        except OSError as e:  # some drivers wrap a missing key
            if "NoSuchKey" in str(e) or "Not Found" in str(e):
                raise FileNotFoundError(rel) from None
            raise

    def read_json(self, rel: str) -> Any | None:
        """Parsed JSON at `rel`, or None when absent or unreadable (a torn write of an old crash)."""
        try:
            return json.loads(self.read_bytes(rel))
        except (FileNotFoundError, ValueError):
            return None

    def list(self, prefix: str) -> list[str]:
        """Relative names of the files under `prefix` (recursively), sorted. Local: links are
        not followed (a link inside a dataset never leads a listing, and so a delete, out)."""
        if not self.remote:
            base = self.local_root / prefix
            if base.is_symlink() or not base.is_dir():
                return []
            found = []
            for folder, dirs, files in os.walk(base, followlinks=False):
                found += [os.path.join(folder, f) for f in files if not os.path.islink(os.path.join(folder, f))]
            root = str(self.local_root)
            return sorted(Path(os.path.relpath(f, root)).as_posix() for f in found)
        fs, root = self._fs()
        try:
            found = fs.find(f"{root}/{prefix}")
        except FileNotFoundError:
            return []
        return sorted(str(p)[len(root) + 1:] for p in found)

    def names(self, prefix: str) -> list[str]:
        """The entry names directly under `prefix` (files and folders, not recursive), sorted."""
        if not self.remote:
            base = self.local_root / prefix
            return sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        fs, root = self._fs()
        try:
            return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{prefix}", detail=False))
        except FileNotFoundError:
            return []

    # -- writing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, rel: str, scratch: Path | None = None) -> Iterator[Path]:
        """Yield a local path to write `rel` into; on a clean exit it becomes `rel` atomically.

        Local: a temporary name beside the target (same filesystem: the rename is atomic).
        Remote: a file in `scratch` (the worker's own temporary folder), uploaded then removed.
        On an exception the partial file is removed and nothing appears under `rel`.
        """
        if not self.remote:
            final = self.local_root / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        else:
            base = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
            tmp = base / f"upload-{os.getpid()}" / rel
            tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            self.publish(tmp, rel)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def publish(self, local_file: Path, rel: str) -> None:
        """Make the complete `local_file` appear as `rel` (local: rename; remote: one upload)."""
        if not self.remote:
            final = self.local_root / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_file, final)
            return
        fs, root = self._fs()
        fs.put_file(str(local_file), f"{root}/{rel}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `data` as `rel` atomically (local: fsynced temporary file + rename)."""
        if not self.remote:
            with self.writing(rel) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            return
        fs, root = self._fs()
        fs.pipe_file(f"{root}/{rel}", data)  # one PUT: visible whole or not at all

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1).encode())

    def put_tree(self, local_dir: Path, rel: str) -> None:
        """Upload (remote) or move (local) a finished folder to `rel`, replacing what is there."""
        if not self.remote:
            final = self.local_root / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(local_dir, final)
            return
        fs, root = self._fs()
        self.remove_tree(rel)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{root}/{rel}/{p.relative_to(local_dir).as_posix()}")

    # -- removing (only names this build made: callers pass names from their own records)
    def remove(self, rel: str) -> None:
        if not self.remote:
            with contextlib.suppress(FileNotFoundError):
                (self.local_root / rel).unlink()
            return
        fs, root = self._fs()
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{root}/{rel}")

    def remove_tree(self, rel: str) -> None:
        if not self.remote:
            shutil.rmtree(self.local_root / rel, ignore_errors=True)
            return
        fs, root = self._fs()
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(f"{root}/{rel}"):
                fs.rm(f"{root}/{rel}", recursive=True)
