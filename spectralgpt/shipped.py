"""Files shipped inside the installed packages, found through ``importlib.resources``.

Installed users have no source tree to point at, so a bare config name (``base_gpu``,
``europe_live.yaml``) that is not a file where they stand is looked up among the configs the
package ships. Used by both config loaders (``pipeline.config``, ``training.config``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_folder(package: str, *parts: str) -> Path:
    """The folder ``parts`` inside ``package`` on disk (wheels install unzipped)."""
    return Path(str(files(package).joinpath(*parts)))


def find_config(name: str | Path, folder: Path, suffix: str = ".yaml") -> Path:
    """``name`` as given when it is a file; else, for a bare file name, the shipped config in
    ``folder`` (with or without ``suffix``); else ``name`` unchanged (the caller reports it)."""
    p = Path(name)
    if p.is_file() or p.name != str(name):
        return p
    for candidate in (folder / p.name, folder / f"{p.name}{suffix}"):
        if candidate.is_file():
            return candidate
    return p


def shipped_names(folder: Path, suffix: str = ".yaml") -> str:
    """The shipped config names, for an error message."""
    return ", ".join(sorted(q.stem for q in folder.glob(f"*{suffix}")))
