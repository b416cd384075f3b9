"""Direct reads of the cube's zarr v3 chunks: the tiling's hot read path.

The cube is written by `cube.write_cube` with one fixed layout: a local zarr v3 array with a
regular chunk grid, default "/" chunk keys, and the codecs `bytes` (little endian) + `blosc`.
For exactly that layout, a region is read here by decompressing each chunk file with Blosc
straight into a reusable buffer and copying the overlap into place. Measured on a quarter
scene's cube (720 MB of uint16, one thread): 0.52 s, against 1.1 s through zarr's own
reader, whose asynchronous machinery costs more than the decompression itself. Any other
layout (remote stores, sharding, other codecs) returns None from `open_chunked`, and the
caller reads through zarr: the format stays plain zarr either way.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ChunkedArray:
    """A local zarr v3 array of the cube's layout: `region` reads any box of it."""

    path: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill: int

    def region(self, box: tuple[slice, ...]) -> np.ndarray:
        """The values of `box` (one slice per axis, step 1) as a new C-ordered array."""
        from numcodecs import blosc

        lo = [0 if s.start is None else s.start for s in box]
        hi = [n if s.stop is None else min(s.stop, n) for s, n in zip(box, self.shape)]
        out = np.empty([b - a for a, b in zip(lo, hi)], self.dtype)
        scratch = _scratch(int(np.prod(self.chunks)) * self.dtype.itemsize)
        chunk = np.frombuffer(scratch, self.dtype).reshape(self.chunks)
        for idx in np.ndindex(*[(b - 1) // c - a // c + 1 for a, b, c in zip(lo, hi, self.chunks)]):
            cidx = [a // c + i for a, c, i in zip(lo, self.chunks, idx)]
            origin = [i * c for i, c in zip(cidx, self.chunks)]
            dst = tuple(slice(max(a, o) - a, min(b, o + c) - a) for a, b, o, c in zip(lo, hi, origin, self.chunks))
            src = tuple(slice(max(a, o) - o, min(b, o + c) - o) for a, b, o, c in zip(lo, hi, origin, self.chunks))
            try:
                data = (self.path / "c" / "/".join(map(str, cidx))).read_bytes()
            except FileNotFoundError:  # never written: the fill value (zarr's rule)
                out[dst] = self.fill
                continue
            # Blosc's 16-byte header: version, versionlz, flags, typesize, then nbytes (uint32 LE)
            if len(data) < 16 or struct.unpack_from("<I", data, 4)[0] != len(scratch):
                raise ValueError(f"{self.path}: chunk {cidx} does not hold a whole chunk of {self.chunks}")
            blosc.decompress(data, scratch)  # releases the GIL
            out[dst] = chunk[src]
        return out


_local = threading.local()


def _scratch(n: int) -> bytearray:
    """A per-thread buffer of at least `n` bytes, reused across chunks (no fresh pages per chunk)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) != n:
        buf = _local.buf = bytearray(n)
    return buf


def open_chunked(array_dir: str | Path) -> ChunkedArray | None:
    """The array at `array_dir` if it has exactly the cube's layout, else None."""
    path = Path(array_dir)
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    grid = meta.get("chunk_grid", {})
    keys = meta.get("chunk_key_encoding", {})
    dtype = meta.get("data_type")
    if (
        meta.get("zarr_format") != 3
        or meta.get("storage_transformers")
        or grid.get("name") != "regular"
        or keys.get("name") != "default"
        or keys.get("configuration", {}).get("separator", "/") != "/"
        or codecs != ["bytes", "blosc"]
        or meta["codecs"][0].get("configuration", {}).get("endian", "little") != "little"
        or dtype not in ("uint8", "uint16")
        or not isinstance(meta.get("fill_value"), int)
        or sys.byteorder != "little"
    ):
        return None
    return ChunkedArray(
        path, tuple(meta["shape"]), tuple(grid["configuration"]["chunk_shape"]), np.dtype(dtype), int(meta["fill_value"])
    )
