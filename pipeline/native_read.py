"""Lazy Dask reads of Sentinel-2 bands on their own, aligned MGRS grid.

Every band of an L2A tile shares one origin; 20 m and 60 m bands are the 10 m grid
coarsened by 2 and 6. For such aligned grids, a 10 m block is exactly a native window
upsampled by an integer factor, so the cube can be read with plain windowed rasterio reads
plus a small numpy upsampling, instead of a general GDAL warp per block. Measured on a
quarter scene (12 bands, 2745 px), odc-stac's warped load took 5.8 s (bilinear) and 3.5 s
(nearest) against 0.45 s to decode the same bands natively (research note section 5 and
benchmarks/RESULTS.md): the warp, not the decoding, was the cost.

`aligned_factors` says whether a unit qualifies; `cube.load_unit` falls back to odc-stac
(which handles any grid) when it does not, or for resampling methods other than nearest
and bilinear. Upsampling follows GDAL's pixel-centre convention; bilinear is nodata-aware
(0 never bleeds into valid pixels), as in `tiling.resize_bilinear`, and runs as one
compiled loop with the offset removal (`kernels.bilinear_offset`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from pipeline.lru import SharedLRU

# Open datasets per (thread, href): rasterio handles are not thread-safe, and reopening per
# block would re-read the COG header each time. `close_all()` releases them after each grid
# and before a retry; each handle's lock is held while it reads, so a close from another
# thread (a retry's clean-up while a failed computation's last tasks still run) waits for
# the read instead of pulling the dataset from under GDAL (a segfault).
@dataclass
class _Handle:
    lock: threading.Lock
    ds: Any = None


_handles: dict[tuple[int, str], _Handle] = {}
_handles_lock = threading.Lock()


# Decoded COG tiles (one internal block each), shared by every read task of the process.
# A 1152 x 1024 px cube chunk straddles the 512 px tiles of a 10 m band, and the window of a
# 20 m or 60 m band covers parts of up to nine tiles, so decoding each chunk's window on its
# own decoded every tile 2.2 times on average (quarter scene, one thread: 4.2 s against 1.95 s
# to decode every band once; GDAL's block cache did not help: each thread has its own handle,
# and a full scene's row of chunks outgrows it). Whole tiles are read aligned, so GDAL decodes
# exactly one block per read, and kept here until evicted. Chunks are computed roughly in row
# order, so a tile is reused within about one chunk row of all bands (~220 MB, full scene).
TILE_CACHE_BYTES = 384 << 20
_tiles: SharedLRU[np.ndarray] = SharedLRU(TILE_CACHE_BYTES, weight=lambda a: a.nbytes)


def close_all() -> None:
    """Close the cached COG handles and drop the decoded tiles (after each grid, before a retry)."""
    with _handles_lock:
        handles = list(_handles.values())
        _handles.clear()
    for h in handles:
        _close(h)
    _tiles.clear()


def _close(h: _Handle) -> None:
    with h.lock:  # waits for a read in flight
        if h.ds is not None:
            h.ds.close()


def aligned_factor(asset: dict[str, Any], grid_transform: Sequence[float], grid_shape: Sequence[int]) -> int | None:
    """Integer factor k when the asset's grid is the 10 m grid coarsened by k (same origin), else None."""
    t = asset.get("proj:transform")
    shape = asset.get("proj:shape")
    if not t or not shape:
        return None
    a, b, c, d, e, f = (float(v) for v in t[:6])
    ga, _, gc, _, ge, gf = (float(v) for v in grid_transform[:6])
    if b or d or abs(c - gc) > 1e-6 or abs(f - gf) > 1e-6:
        return None
    k = a / ga
    if k < 1 or abs(k - round(k)) > 1e-9 or abs(e / ge - k) > 1e-9:
        return None
    k = int(round(k))
    if int(shape[0]) * k < grid_shape[0] or int(shape[1]) * k < grid_shape[1]:
        return None
    return k


