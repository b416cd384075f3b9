"""Radiometric harmonisation: every sample ends up with reflectance = value / 10000.

Sentinel-2 L2A DN carry a +1000 offset from processing baseline 04.00 on (25 Jan 2022, and
every reprocessed older scene: Collection-1 puts the offset on 2015-2021 acquisitions too),
so the rule is decided per item from `s2:processing_baseline` (or the `_Nxxyy_` of the
product name), never from the acquisition date (torchgeo#3224).

What the provider already did is respected: Earth Search's legacy `sentinel-2-l2a` removed
the offset for most post-2022 items and says so in `earthsearch:boa_offset_applied`
(earth-search#24); its `raster:bands` still claim offset -0.1 for those items, so the flag
wins over `raster:bands` (earth-search#66, #71 report the flag itself is wrong for some
items; we follow the provider's statement and record it, so such items can be found).
`sentinel-2-c1-l2a` and Planetary Computer ship raw DN: we remove the offset ourselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.catalogs import sensor

if TYPE_CHECKING:  # xarray (with pandas) costs ~0.7 s to import: only where it is used
    import xarray as xr

_PB_IN_NAME = re.compile(r"_N(\d{2})(\d{2})_")


@dataclass(frozen=True)
class Harmonisation:
    """The rule applied to one item. `offset_dn` is subtracted from every valid DN."""

    processing_baseline: str | None
    rule: str  # short machine-readable tag, e.g. "pb>=04.00:dn-1000"
    offset_dn: int
    reason: str  # one human sentence: why this rule

    def to_json(self) -> dict[str, Any]:
        return {
            "processing_baseline": self.processing_baseline,
            "rule": self.rule,
            "offset_dn_removed": self.offset_dn,
            "reason": self.reason,
        }


def processing_baseline(props: dict[str, Any], item_id: str = "") -> str | None:
    """`s2:processing_baseline` of an item, else parsed from its product name (`_N0509_`)."""
    pb = props.get("s2:processing_baseline")
    if pb:
        return str(pb)
    for text in (props.get("s2:product_uri"), props.get("s2:granule_id"), item_id):
        m = _PB_IN_NAME.search(str(text or ""))
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def _pb_tuple(pb: str) -> tuple[int, int]:
    major, _, minor = pb.partition(".")
    return int(major), int(minor or 0)


def decide(props: dict[str, Any], item_id: str = "") -> Harmonisation | None:
    """Choose the harmonisation rule for an item from its STAC properties.

    Returns None when the processing baseline cannot be determined: such an item cannot
    be harmonised safely and is rejected by the caller.
    """
    s = sensor()
    pb = processing_baseline(props, item_id)
    if pb is None:
        return None
    has_offset = _pb_tuple(pb) >= _pb_tuple(s.offset_baseline)
    if not has_offset:
        return Harmonisation(pb, f"pb<{s.offset_baseline}:none", 0, f"baseline {pb} predates the +{s.offset_dn} offset")
    if props.get("earthsearch:boa_offset_applied") is True:
        return Harmonisation(
            pb,
            "provider-applied:none",
            0,
            f"baseline {pb} has the offset but the provider removed it (earthsearch:boa_offset_applied=true)",
        )
    return Harmonisation(pb, f"pb>={s.offset_baseline}:dn-{s.offset_dn}", s.offset_dn, f"baseline {pb} carries +{s.offset_dn} DN")


def apply_offsets(dn: xr.DataArray, offsets: xr.DataArray) -> xr.DataArray:
    """Remove each time slice's `offsets` [time] (DN) from valid pixels of `dn` [time, ...].

    Nodata (0) stays 0. Valid pixels that would fall to or below 0 (negative reflectance
    after the offset, which sen2cor produces over very dark water) are clamped to 1 so they
    stay valid. Lazy and elementwise: works chunk by chunk on Dask-backed arrays.
    """
    import xarray as xr

    if not bool((offsets != 0).any()):
        return dn.astype(np.uint16)
    shifted = dn.astype(np.int32) - offsets
    return xr.where(dn == 0, 0, shifted.clip(min=1)).astype(np.uint16)


def remove_offset(dn: np.ndarray, offset: int) -> np.ndarray:
    """numpy form of `apply_offsets` for one date's block: a copy of uint16 `dn` with
    `offset` DN removed from valid pixels (nodata stays 0, valid pixels clamp to 1).

    One compiled pass (`kernels.remove_offset_inplace`); the cube's reads apply the same
    kernel in place as they decode (`native_read.read_block`)."""
    if offset == 0:
        return dn
    if not 0 < offset < 65536:
        raise ValueError(f"offset {offset}: only removing an offset of 1..65535 DN is defined")
    from pipeline.kernels import remove_offset_inplace

    out = np.array(dn, dtype=np.uint16, order="C")
    remove_offset_inplace(out.reshape(-1), offset)
    return out
