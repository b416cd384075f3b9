"""Harmonisation rules on real STAC metadata (shared/data/stac) and on arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from pipeline.harmonise import Harmonisation, apply_offsets, decide, processing_baseline
from tests.helpers.paths import SHARED_STAC


def _es_item() -> dict:
    return json.loads((SHARED_STAC / "earth-search-v1_search_S2A_13TDE_20231008.json").read_text())["features"][0]


def _pc_items() -> list[dict]:
    return json.loads((SHARED_STAC / "planetary-computer_items_2024-04-19.json").read_text())


def test_planetary_computer_0510_removes_offset() -> None:
    item = _pc_items()[0]
    h = decide(item["properties"], item["id"])
    assert h is not None
    assert h.processing_baseline == "05.10"
    assert h.offset_dn == 1000
    assert h.rule == "pb>=04.00:dn-1000"


def test_earth_search_offset_already_applied_is_not_corrected_twice() -> None:
    item = _es_item()
    assert item["properties"]["earthsearch:boa_offset_applied"] is True
    # raster:bands still says offset -0.1: the provider flag must win (earth-search#24)
    assert item["assets"]["red"]["raster:bands"][0]["offset"] == -0.1
    h = decide(item["properties"], item["id"])
    assert h is not None and h.offset_dn == 0 and h.rule == "provider-applied:none"


def test_pre_0400_baseline_has_no_offset_whatever_the_date() -> None:
    ts = json.loads((SHARED_STAC / "planetary-computer_timeseries_35MNM_2020.geojson").read_text())["features"]
    for item in ts:
        h = decide(item["properties"], item["id"])
        assert h is not None and h.processing_baseline == "02.12" and h.offset_dn == 0
    # a 2019 acquisition reprocessed at baseline 05.00 (Collection-1) carries the offset
    h = decide({"datetime": "2019-06-01T10:00:00Z", "s2:processing_baseline": "05.00"})
    assert h is not None and h.offset_dn == 1000


def test_baseline_parsed_from_product_name_when_property_missing() -> None:
    assert processing_baseline({"s2:product_uri": "S2B_MSIL2A_20240419T095549_N0510_R122_T47XML_20240419T123458.SAFE"}) == "05.10"
    assert processing_baseline({}, "S2A_MSIL1C_20170617T113321_N0205_R080_T29UPU_20170617T113319") == "02.05"
    assert decide({}, "no-baseline-anywhere") is None


def test_apply_offsets_keeps_nodata_and_clamps_dark_pixels() -> None:
    dn = xr.DataArray(np.array([[[0, 1000, 1001, 5000]], [[0, 1000, 1001, 5000]]], dtype=np.uint16), dims=["time", "y", "x"])
    off = xr.DataArray(np.array([1000, 0], dtype=np.int32), dims=["time"])
    out = apply_offsets(dn, off).values
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[0, 0], [0, 1, 1, 4000])  # 0 stays nodata, 1000 -> clamped to 1 (still valid)
    np.testing.assert_array_equal(out[1, 0], [0, 1000, 1001, 5000])


@pytest.mark.parametrize("pb,expected", [("03.01", 0), ("04.00", 1000), ("04.1", 1000), ("99.99", 1000)])
def test_baseline_threshold(pb: str, expected: int) -> None:
    h = decide({"s2:processing_baseline": pb})
    assert h is not None and h.offset_dn == expected


def _scene(id_: str, baseline: str | None, when: str = "2024-06-01T10:00:00Z"):  # type: ignore[no-untyped-def]
    from pipeline.search import Scene

    return Scene(id=id_, collection="c", datetime=when, epsg=32632, tile="32TMT", hrefs={},
                 grid_shape=(10980, 10980), grid_transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
                 harmonisation=Harmonisation(baseline, "r", 0, "x"), bbox_lonlat=(0, 0, 1, 1),
                 cloud_cover=0.0, item={})


@pytest.mark.parametrize("order", ["old_first", "new_first"])
def test_a_reprocessed_acquisition_keeps_the_newest_baseline(order: str) -> None:
    """Same grid and datetime twice (a reprocessed item): the newer processing baseline is
    used and the older rejected, whichever comes first in id order."""
    from pipeline.cube import group_grids

    old, new = _scene("a_old" if order == "old_first" else "z_old", "04.00"), _scene("m_new", "05.10")
    other = _scene("b_day2", "04.00", "2024-06-06T10:00:00Z")
    grids, dropped = group_grids([old, new, other])
    assert [s.id for s in grids[0].scenes] == ["m_new", "b_day2"]
    assert [(s.id, why) for s, why in dropped] == [(old.id, "superseded by a reprocessed item (newer baseline)")]


def test_the_same_acquisition_in_two_collections_is_kept_once_first_in_id_order() -> None:
    from pipeline.cube import group_grids

    grids, dropped = group_grids([_scene("s2_b", "05.10"), _scene("s2_a", "05.10")])
    assert [s.id for s in grids[0].scenes] == ["s2_a"]
    assert [(s.id, why) for s, why in dropped] == [("s2_b", "duplicate acquisition (same grid and datetime)")]
