"""Direct chunk reads of the cube layout (`pipeline.zarr_chunks`) against zarr's own reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.zarr_chunks import MissingChunk, open_chunked


def _array(path: Path, data: np.ndarray, chunks: tuple[int, ...], compressors: object) -> None:
    a = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
                          compressors=compressors, zarr_format=3)
    a[...] = data


def test_regions_equal_zarr_reads_including_edges_and_a_missing_chunk_is_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 5000, (2, 3, 70, 90), dtype=np.uint16)  # 70 x 90: partial edge chunks
    data[1, :, 32:64, 40:80] = 0  # whole chunks of zeros: zarr may skip writing them
    path = tmp_path / "dn"
    a = zarr.create_array(str(path), shape=data.shape, chunks=(1, 3, 32, 40), dtype="uint16", fill_value=0,
                          compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), zarr_format=3,
                          config={"write_empty_chunks": False})
    a[...] = data
    assert not (path / "c" / "1" / "0" / "1" / "1").exists()  # an unwritten chunk is in play
    arr = open_chunked(path)
    assert arr is not None and arr.chunks == (1, 3, 32, 40)
    boxes = [(slice(0, 1), slice(None), slice(0, 70), slice(0, 90)), (slice(1, 2), slice(None), slice(0, 31), slice(39, 81)),
             (slice(0, 1), slice(1, 2), slice(69, 70), slice(89, 90)), (slice(0, 2), slice(None), slice(5, 6), slice(0, 90))]
    # zarr reads an unwritten chunk as the fill value; the cube's writer writes every chunk, so
    # here a missing chunk is an incomplete cube: an error, never zeros taken for nodata
    with pytest.raises(MissingChunk, match=r"chunk \[1, 0, 1, 1\] is missing"):
        arr.region((slice(1, 2), slice(None), slice(31, 65), slice(39, 81)))
    for box in boxes:
        got = arr.region(box)
        np.testing.assert_array_equal(got, data[box])
        np.testing.assert_array_equal(got, a[box])
        assert got.flags.c_contiguous and got.dtype == np.uint16


def test_uint8_scl_and_other_layouts(tmp_path: Path) -> None:
    scl = np.random.default_rng(1).integers(0, 12, (1, 50, 60), dtype=np.uint8)
    _array(tmp_path / "scl", scl, (1, 16, 32), BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
    arr = open_chunked(tmp_path / "scl")
    assert arr is not None
    np.testing.assert_array_equal(arr.region((slice(0, 1), slice(10, 50), slice(3, 60))), scl[:, 10:50, 3:60])
    _array(tmp_path / "zstd", scl, (1, 16, 32), ZstdCodec())
    assert open_chunked(tmp_path / "zstd") is None  # not the cube's codecs: the caller reads through zarr
    assert open_chunked(tmp_path / "missing") is None


def test_a_truncated_chunk_is_an_error_not_stale_values(tmp_path: Path) -> None:
    data = np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64)
    _array(tmp_path / "dn", data, (1, 32, 32), BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
    arr = open_chunked(tmp_path / "dn")
    assert arr is not None
    chunk = tmp_path / "dn" / "c" / "0" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(ValueError, match="whole chunk"):
        arr.region((slice(0, 1), slice(0, 64), slice(0, 64)))


def test_chunks_written_here_are_zarrs_own_bytes(tmp_path: Path) -> None:
    """Dask blocks of several chunks (with partial edge chunks) stored through `write_region`
    give the files zarr writes for the same array, byte for byte; zarr reads them back."""
    import dask.array as da

    rng = np.random.default_rng(2)
    data = rng.integers(0, 3000, (2, 3, 70, 90), dtype=np.uint16)
    data[0, :, :10] = 0
    codec = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    _array(tmp_path / "zarr", data, (1, 3, 32, 40), codec)
    zarr.create_array(str(tmp_path / "here"), shape=data.shape, chunks=(1, 3, 32, 40), dtype="uint16", fill_value=0,
                      compressors=codec, zarr_format=3)
    target = open_chunked(tmp_path / "here")
    assert target is not None
    da.store(da.from_array(data, chunks=(1, 3, 64, 80)), target, lock=False)
    files = sorted(p.relative_to(tmp_path / "zarr") for p in (tmp_path / "zarr" / "c").rglob("*") if p.is_file())
    assert len(files) == 2 * 3 * 3
    for f in files:
        assert (tmp_path / "here" / f).read_bytes() == (tmp_path / "zarr" / f).read_bytes(), f
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "here"), mode="r")[...], data)
    with pytest.raises(ValueError, match="whole chunks"):
        target.write_region((slice(0, 1), slice(None), slice(16, 48), slice(0, 40)), data[:1, :, 16:48, :40])


def test_recycled_buffers_come_back_only_when_every_view_is_gone() -> None:
    from pipeline import zarr_chunks

    zarr_chunks.release_recycled()
    a = zarr_chunks.recycled_empty((2, 1024, 1024), np.uint16)
    a[...] = 7
    view = a[1, 10:20]
    addr = a.__array_interface__["data"][0]
    del a
    b = zarr_chunks.recycled_empty((2, 1024, 1024), np.uint16)  # `view` still holds the first buffer
    assert b.__array_interface__["data"][0] != addr and (view == 7).all()
    del view
    c = zarr_chunks.recycled_empty((2, 1024, 1024), np.uint16)
    assert c.__array_interface__["data"][0] == addr  # handed out again, no new pages
    zarr_chunks.release_recycled()
    assert not zarr_chunks._free
