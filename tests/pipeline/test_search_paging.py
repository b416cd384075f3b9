"""The search takes every page; --max-items is an explicit cap that the log and manifest report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.build_shards import main
from tools.stac_api import COLLECTION, serve_items, synthetic_items


def test_every_page_is_taken_and_a_cap_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = synthetic_items(3, 10)  # 30 items, served 7 to a page: 5 pages
    with serve_items(items, page_size=7) as url:
        base = ["--catalog", url, "--collection", COLLECTION, "--bbox", "-20,30,45,75", "--max-cloud", "100",
                "--dry-run", "--output", str(tmp_path / "o")]
        caplog.set_level(logging.INFO)
        assert main(base) == 0
        assert any("search: 30 items found, 30 scenes used on 3 grids" in r.getMessage() for r in caplog.records)
        assert not any("--max-items" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert main([*base, "--max-items", "12"]) == 0
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == ["search stopped at --max-items 12: 12 items taken of 30 matched; raise or drop "
                            "--max-items to take every item"]


def test_the_cap_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "capped"
    assert main(["--aoi", "europe", "--max-items", "5", "--output", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["source"]["max_items"] == 5 and man["source"]["search_capped"] is True
    assert man["scenes"]["found"] == 5 and man["config"]["max_items"] == 5
    full = tmp_path / "full"
    assert main(["--aoi", "europe", "--output", str(full)]) == 0
    man = json.loads((full / "manifest.json").read_text())
    assert man["source"]["max_items"] is None and man["source"]["search_capped"] is False
    assert man["scenes"]["found"] == 11
