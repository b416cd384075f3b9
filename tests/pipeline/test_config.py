"""Config loading: YAML + overrides, unknown keys refused, values validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import BuildConfig, TilingSpec, load_config, parse_bbox
from pipeline.errors import ConfigError


def test_defaults_make_both_spectralgpt_stage_datasets() -> None:
    cfg = load_config(None)
    assert [t.name for t in cfg.tiling] == ["s96_g10m", "s128_g10m"]
    assert cfg.output_path == Path("datasets/europe")
    assert cfg.small_scene == "resize"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "aoi: ireland\nstart: 2017-01-01\nmax_cloud: 10\n"
        "tiling: [64, {size: 32, gsd: 20, time_steps: 2, overlap: 8}]\nquality: {max_cloud: 0.1}\n"
    )
    cfg = load_config(p, {"max_cloud": 5, "end": None})
    assert cfg.aoi == "ireland" and cfg.start == "2017-01-01" and cfg.max_cloud == 5
    assert [t.name for t in cfg.tiling] == ["s64_g10m", "s32_g20m_t2_o8"]
    assert cfg.quality.max_cloud == 0.1 and cfg.quality.max_invalid == 0.05


def test_config_hash_ignores_where_and_how_fast() -> None:
    a = BuildConfig(output="a", workers=1)
    b = BuildConfig(output="b", workers=2)
    c = BuildConfig(tiling=(TilingSpec(64),))
    assert a.hash() == b.hash() != c.hash()


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"tilng": [96]}, "unknown config key(s) tilng"),
        ({"quality": {"max_clouds": 0.1}}, "quality.max_clouds"),
        ({"start": "2020-05-01", "end": "2020-04-01"}, "after --end"),
        ({"start": "01/05/2020"}, "ISO date"),
        ({"tiling": [100]}, "multiple of 8"),
        ({"tiling": [{"size": 96, "gsd": 15}]}, "integer multiple"),
        ({"max_cloud": 120}, "percentage"),
        ({"resampling": {"20m": "lanczos9"}}, "resampling.20m"),
    ],
)
def test_bad_config_values(raw: dict, needle: str, tmp_path: Path) -> None:
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=None) as ei:
        load_config(p)
    assert needle in str(ei.value)


@pytest.mark.parametrize(
    "text,needle",
    [("1,2,3", "4 numbers"), ("10,50,5,55", "W < E"), ("-190,0,10,10", "[-180, 180]"), ("0,95,1,96", "[-90, 90]"), ("a,b,c,d", "four numbers")],
)
def test_bad_bbox(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_bbox(text)
    assert needle in str(ei.value)


def test_good_bbox() -> None:
    assert parse_bbox("-10.7, 51.3, -5.9, 55.4") == (-10.7, 51.3, -5.9, 55.4)
