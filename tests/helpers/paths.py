"""Locations of the real data used by tests.

`tests/data/` is a verbatim copy of the workplace's `shared/data` (real Sentinel-2 patches,
real STAC responses, a real SCL band; provenance in tests/data/README.md), so the tests
run on a plain clone without anything beside the repository.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
SHARED_STAC = DATA / "stac"
BIGEARTHNET = DATA / "bigearthnet-s2-tiny"
SCL_JP2 = DATA / "scl" / "L2A_SCL_60m_EPSG32631.jp2"
