"""The one check for names that come from outside on their way into paths.

Item ids, tile names, dataset names and shard paths are read from catalogs, manifests,
configs and samples that other people wrote. Before any of them becomes part of a path, a
file name, a tar member name or a URL, it passes here, where it enters: search (tiles),
the build (dataset names of an old manifest), refresh, `pipeline.inspect`, the trainer and
evaluation (shard paths of a manifest). A name is plain ASCII letters, digits, `.`, `_`
and `-`, starting with a letter or digit, at most 128 characters, never `.`/`..`: no
separators, no absolute paths, no backslashes, NUL, newlines or Unicode look-alikes.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import PipelineError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: An MGRS tile as Sentinel-2 names it: UTM zone 1-60, latitude band C-X (no I, O), 100 km square.
_MGRS = re.compile(r"(?:0?[1-9]|[1-5][0-9]|60)[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V]")
MAX_DEPTH = 4  # folders in a relative path a manifest may name (`<dataset>/<shard>.tar`: 2)


class UnsafeName(PipelineError):
    """A name from a catalog, manifest, config or sample that cannot be used in a path."""


def _show(value: object) -> str:
    return repr(str(value)[:60]) + ("..." if len(str(value)) > 60 else "")


def is_safe_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME.fullmatch(value)) and ".." not in value


def safe_name(value: object, what: str) -> str:
    """`value` when it is a plain name (see the module docstring), else `UnsafeName`."""
    if not is_safe_name(value):
        raise UnsafeName(f"{what} {_show(value)} is not a plain name (letters, digits, '.', '_', '-'; "
                         "no separators or '..'): refused")
    assert isinstance(value, str)
    return value


def mgrs_tile(value: object) -> str | None:
    """The MGRS tile `value` names (`29UPU`, `T29UPU`, `MGRS-29UPU`, `29/U/PU`), or None."""
    if not isinstance(value, str):
        return None
    text = value.upper().removeprefix("MGRS-").replace("/", "")
    text = text[1:] if text.startswith("T") and len(text) in (6, 7) else text
    return text if _MGRS.fullmatch(text) else None


def safe_relpath(value: object, what: str) -> str:
    """A relative path of plain names joined by '/', as manifests name shards; else `UnsafeName`."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\\" in value:
        raise UnsafeName(f"{what} {_show(value)} is not a relative path inside the dataset: refused")
    parts = value.split("/")
    if len(parts) > MAX_DEPTH or not all(is_safe_name(p) for p in parts):
        raise UnsafeName(f"{what} {_show(value)} is not a relative path of plain names inside the dataset: refused")
    return value


def confined(root: Path, rel: str, what: str) -> Path:
    """`root / rel` for a `safe_relpath`, checked once more after resolving links: it must
    stay inside `root` (a symlink inside a dataset cannot lead a reader or a delete out)."""
    path = root / safe_relpath(rel, what)
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise UnsafeName(f"{what} {_show(rel)} leads outside {str(root)!r} (a link): refused")
    return path
