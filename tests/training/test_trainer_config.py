"""Config contracts: shipped files load, unknown keys are refused, overrides apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import CONFIG_DIR, RunConfig, config_from_dict, load_config
from training.errors import ConfigError


def test_shipped_configs_load() -> None:
    tiny = load_config()  # the default: training/configs/tiny_cpu.yaml
    assert tiny.name == "tiny_cpu" and tiny.model_preset == "tiny"
    assert [s.img_size for s in tiny.stages] == [96, 128]
    assert [s.dataset for s in tiny.stages] == ["s96_g10m", "s128_g10m"]
    base = load_config(CONFIG_DIR / "base_gpu.yaml")
    assert base.model.embed_dim == 768 and base.model.decoder_depth == 4
    assert base.global_batch == 4096 and base.betas == (0.9, 0.95)
    assert [s.blr for s in base.stages] == [2e-4, 1e-4]
    for name in ("ds_zero1.json", "ds_zero2.json", "ds_zero3.json"):
        cfg = json.loads((CONFIG_DIR / name).read_text())
        assert cfg["zero_optimization"]["stage"] == int(name[7])


def test_resolved_config_round_trips() -> None:
    run = load_config(overrides=["model.mask_ratio=0.75", "stages.1.pos_embed=reinit"])
    again = config_from_dict(run.to_dict())
    assert again == run
    assert again.model.mask_ratio == 0.75 and again.stages[1].pos_embed == "reinit"


@pytest.mark.parametrize("override, key", [
    ("learning_rate=1", "learning_rate"),
    ("model.depht=3", "model.depht"),
    ("stages.0.epoch=3", "stages.0.epoch"),
])
def test_unknown_keys_are_refused_with_their_name(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("stages.0.epochs=3", "exactly one of 'samples' or 'epochs'"),
    ("global_batch=6", "not a multiple of micro_batch"),
    ("model.preset=giant", "unknown model preset"),
    ("normalisation=zscore", "must be one of"),
    ("stages.1.img_size=100", "not a multiple of model.patch_size"),
    ("micro_batch=two", "must be int"),
    ("stages.5.samples=1", "not an index"),
    ("model.img_size=64", "set per stage"),
])
def test_bad_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_missing_config_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_deepspeed_config_resolves_shipped_names_and_paths(tmp_path: Path) -> None:
    run = load_config(overrides=["deepspeed_config=ds_zero3.json"])
    assert run.deepspeed_config_path() == CONFIG_DIR / "ds_zero3.json"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert load_config(overrides=[f"deepspeed_config={own}"]).deepspeed_config_path() == own
    with pytest.raises(ConfigError, match="not found"):
        load_config(overrides=["deepspeed_config=ds_zero9.json"]).deepspeed_config_path()


def test_model_for_stage_changes_only_the_image_size() -> None:
    run: RunConfig = load_config()
    a, b = (run.model_for(s) for s in run.stages)
    assert (a.img_size, b.img_size) == (96, 128)
    assert (a.num_tokens, b.num_tokens) == (576, 1024)
    assert a.embed_dim == b.embed_dim