def _axis(out0: int, out1: int, k: int, n_src: int, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and float64 weight of i1 for output pixels [out0, out1) of an axis."""
    o = np.arange(out0, out1)
    if method == "nearest" or k == 1:
        i0 = np.minimum(o // k, n_src - 1)
        return i0, i0, np.zeros(len(o))
    u = (o + 0.5) / k - 0.5  # pixel centres (GDAL convention)
    i0 = np.floor(u).astype(np.int64)
    w = u - i0
    i1 = np.clip(i0 + 1, 0, n_src - 1)
    i0 = np.clip(i0, 0, n_src - 1)
    return i0, i1, w


@contextlib.contextmanager
def _using(href: str) -> Iterator[Any]:
    """This thread's open dataset for `href`, held (locked) for the duration of the block."""
    import rasterio

    key = (threading.get_ident(), href)
    with _handles_lock:
        h = _handles.get(key)
        if h is None:
            h = _handles[key] = _Handle(threading.Lock())
    with h.lock:
        if h.ds is None or h.ds.closed:  # new, or closed by `close_all` since it was looked up
            h.ds = rasterio.open(href)
        yield h.ds


def read_block(
    href: str, k: int, method: str, y0: int, y1: int, x0: int, x1: int, src_shape: tuple[int, int], env: dict[str, str],
    offset: int = 0, out: np.ndarray | None = None,
) -> np.ndarray:
    """uint16/uint8 [y1-y0, x1-x0] block of the 10 m grid from a band at k x 10 m, with
    `offset` DN removed from valid pixels (`harmonise.remove_offset`'s rule), written
    into `out` when given (C-contiguous, that shape and the band's dtype).

    A 10 m band is decoded straight into `out`; a coarser one is decoded at its native
    size and upsampled by `kernels.bilinear_offset` (nodata-aware, offset removed in the
    same pass) or by repetition (nearest)."""
    import rasterio

    from pipeline import kernels

    h, w = src_shape
    iy0, iy1, wy = _axis(y0, y1, k, h, method)
    ix0, ix1, wx = _axis(x0, x1, k, w, method)
    r0, r1 = int(iy0[0]), int(iy1[-1]) + 1  # indices rise along the axis
    c0, c1 = int(ix0[0]), int(ix1[-1]) + 1
    direct = k == 1 and (r1 - r0, c1 - c0) == (y1 - y0, x1 - x0)  # a 10 m band: the window is the block
    with rasterio.Env(**env):
        src = _read_window(href, r0, r1, c0, c1, out if direct else None)
    if direct:
        res = src
    elif method == "nearest":  # columns gathered on the k-times smaller source first, then whole rows
        res = src[:, ix0 - c0][iy0 - r0]
    else:
        res = out if out is not None else np.empty((y1 - y0, x1 - x0), src.dtype)
        kernels.bilinear_offset(src, iy0 - r0, iy1 - r0, wy, ix0 - c0, ix1 - c0, wx, offset, res)
        return res
    if out is not None and res is not out:
        out[...] = res
        res = out
    if offset:
        kernels.remove_offset_inplace(res.reshape(-1), offset)
    return res


def _read_window(href: str, r0: int, r1: int, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Native pixels [r0, r1) x [c0, c1) of band 1 of `href`, assembled from whole decoded
    tiles (`_tiles`), into `out` when given. Call inside a `rasterio.Env`."""
    from rasterio.windows import Window

    with _using(href) as ds:
        th, tw = ds.block_shapes[0]
        if out is None:
            out = np.empty((r1 - r0, c1 - c0), ds.dtypes[0])
        if th < 64 or tw < 64:  # strips or tiny tiles (not a COG): a plain windowed read
            return ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), out=out)
        base = href.split("?", 1)[0]  # a signed URL's token may change between reads; the tile does not
        for ty in range(r0 // th, (r1 - 1) // th + 1):
            for tx in range(c0 // tw, (c1 - 1) // tw + 1):
                win = Window(tx * tw, ty * th, min(tw, ds.width - tx * tw), min(th, ds.height - ty * th))
                tile = _tiles.get((base, ty, tx), lambda w=win: ds.read(1, window=w))
                ya, yb = max(r0, ty * th), min(r1, ty * th + tile.shape[0])
                xa, xb = max(c0, tx * tw), min(c1, tx * tw + tile.shape[1])
                out[ya - r0 : yb - r0, xa - c0 : xb - c0] = tile[ya - ty * th : yb - ty * th, xa - tx * tw : xb - tx * tw]
    return out


@dataclass(frozen=True)
class BandRead:
    """One band of one scene to read: its COG, its factor k to the 10 m grid, its
    resampling method and its native shape (rows, cols)."""

    href: str
    k: int
    method: str
    src_shape: tuple[int, int]


def cube_arrays(
    dn_reads: Sequence[Sequence[BandRead]], scl_reads: Sequence[BandRead | None], offsets: Sequence[int],
    grid_shape: tuple[int, int], chunks: tuple[int, int], env: dict[str, str],
    patch_url: Callable[[str], str] | None = None, scl_missing: int = 255,
) -> tuple[da.Array, da.Array]:
    """Lazy harmonised cube arrays of a grid: dn uint16 [time, band, y, x] and scl uint8
    [time, y, x], with `dn_reads[t]` the bands of date t in cube order, `scl_reads[t]` its
    SCL (None: filled with `scl_missing`) and `offsets[t]` the DN offset to remove.

    One task per date and chunk reads all the bands of that chunk, so the graph has
    bands-times fewer tasks than one per band read plus stacking and offset tasks: measured
    on a quarter scene, the scheduler overhead of the per-band graph was ~3 s of 10.
    """
    ych, xch = chunks
    yc, xc = _split(grid_shape[0], ych), _split(grid_shape[1], xch)
    tok = tokenize(dn_reads, scl_reads, offsets, grid_shape, chunks)
    dn_name, scl_name = f"read-cube-dn-{tok}", f"read-cube-scl-{tok}"
    dn_dsk: dict[Any, Any] = {}
    scl_dsk: dict[Any, Any] = {}
    for t, (reads, scl, off) in enumerate(zip(dn_reads, scl_reads, offsets)):
        y0 = 0
        for i, yh in enumerate(yc):
            x0 = 0
            for j, xw in enumerate(xc):
                win = (y0, y0 + yh, x0, x0 + xw)
                dn_dsk[(dn_name, t, 0, i, j)] = (_dn_block, tuple(reads), patch_url, win, off, env)
                scl_dsk[(scl_name, t, i, j)] = (_scl_block, scl, patch_url, win, env, scl_missing)
                x0 += xw
            y0 += yh
    n_t, n_b = len(dn_reads), len(dn_reads[0])
    dn = da.Array(HighLevelGraph.from_collections(dn_name, dn_dsk, dependencies=()), dn_name,
                  chunks=((1,) * n_t, (n_b,), yc, xc), dtype=np.uint16)
    scl_arr = da.Array(HighLevelGraph.from_collections(scl_name, scl_dsk, dependencies=()), scl_name,
                       chunks=((1,) * n_t, yc, xc), dtype=np.uint8)
    return dn, scl_arr


def _dn_block(
    reads: tuple[BandRead, ...], patch_url: Callable[[str], str] | None, win: tuple[int, int, int, int],
    offset: int, env: dict[str, str],
) -> np.ndarray:
    """uint16 [1, bands, h, w]: every band of one date over one chunk, offset removed."""
    y0, y1, x0, x1 = win
    out = np.empty((1, len(reads), y1 - y0, x1 - x0), np.uint16)
    for b, r in enumerate(reads):
        _read_signed(r.href, patch_url, r.k, r.method, y0, y1, x0, x1, r.src_shape, env, offset, out[0, b])
    return out


def _scl_block(
    read: BandRead | None, patch_url: Callable[[str], str] | None, win: tuple[int, int, int, int],
    env: dict[str, str], missing: int,
) -> np.ndarray:
    """uint8 [1, h, w]: the SCL classes of one date over one chunk (nearest), or `missing`."""
    y0, y1, x0, x1 = win
    if read is None:
        return np.full((1, y1 - y0, x1 - x0), missing, np.uint8)
    return _read_signed(read.href, patch_url, read.k, "nearest", y0, y1, x0, x1, read.src_shape, env)[None].astype(np.uint8)


# A remote block read that fails is retried in place this many times. GDAL retries HTTP
# 5xx itself (GDAL_HTTP_MAX_RETRY) but not a reset connection or a body cut short; without
# this, one such fault sends the whole grid (every band, every block) back to
# `stages._cube_with_retry`, and at a 20 % fault rate a 12-band grid rarely gets through.
BLOCK_RETRIES = 3
BLOCK_BACKOFF_S = 0.25


def _read_signed(href: str, patch_url: Callable[[str], str] | None, *args: Any) -> np.ndarray:
    from rasterio.errors import RasterioIOError

    remote = "://" in href
    for attempt in range(BLOCK_RETRIES + 1 if remote else 1):
        url = patch_url(href) if patch_url else href  # signed just before the read
        try:
            return read_block(url, *args)
        except RasterioIOError:
            if attempt == BLOCK_RETRIES or not remote:
                raise
            _forget(url)
            time.sleep(BLOCK_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _forget(url: str) -> None:
    """Drop this thread's handle on `url` and GDAL's cached bytes of it, so a retry refetches."""
    from pipeline.cube import clear_gdal_http_cache

    with _handles_lock:
        h = _handles.pop((threading.get_ident(), url), None)
    if h is not None:
        _close(h)
    clear_gdal_http_cache(url)


def _split(n: int, c: int) -> tuple[int, ...]:
    return tuple([c] * (n // c) + ([n % c] if n % c else []))
