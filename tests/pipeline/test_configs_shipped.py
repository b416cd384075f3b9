"""Every YAML config shipped in pipeline/configs loads (stale keys fail CI)."""

from pathlib import Path

import pytest

from pipeline.config import BuildConfig, load_config
from tests.helpers.paths import REPO


@pytest.mark.parametrize("path", sorted((REPO / "pipeline" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.tiling


def test_default_yaml_equals_defaults() -> None:
    assert load_config(REPO / "pipeline" / "configs" / "europe.yaml").hash() == BuildConfig().hash()
