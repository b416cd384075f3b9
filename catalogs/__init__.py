"""Facts kept as data: Sentinel-2 bands, named STAC sources, AOIs and the embedded sample catalog.

This folder is an installable package only so that its files ship in the wheel and are
found the same way from a checkout and from site-packages (``importlib.resources``); it
holds no logic. The readers are in ``pipeline.catalogs``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def root() -> Path:
    """The folder holding ``sentinel2.yaml``, ``sources.yaml``, ``aois/`` and ``sample/``.

    A real folder is needed, not just a resource reader: the sample catalog is served by a
    STAC server process and its COGs are opened by GDAL. Wheels install unzipped, so this
    holds for every supported install; a zipped import is refused with one clear line.
    """
    base = files(__name__)
    if not isinstance(base, Path):
        raise RuntimeError(
            f"the catalogs package is not on a filesystem ({base!r}): install the wheel "
            "normally (pip install), not as a zip archive"
        )
    return base
