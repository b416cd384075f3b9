"""Shard writer: caps, atomic names, deterministic bytes, webdataset round trip, exact stats."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.shards import ShardWriter, band_histogram, stats_from_histogram


def _samples(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    return [
        (f"T29UPU_20170617_abcd1234_s32_g10m_{i:05d}_00000", rng.integers(1, 4000, (12, 32, 32), dtype=np.uint16), {"i": i})
        for i in range(n)
    ]


def _write(root: Path, samples, max_samples=3, max_bytes=10**9) -> list:
    recs = []
    w = ShardWriter(root, "s32_g10m", "train", max_bytes, max_samples, with_hist=True, on_close=lambda r, h: recs.append((r, h)))
    for k, a, m in samples:
        w.write(k, a, m)
    w.close_shard()
    return recs


def test_caps_names_and_round_trip(tmp_path: Path) -> None:
    samples = _samples(7)
    recs = _write(tmp_path, samples)
    assert [r.num_samples for r, _ in recs] == [3, 3, 1]
    names = sorted(p.name for p in (tmp_path / "s32_g10m").iterdir())
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # no .tmp left
    for r, _ in recs:
        data = (tmp_path / r.path).read_bytes()
        assert len(data) == r.bytes and hashlib.sha256(data).hexdigest() == r.sha256
    urls = [str(tmp_path / r.path) for r, _ in recs]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [k for k, _, _ in samples]
    for g, (_, a, m) in zip(got, samples):
        np.testing.assert_array_equal(g["npy"], a)
        assert g["json"] == m


def test_byte_cap(tmp_path: Path) -> None:
    recs = _write(tmp_path, _samples(5), max_samples=100, max_bytes=60_000)  # one 24.7 kB sample + headers fits twice
    assert all(r.bytes <= 60_000 + 10_240 for r, _ in recs)  # tar end-of-archive padding may follow
    assert sum(r.num_samples for r, _ in recs) == 5 and len(recs) >= 3


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", _samples(4))
    b = _write(tmp_path / "b", _samples(4))
    assert [r.sha256 for r, _ in a] == [r.sha256 for r, _ in b]


def test_histogram_stats_exact() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3000, (2, 12, 40, 40), dtype=np.uint16)
    st = stats_from_histogram(band_histogram(x))
    for b in range(12):
        v = x[:, b].ravel()
        v = v[v > 0].astype(float)
        assert st["count"][b] == v.size
        assert abs(st["mean"][b] - v.mean()) < 1e-3
        assert abs(st["std"][b] - v.std()) < 1e-2
        assert st["percentiles"]["p50"][b] == int(np.percentile(v, 50, method="inverted_cdf"))
        assert st["percentiles"]["p2"][b] == int(np.percentile(v, 2, method="inverted_cdf"))
        assert st["min"][b] == v.min() and st["max"][b] == v.max()


def test_shard_histograms_count_every_valid_value_of_their_own_samples(tmp_path: Path) -> None:
    """Each closed train shard carries the per-band counts of exactly its samples (0 =
    nodata not counted), for chips [C, H, W] and time stacks [T, C, H, W] alike."""
    rng = np.random.default_rng(5)
    for shape in [(12, 24, 24), (3, 12, 16, 16)]:
        samples = [(f"k{shape[0]}_{i:05d}", rng.integers(0, 70, shape, dtype=np.uint16) * 937, {"i": i}) for i in range(5)]
        recs = _write(tmp_path / str(len(shape)), samples, max_samples=2)
        assert [r.num_samples for r, _ in recs] == [2, 2, 1]
        for n, (_, hist) in enumerate(recs):
            chunk = np.stack([a for _, a, _ in samples[2 * n : 2 * n + 2]])  # [N, (T,) C, H, W]
            bands = np.moveaxis(chunk.reshape(-1, 12, shape[-2] * shape[-1]), 1, 0).reshape(12, -1)
            want = np.stack([np.bincount(b.astype(np.int64), minlength=65536) for b in bands])
            want[:, 0] = 0
            assert hist.shape == (12, 65536) and hist.dtype == np.int64
            np.testing.assert_array_equal(hist, want)
            assert hist[:, 937].sum() > 0 and hist[:, 69 * 937].sum() > 0  # the top value (64653) counted


def test_shard_bytes_equal_what_tarfile_writes(tmp_path: Path) -> None:
    """The direct member writer frames samples exactly as `tarfile` does (headers, padding,
    end-of-archive record), so shards stay standard tars and byte-identical across versions."""
    import io
    import tarfile

    from pipeline.shards import encode_sample

    rng = np.random.default_rng(5)
    samples = [(f"k{i}", rng.integers(0, 9000, (12, 9 + i, 7), dtype=np.uint16), {"i": i, "n": "x" * i}) for i in range(5)]
    w = ShardWriter(tmp_path, "d", "train", max_bytes=1 << 30, max_samples=100)
    for key, data, meta in samples:
        w.write(key, data, meta)
    rec = w.close_shard()
    assert rec is not None
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, data, meta in samples:
            for name, payload in zip((f"{key}.npy", f"{key}.json"), encode_sample(data, meta)):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(payload), 0, 0o444, 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(payload))
    got = (tmp_path / rec.path).read_bytes()
    assert got == ref.getvalue() and rec.bytes == len(got)
    with tarfile.open(tmp_path / rec.path) as t:
        member = t.extractfile("k3.npy")
        assert member is not None
        np.testing.assert_array_equal(np.load(io.BytesIO(member.read()), allow_pickle=False), samples[3][1])


def test_shards_are_the_same_where_o_direct_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Filesystems without O_DIRECT (older tmpfs, some network mounts) answer EINVAL at open;
    the writer then goes through the page cache and the shards are byte-identical. (The
    refusal is simulated: every filesystem on this machine accepts O_DIRECT.)"""
    import errno
    import os

    from pipeline import shards

    samples = _samples(5)
    direct = _write(tmp_path / "direct", samples)
    real_open = os.open

    def refuse(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse)
    assert not isinstance(shards.DirectFile.open(tmp_path / "probe"), shards.DirectFile)
    buffered = _write(tmp_path / "buffered", samples)
    assert [(r.sha256, r.bytes) for r, _ in direct] == [(r.sha256, r.bytes) for r, _ in buffered]
    for r, _ in direct:
        assert (tmp_path / "direct" / r.path).stat().st_size == r.bytes  # trimmed to the exact length


def test_a_shard_larger_than_the_write_buffers_is_complete(tmp_path: Path) -> None:
    """12.6 MB in one shard: three 4 MB O_DIRECT blocks, the background writer and the final
    padded block trimmed; the tar reads back with every sample and the recorded hash."""
    import io
    import tarfile

    rng = np.random.default_rng(9)
    samples = [(f"big_{i:05d}", rng.integers(1, 60000, (12, 256, 256), dtype=np.uint16), {"i": i}) for i in range(8)]
    (rec, _), = _write(tmp_path, samples, max_samples=100)
    data = (tmp_path / rec.path).read_bytes()
    assert rec.bytes == len(data) > 3 * (4 << 20) and hashlib.sha256(data).hexdigest() == rec.sha256
    with tarfile.open(tmp_path / rec.path) as tf:
        for k, a, _ in samples:
            got = np.lib.format.read_array(io.BytesIO(tf.extractfile(f"{k}.npy").read()))
            np.testing.assert_array_equal(got, a)
