"""Compiled per-pixel loops (Numba) for the pipeline's three hottest passes.

Each of these was several whole-array numpy passes with float32 temporaries; as one loop
over the pixels they touch each value once. Measured on a quarter scene (5490 px, 12 bands,
one thread, `python -m benchmarks.kernels_bench`; figures in benchmarks/RESULTS.md):

- `bilinear_offset`: nodata-aware bilinear upsampling of a 20 m or 60 m window to 10 m,
  with the harmonisation offset removed in the same pass (was `_lerp` per axis twice, a
  validity weight interpolated alongside when the window has nodata, `rint`, a cast and a
  65536-entry lookup table);
- `remove_offset_inplace`: the offset of the 10 m bands, in place (was the lookup table);
- `add_histogram`: per-band counts of uint16 values for the exact statistics (was one
  `np.bincount` per band, which casts every value to int64 first).

All are compiled on first use and cached on disk (`cache=True`: `__pycache__` next to this
file, or Numba's user-wide cache when that is read-only), and release the GIL (`nogil`), so
Dask's threads run them in parallel.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def bilinear_offset(
    src: np.ndarray, iy0: np.ndarray, iy1: np.ndarray, wy: np.ndarray,
    ix0: np.ndarray, ix1: np.ndarray, wx: np.ndarray, offset: int, out: np.ndarray,
) -> None:
    """Fill uint16 `out` [R, C] by bilinear interpolation of uint16 `src` [h, w] (0 = nodata)
    and remove `offset` DN from the valid results (clamped to 1; 0 stays 0).

    Output row r reads source rows iy0[r], iy1[r] with weight wy[r] on the second (int64,
    int64, float64 arrays of length R); column c likewise with ix0, ix1, wx (length C).
    Where a tap is nodata, values and validity are interpolated separately and outputs with
    less than half valid support are nodata: 0 never bleeds into valid pixels. Arithmetic
    is float64, so integer sources with quarter weights (k = 2) are exact in any order;
    rounding is half to even (`np.rint`), as in the textbook reference of the tests.

    Separable where it can be: each source row is interpolated along the columns once (to
    the output's columns), and each output row is then one contiguous blend of two such rows,
    which compiles to vector instructions; only rows whose sources hold nodata take the
    per-pixel four-tap path.
    """
    h, w = src.shape
    n_rows, n_cols = out.shape
    has_zero = np.zeros(h, np.bool_)
    for i in range(h):
        for j in range(w):
            if src[i, j] == 0:
                has_zero[i] = True
                break
    cols = np.empty((h, n_cols), np.float64)  # source rows interpolated along the columns
    done = np.zeros(h, np.bool_)
    for r in range(n_rows):
        top = src[iy0[r]]
        bot = src[iy1[r]]
        fy = wy[r]
        gy = 1.0 - fy
        row = out[r]
        if not (has_zero[iy0[r]] or has_zero[iy1[r]]):
            for i in (iy0[r], iy1[r]):
                if not done[i]:
                    s_row = src[i]
                    c_row = cols[i]
                    for c in range(n_cols):
                        c_row[c] = (1.0 - wx[c]) * s_row[ix0[c]] + wx[c] * s_row[ix1[c]]
                    done[i] = True
            ca = cols[iy0[r]]
            cb = cols[iy1[r]]
            for c in range(n_cols):
                iv = np.int32(np.rint(gy * ca[c] + fy * cb[c])) - offset
                row[c] = iv if iv > 1 else 1
            continue
        for c in range(n_cols):
            j0 = ix0[c]
            j1 = ix1[c]
            fx = wx[c]
            gx = 1.0 - fx
            a = top[j0]
            b = top[j1]
            d = bot[j0]
            e = bot[j1]
            num = gy * (gx * a + fx * b) + fy * (gx * d + fx * e)  # nodata taps are 0
            if a != 0 and b != 0 and d != 0 and e != 0:
                v = np.rint(num)
            else:
                ma = 1.0 if a != 0 else 0.0
                mb = 1.0 if b != 0 else 0.0
                md = 1.0 if d != 0 else 0.0
                me = 1.0 if e != 0 else 0.0
                den = gy * (gx * ma + fx * mb) + fy * (gx * md + fx * me)
                if den < 0.5:
                    row[c] = 0
                    continue
                v = np.rint(num / den)
            iv = int(v) - offset
            row[c] = iv if iv > 1 else 1


@numba.njit(cache=True, nogil=True)
def remove_offset_inplace(dn: np.ndarray, offset: int) -> None:
    """Remove `offset` DN from the valid pixels of uint16 `dn` (1-D, any length) in place:
    nodata (0) stays 0, valid pixels clamp to 1 (the rule of `harmonise.apply_offsets`)."""
    for i in range(dn.shape[0]):
        v = np.int32(dn[i])
        if v != 0:
            v -= offset
            dn[i] = v if v > 1 else 1


@numba.njit(cache=True, nogil=True)
def add_histogram(hist: np.ndarray, data: np.ndarray) -> None:
    """Add the counts of uint16 `data` [C, N] to int64 `hist` [C, 65536], band by band
    (value 0, nodata, is counted too: callers zero that bin)."""
    for b in range(data.shape[0]):
        h = hist[b]
        x = data[b]
        for i in range(x.shape[0]):
            h[x[i]] += 1


def warm_up() -> None:
    """Load (or, the first time, compile) every kernel for the argument types the pipeline
    passes, so a build's first block does not wait ~0.3 s for it (`stages` calls this in
    the background while the catalog is searched; the pipeline image calls it at build)."""
    src = np.ones((3, 3), np.uint16)
    idx = np.zeros(2, np.int64)
    bilinear_offset(src, idx, idx, np.zeros(2), idx, idx, np.zeros(2), 0, np.empty((2, 2), np.uint16))
    remove_offset_inplace(src.reshape(-1), 0)
    add_histogram(np.zeros((3, 65536), np.int64), src)
