"""Loader contracts: manifest checks, exact resume position, normalisation, crops, bad
shards and samples (skipped and counted, or fatal), dataset versions."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

import training.data
from make_test_shards import write_dataset
from training.config import RunConfig, load_config
from training.data import (
    DataPosition,
    ShardStream,
    decode_chip,
    iterate,
    make_loader,
    normalise,
    random_resized_crop,
    read_shard_set,
    tar_samples,
    track,
)
from training.errors import ConfigError, DataError


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
    loader = make_loader(stream, micro_batch=3, num_workers=workers, num_batches=n)
    for batch in iterate(loader):
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


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that something was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _four_shards(tmp_path: Path) -> Path:
    """One data set, 12 train samples in 4 shards of 3 (2 workers -> 2 shards per stream)."""
    return write_dataset(tmp_path, sizes={"s96_g10m": 96}, samples={"train": 12}, shard_size=3)


def _shard(manifest: Path, i: int) -> Path:
    return manifest.parent / "s96_g10m" / f"train-{i:06d}.tar"


def _stage_run(manifest: Path, *extra: str) -> RunConfig:
    return _run(manifest, "stages=[{name: a, dataset: s96_g10m, img_size: 96, samples: 12}]",
                *extra)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_second_half(path: Path) -> None:
    data = path.read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, len(data) - len(data) // 2, np.uint8)
    path.write_bytes(data[: len(data) // 2] + noise.tobytes())


def _garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(1).integers(0, 256, size, np.uint8).tobytes())


def _unlisted_size(manifest: Path) -> None:
    """An older manifest without shard sizes: the damage must be found while reading."""
    data = json.loads(manifest.read_text())
    for shard in data["datasets"]["s96_g10m"]["splits"]["train"]["shards"]:
        shard.pop("bytes")
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, unlisted", [
    (_truncate, False), (_truncate, True), (_garbage_second_half, False), (_garbage, False)],
    ids=["truncated", "truncated-no-size-in-manifest", "garbage-second-half", "garbage"])
def test_a_damaged_shard_is_skipped_once_and_counted(tmp_path: Path, damage,
                                                      unlisted: bool) -> None:
    manifest = _four_shards(tmp_path)
    damage(_shard(manifest, 0))
    if unlisted:
        _unlisted_size(manifest)
    run = _stage_run(manifest)
    position = DataPosition.start(1, 1)
    batches = _batches(run, manifest, position, 12, 0)  # one stream drawing from all 4 shards
    assert position.bad_data() == (0, 1)  # skipped, not drawn again
    assert all(torch.isfinite(b["image"]).all() for b in batches)
    if damage is _truncate and not unlisted:  # the size check refuses it before reading
        first = {f"{k}" for k in _keys(_shard(_four_shards(tmp_path / "clean"), 0))}
        assert not first & {k for b in batches for k in b["key"]}


def _keys(shard: Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]


def test_bad_shard_counts_travel_with_the_batches_from_every_worker(tmp_path: Path) -> None:
    manifest = _four_shards(tmp_path)
    _truncate(_shard(manifest, 0))  # stream 0 reads shards 0 and 2
    _garbage(_shard(manifest, 1))  # stream 1 reads shards 1 and 3
    run = _stage_run(manifest)
    position = DataPosition.start(1, 2)
    batches = _batches(run, manifest, position, 8, 2)
    assert position.bad_shards == [[1, 1]] and position.bad_data() == (0, 2)
    assert {b["worker"][0].item() for b in batches} == {0, 1}
    # The counts are saved with the position (checkpoints) and survive a resume.
    saved = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
    assert saved.resumed(1, 2).bad_shards == [[1, 1]]
    assert DataPosition.from_dict({k: v for k, v in position.to_dict().items()
                                   if not k.startswith("bad")}).bad_data() == (0, 0)


def _only_pickled_sample(manifest: Path, marker: Path, key: str) -> None:
    """Rewrite shard 0 as one sample whose .npy is a pickled `_Payload`, and relist it."""
    with wds.TarWriter(str(_shard(manifest, 0))) as sink:
        sink.write({"__key__": key, "npy": _npy(np.array([_Payload(marker)], dtype=object), allow_pickle=True),
                    "json": {}})
    _relist(manifest)


def _bad_sample_shard(path: Path, marker: Path) -> list[str]:
    """Rewrite ``path`` with 3 good chips and one bad sample of each kind; return good keys."""
    rng = np.random.default_rng(0)
    good = [rng.integers(1, 10000, (12, 96, 96), dtype=np.uint16) for _ in range(3)]
    bad = {
        "shape": _npy(rng.integers(1, 10000, (12, 48, 48), dtype=np.uint16)),
        "bands": _npy(rng.integers(1, 10000, (10, 96, 96), dtype=np.uint16)),
        "dtype": _npy(rng.random((12, 96, 96)).astype(np.float32)),
        "pickle": _npy(np.array([_Payload(marker)], dtype=object), allow_pickle=True),
        "notnpy": b"garbage, not an array",
    }
    with wds.TarWriter(str(path)) as sink:
        for i, chip in enumerate(good):
            sink.write({"__key__": f"good{i}", "npy": _npy(chip), "json": {}})
        for name, data in bad.items():
            sink.write({"__key__": f"bad_{name}", "npy": data, "json": {}})
        sink.write({"__key__": "bad_nonpy", "json": {}})
    return [f"good{i}" for i in range(3)]


def _relist(manifest: Path, shards: int = 1) -> None:
    """Keep the first ``shards`` shards, with their real sizes and sample counts."""
    data = json.loads(manifest.read_text())
    split = data["datasets"]["s96_g10m"]["splits"]["train"]
    split["shards"] = split["shards"][:shards]
    for shard in split["shards"]:
        path = manifest.parent / shard["path"]
        shard.update(bytes=path.stat().st_size, num_samples=len(_keys(path)))
    split["num_samples"] = sum(s["num_samples"] for s in split["shards"])
    manifest.write_text(json.dumps(data))


def test_bad_samples_are_rejected_counted_and_never_unpickled(tmp_path: Path) -> None:
    manifest = _four_shards(tmp_path)
    marker = tmp_path / "pickle-ran"
    good = _bad_sample_shard(_shard(manifest, 0), marker)
    _relist(manifest)
    run = _stage_run(manifest)
    position = DataPosition.start(1, 1)
    batches = _batches(run, manifest, position, 4, 0)
    assert {k for b in batches for k in b["key"]} == set(good)
    # 6 rejected per pass over the shard; the stream passed over it at least twice.
    samples, shards = position.bad_data()
    assert shards == 0 and samples >= 12 and samples % 6 == 0
    assert not marker.exists()


def test_a_shard_of_only_bad_samples_is_one_clear_error(tmp_path: Path) -> None:
    manifest = _four_shards(tmp_path)
    marker = tmp_path / "pickle-ran"
    _only_pickled_sample(manifest, marker, "bad")
    with pytest.raises(DataError, match="no usable sample in any of the 1 shard"):
        _batches(_stage_run(manifest), manifest, DataPosition.start(1, 1), 1, 0)
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_on_bad_data_fail_stops_with_one_line(tmp_path: Path, workers: int) -> None:
    manifest = _four_shards(tmp_path)
    _truncate(_shard(manifest, 2))
    run = _stage_run(manifest, "on_bad_data=fail")
    with pytest.raises(DataError) as info:
        _batches(run, manifest, DataPosition.start(1, max(workers, 1)), 8, workers)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert "train-000002.tar is unreadable" in message and "on_bad_data: fail" in message


def test_on_bad_data_fail_refuses_a_pickled_sample(tmp_path: Path) -> None:
    manifest = _four_shards(tmp_path)
    marker = tmp_path / "pickle-ran"
    _bad_sample_shard(_shard(manifest, 0), marker)
    _relist(manifest)
    with pytest.raises(DataError, match="sample 'bad_shape' .* expected uint16 \\[12, 96, 96\\]"):
        _batches(_stage_run(manifest, "on_bad_data=fail"), manifest, DataPosition.start(1, 1),
                 4, 0)
    _only_pickled_sample(manifest, marker, "evil")
    with pytest.raises(DataError, match="sample 'evil' .* is object"):
        _batches(_stage_run(manifest, "on_bad_data=fail"), manifest, DataPosition.start(1, 1),
                 1, 0)
    assert not marker.exists()


def test_tar_members_are_read_into_memory_not_extracted(tmp_path: Path) -> None:
    """A member named like a path outside the tree is only read; a symlink is refused."""
    target = tmp_path / "outside.npy"
    data = _npy(np.zeros((12, 96, 96), np.uint16))

    def tar_of(*members: tarfile.TarInfo) -> Path:
        path = tmp_path / "evil.tar"
        with tarfile.open(path, "w") as tar:
            for info in members:
                tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
        return path

    outside, plain = tarfile.TarInfo(f"../{target.name}"), tarfile.TarInfo("plain.npy")
    outside.size = plain.size = len(data)
    with tar_of(outside, plain).open("rb") as fh:
        samples = list(tar_samples(fh))
    assert [k for k, _ in samples] == [f"../{target.stem}", "plain"] and not target.exists()
    assert decode_chip(samples[0][1]["npy"], (12, 96, 96)).shape == (12, 96, 96)
    # the same samples through a stream (tarfile's stream mode) as from the file
    assert list(tar_samples(_unseekable(tar_of(outside, plain).read_bytes()))) == samples
    link = tarfile.TarInfo("link.npy")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tar_of(link).open("rb") as fh, pytest.raises(ValueError, match="not a regular file"):
        list(tar_samples(fh))


def test_decode_chip_matches_numpy_and_checks_the_data_length() -> None:
    rng = np.random.default_rng(3)
    chip = rng.integers(0, 10001, (12, 96, 96), dtype=np.uint16)
    for arr in (chip, np.asfortranarray(chip)):
        got = decode_chip(_npy(arr), (12, 96, 96))
        assert got.dtype == np.uint16 and np.array_equal(got, chip)
        assert got.sum(dtype=np.int64) == chip.sum(dtype=np.int64)
    data = _npy(chip)
    with pytest.raises(ValueError, match="holds 221182 data bytes, its header says 221184"):
        decode_chip(data[:-2], (12, 96, 96))
    with pytest.raises(ValueError, match="not a .npy array"):
        decode_chip(b"\x93NUMPY\x01\x00\x10\x00{'descr': '<u2'", (12, 96, 96))
    with pytest.raises(ValueError, match="not a .npy array"):
        decode_chip(b"PK\x03\x04 a zip file", (12, 96, 96))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_extension_headers_mid_shard_are_read_like_tarfile(tmp_path: Path, fmt: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain members are read directly; from a long-name header on, tarfile reads the rest."""
    chips = [np.full((12, 96, 96), v, np.uint16) for v in (1, 2, 3)]
    names = ["a", "b" * 120, "c"]  # > 100 characters: a pax or GNU long-name header
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, chip in zip(names, chips):
            for ext, data in (("npy", _npy(chip)), ("json", b"{}")):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    taken_over_at: list[int] = []
    real = training.data._tarfile_members

    def spy(fh: Any, mode: str) -> Any:
        taken_over_at.append(fh.tell() if fh.seekable() else -1)
        return real(fh, mode)

    monkeypatch.setattr(training.data, "_tarfile_members", spy)
    with path.open("rb") as fh:
        samples = list(tar_samples(fh))
    assert [k for k, _ in samples] == names
    padded = -(-len(_npy(chips[0])) // 512) * 512
    assert taken_over_at == [512 + padded + 512 + 512]  # a.npy and a.json were read directly
    assert [int(decode_chip(m["npy"], (12, 96, 96))[0, 0, 0]) for _, m in samples] == [1, 2, 3]
    assert list(tar_samples(_unseekable(path.read_bytes()))) == samples  # tarfile alone
    assert taken_over_at[1:] == [-1]


def _unseekable(data: bytes) -> io.BufferedReader:
    """A pipe-like file object: tar_samples reads it with tarfile's stream mode."""
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.src = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            return self.src.readinto(b)

    return io.BufferedReader(Pipe())


# --------------------------------------------------------------------------- dataset versions


def _two_versions(tmp_path: Path) -> tuple[Path, dict]:
    """A hand-edited manifest: version 1 added shard 0, version 2 added shard 1."""
    manifest = write_dataset(tmp_path, sizes={"s96_g10m": 96}, samples={"train": 9})
    data = json.loads(manifest.read_text())
    entry = data["datasets"]["s96_g10m"]
    shards = entry["splits"]["train"]["shards"]
    stats1 = {**entry["stats"], "mean": [100.0 + b for b in range(12)]}
    data["versions"] = [
        {"version": v, "items": [], "failed": [], "datasets": {"s96_g10m": {
            "splits": {"train": {"num_samples": shard["num_samples"], "shards": [shard]},
                       "val": {"num_samples": 0, "shards": []}},
            "dropped": {}, "stats": stats}}}
        for v, shard, stats in ((1, shards[0], stats1), (2, shards[1], entry["stats"]))]
    data["latest_version"] = 2
    manifest.write_text(json.dumps(data))
    return manifest, data


def test_dataset_version_pins_shards_and_statistics(tmp_path: Path) -> None:
    manifest, data = _two_versions(tmp_path)
    model = _run(manifest).model_for(_run(manifest).stages[0])
    entry = data["datasets"]["s96_g10m"]
    latest = read_shard_set(manifest, "s96_g10m", "train", model)
    assert (latest.version, latest.num_samples, len(latest.shards)) == (2, 9, 2)
    assert list(latest.mean) == entry["stats"]["mean"]
    one = read_shard_set(manifest, "s96_g10m", "train", model, version=1)
    assert (one.version, one.num_samples, one.shards) == (1, 6, latest.shards[:1])
    assert list(one.mean) == [100.0 + b for b in range(12)]
    assert one.shard_bytes == latest.shard_bytes[:1]
    two = read_shard_set(manifest, "s96_g10m", "train", model, version=2)
    assert (two.shards, two.mean, two.num_samples) == (latest.shards, latest.mean, 9)
    assert one.describe()["version"] == 1 and one.describe()["mean"] == list(one.mean)
    with pytest.raises(DataError, match=r"dataset_version 3 is not in .* \(versions 1, 2\)"):
        read_shard_set(manifest, "s96_g10m", "train", model, version=3)


def test_a_manifest_without_versions_reads_as_latest(manifest: Path) -> None:
    model = _run(manifest).model_for(_run(manifest).stages[0])
    latest = read_shard_set(manifest, "s96_g10m", "train", model)
    assert latest.version is None
    assert read_shard_set(manifest, "s96_g10m", "train", model, version=1).shards == \
        latest.shards
    with pytest.raises(DataError, match="lists no versions .* use dataset_version: latest"):
        read_shard_set(manifest, "s96_g10m", "train", model, version=2)


@pytest.mark.parametrize("value, ok", [("latest", True), ("3", True), ("0", False),
                                       ("newest", False), ("true", False)])
def test_dataset_version_and_on_bad_data_config_keys(manifest: Path, value: str,
                                                     ok: bool) -> None:
    if ok:
        run = _run(manifest, f"dataset_version={value}")
        assert run.dataset_version == (value if value == "latest" else int(value))
        assert run.on_bad_data == "skip"
        assert load_config(overrides=[f"dataset_version={value}"]).to_dict()[
            "dataset_version"] == run.dataset_version
    else:
        with pytest.raises(ConfigError, match="dataset_version"):
            _run(manifest, f"dataset_version={value}")
    with pytest.raises(ConfigError, match="on_bad_data"):
        _run(manifest, "on_bad_data=ignore")
