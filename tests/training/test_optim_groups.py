"""AdamW groups: what is decayed, with and without ``decay_pos_embed``; and the loader's flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.models.spectral_mae import SpectralMAE, tiny_config
from training.optim import param_groups

TABLES = {"pos_embed_spatial", "pos_embed_temporal", "decoder_pos_embed_spatial",
          "decoder_pos_embed_temporal", "mask_token", "pos_embed_date", "decoder_pos_embed_date"}


def _names(model: SpectralMAE, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_position_tables_are_not_decayed_unless_asked() -> None:
    model = SpectralMAE(tiny_config(img_size=32, num_dates=2, date_encoding="learned"))
    matrices = {n for n, p in model.named_parameters() if p.ndim > 1} - TABLES
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == matrices  # weights of Linear / Conv3d only
    assert TABLES <= _names(model, no_decay)
    assert all(n.endswith(".bias") or "norm" in n or n in TABLES for n in _names(model, no_decay))
    # the official timm 0.4.12 grouping: every parameter of more than one dimension decays
    decay, no_decay = param_groups(model, 0.05, decay_pos_embed=True)
    assert _names(model, decay) == matrices | TABLES
    assert not TABLES & _names(model, no_decay)


def test_hflip_mirrors_about_half_of_the_samples_and_nothing_else(manifest: Path) -> None:
    from training.config import load_config
    from training.data import DataPosition, ShardStream, read_shard_set

    def stream(hflip: bool) -> ShardStream:
        run = load_config(None, [f"manifest={manifest}", f"hflip={str(hflip).lower()}"])
        stage = run.stages[0]
        ss = read_shard_set(manifest, stage.dataset, stage.split, run.model_for(stage))
        return ShardStream(ss, run, stage, stage_index=0, rank=0, world_size=1, position=DataPosition.start(1, 1))

    on, off = stream(True), stream(False)
    rng = np.random.default_rng(0)
    chip = rng.integers(1, 5000, (12, 96, 96)).astype(np.uint16)
    flips = 0
    for index in range(40):
        a = on.transform({"__key__": "k", "chip": chip}, 0, index)["image"]
        b = off.transform({"__key__": "k", "chip": chip}, 0, index)["image"]
        if torch.equal(a, b):
            continue
        assert torch.equal(a, b.flip(-1))  # the same crop, mirrored left-right
        flips += 1
    assert 10 <= flips <= 30  # p = 0.5 over 40 samples
