"""Loader contracts: manifest checks, exact resume position, normalisation, crops."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from make_test_shards import write_dataset
from training.config import RunConfig, load_config
from training.data import (
    DataPosition,
    ShardStream,
    make_loader,
    normalise,
    random_resized_crop,
    read_shard_set,
    track,
)
from training.errors import DataError


def _run(manifest: Path, *extra: str) -> RunConfig:
    return load_config(overrides=[f"manifest={manifest}", "shuffle_buffer=8",
                                  "shuffle_initial=2", *extra])


def _batches(run: RunConfig, manifest: Path, position: DataPosition, n: int, workers: int,
             rank: int = 0, world: int = 1) -> list[dict]:
    stage = run.stages[0]
    ss = read_shard_set(manifest, stage.dataset, stage.split, run.model_for(stage))
    stream = ShardStream(ss, run, stage, stage_index=0, rank=rank, world_size=world,
                         position=position)
    out = []
    for batch in make_loader(stream, micro_batch=3, num_workers=workers, num_batches=n):
        track(position, rank, batch)
        out.append(batch)
    return out


def test_read_shard_set(manifest: Path) -> None:
    run = _run(manifest)
    ss = read_shard_set(manifest, "s96_g10m", "train", run.model_for(run.stages[0]))
    assert ss.num_samples == 9 and len(ss.shards) == 2 and len(ss.mean) == 12
    assert all(Path(s).is_absolute() and Path(s).is_file() for s in ss.shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(manifest: Path, workers: int) -> None:
    run = _run(manifest)
    full = _batches(run, manifest, DataPosition.start(1, max(workers, 1)), 7, workers)
    # Stop after 3 batches (an odd number: worker 0 is one batch ahead), save the position
    # through JSON as a checkpoint would, and continue.
    first = DataPosition.start(1, max(workers, 1))
    _batches(run, manifest, first, 3, workers)
    saved = DataPosition.from_dict(json.loads(json.dumps(first.to_dict())))
    rest = _batches(run, manifest, saved.resumed(1, max(workers, 1)), 4, workers)
    for a, b in zip(full[3:], rest):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"])
    assert saved.consumed == [[9]] if workers == 0 else saved.consumed == [[6, 3]]


def test_streams_differ_by_rank_and_position_restarts_on_a_new_world(manifest: Path) -> None:
    run = _run(manifest)
    a = _batches(run, manifest, DataPosition.start(2, 1), 2, 0, rank=0, world=2)
    b = _batches(run, manifest, DataPosition.start(2, 1), 2, 0, rank=1, world=2)
    assert not torch.equal(a[0]["image"], b[0]["image"])
    pos = DataPosition.start(2, 1)
    pos.consumed = [[6], [6]]
    moved = pos.resumed(1, 1)
    assert moved.generation == 1 and moved.consumed == [[0]]


def test_shards_are_split_by_node_and_worker_when_there_are_enough(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, sizes={"s96_g10m": 96}, samples={"train": 8},
                             shard_size=1)
    run = load_config(overrides=[f"manifest={manifest}", "stages=[{name: a, dataset: s96_g10m, "
                                 "img_size: 96, samples: 8}]"])
    ss = read_shard_set(manifest, "s96_g10m", "train", run.model_for(run.stages[0]))
    seen = []
    for rank in range(2):
        stream = ShardStream(ss, run, run.stages[0], stage_index=0, rank=rank, world_size=2,
                             position=DataPosition.start(2, 2))
        for worker in range(2):
            seen.append(stream.shards_for(worker, 2))
    assert all(len(s) == 2 for s in seen)
    assert sorted(sum(seen, [])) == sorted(ss.shards)  # disjoint and complete


def test_normalisation_modes_and_nodata() -> None:
    x = torch.tensor([[[0.0, 100.0], [300.0, 500.0]]])  # one band, one nodata pixel
    valid = x != 0
    mm = normalise(x, valid, "per_image_minmax", torch.zeros(1), torch.ones(1))
    torch.testing.assert_close(mm, torch.tensor([[[0.0, 0.0], [0.5, 1.0]]]))
    zs = normalise(x, valid, "dataset_stats", torch.tensor([300.0]), torch.tensor([200.0]))
    torch.testing.assert_close(zs, torch.tensor([[[0.0, -1.0], [0.0, 1.0]]]))


def test_random_resized_crop_is_seeded_and_sized() -> None:
    x = torch.rand(12, 120, 120)
    a = random_resized_crop(x, 128, (0.2, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    b = random_resized_crop(x, 128, (0.2, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    assert a.shape == (12, 128, 128) and torch.equal(a, b)
    full = random_resized_crop(x, 120, (1.0, 1.0), (1.0, 1.0), np.random.default_rng(0))
    assert torch.equal(full, x)  # the whole chip at its own size is returned unchanged


def _copy(manifest: Path, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "copy"
    shutil.copytree(manifest.parent, root)
    return root / "manifest.json", json.loads((root / "manifest.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="other/1"), "format"),
    (lambda m: m["datasets"].pop("s96_g10m"), "data set 's96_g10m' not in manifest"),
    (lambda m: m["datasets"]["s96_g10m"]["splits"].pop("train"), "split 'train'"),
    (lambda m: m["datasets"]["s96_g10m"]["splits"]["train"].update(shards=[], num_samples=0),
     "has no samples"),
    (lambda m: m["datasets"]["s96_g10m"]["splits"]["train"]["shards"][0].update(
        path="s96_g10m/gone.tar"), "missing"),
    (lambda m: m["datasets"]["s96_g10m"].update(shape=[12, 64, 64]), "64x64 px chips"),
    (lambda m: m["datasets"]["s96_g10m"]["stats"].update(mean=[float("nan")] * 12),
     "non-finite"),
])
def test_manifest_problems_are_one_clear_error(manifest: Path, tmp_path: Path, edit,
                                               message: str) -> None:
    path, data = _copy(manifest, tmp_path)
    edit(data)
    path.write_text(json.dumps(data))
    run = _run(path)
    with pytest.raises(DataError, match=message):
        read_shard_set(path, "s96_g10m", "train", run.model_for(run.stages[0]))


def test_band_count_mismatch_is_refused(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, sizes={"s96_g10m": 96}, samples={"train": 2}, bands=10)
    run = _run(manifest)
    with pytest.raises(DataError, match="10 bands .* num_bands=12"):
        read_shard_set(manifest, "s96_g10m", "train", run.model_for(run.stages[0]))


def test_pickled_arrays_are_not_decoded(manifest: Path, tmp_path: Path) -> None:
    """The .npy members are read with allow_pickle=False: an object array is refused."""
    path, data = _copy(manifest, tmp_path)
    shard = path.parent / "s96_g10m" / "train-000000.tar"
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "bad", "npy": buf.getvalue(), "json": {}})
    data["datasets"]["s96_g10m"]["splits"]["train"]["shards"] = \
        data["datasets"]["s96_g10m"]["splits"]["train"]["shards"][:1]
    path.write_text(json.dumps(data))
    run = _run(path)
    with pytest.raises(ValueError, match="allow_pickle"):
        _batches(run, path, DataPosition.start(1, 1), 1, 0)
