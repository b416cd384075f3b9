"""Cut a unit's cube into chips: by size, GSD and time; quality fractions; spatial split.

Pure functions over numpy arrays plus one generator, `iter_chips`, that streams a cube
row-strip by row-strip, so memory is bounded by one strip of `size * factor` rows of the
10 m cube (all bands, `time_steps` dates), never the whole scene.

Chip enumeration order (deterministic, the resume position relies on it):
time group (ascending dates) -> chip row -> chip column.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.catalogs import sensor
from pipeline.config import BuildConfig, SplitConfig, TilingSpec
from pipeline.lru import SharedLRU
from pipeline.zarr_chunks import ChunkedArray, open_chunked

if TYPE_CHECKING:  # xarray (with pandas) costs ~0.7 s to import: only where it is used
    import xarray as xr

SCL_MISSING = 255  # cube value where the item had no SCL (see pipeline.cube)


@dataclass(frozen=True)
class Chip:
    """One chip ready to write. `data` is uint16 [C, H, W] or [T, C, H, W]."""

    key: str
    split: str
    data: np.ndarray
    meta: dict[str, Any]


@dataclass(frozen=True)
class Dropped:
    """A chip position that was not written, with the reason (counted in the summary);
    `empty` when every pixel of it was nodata (a grid of only empty positions points at
    unreadable data, which a build must not report as success)."""

    reason: str
    empty: bool = False


# -- geometry -----------------------------------------------------------------------


def positions(n: int, size: int, stride: int) -> np.ndarray:
    """Chip offsets along one axis of length n (only whole chips)."""
    if n < size:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n - size + 1, stride, dtype=np.int64)


def small_scene_shape(h: int, w: int, size: int, rule: str) -> tuple[int, int] | None:
    """Output-grid shape after the small-scene rule, or None when the scene is big enough
    (or the rule is `skip`). SpectralGPT resized 120 px BigEarthNet patches to 128."""
    if h >= size and w >= size:
        return None
    if rule == "skip":
        return None
    return max(h, size), max(w, size)


@functools.cache
def _to_lonlat(epsg: int) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(epsg, 4326, always_xy=True)


def lonlat_bounds(epsg: int, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """[N, 4] lon/lat bounds (W, S, E, N) of N projected boxes, from their 4 corners."""
    t = _to_lonlat(epsg)
    xs = np.stack([x0, x1, x1, x0], axis=1)
    ys = np.stack([y0, y0, y1, y1], axis=1)
    lon, lat = t.transform(xs, ys)
    return np.stack([lon.min(1), lat.min(1), lon.max(1), lat.max(1)], axis=1)


def block_split(epsg: int, bx: int, by: int, split: SplitConfig) -> str:
    """Deterministic train/val assignment of one spatial block (hash, not RNG state)."""
    h = hashlib.sha256(f"{split.seed}:{epsg}:{bx}:{by}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "val" if u < split.val_fraction else "train"


def chip_split(epsg: int, x0: float, y0: float, x1: float, y1: float, split: SplitConfig) -> str | None:
    """Split of a chip footprint (projected metres, x0<x1, y0<y1); None if it touches
    blocks of both splits (dropped: no val pixel may sit inside a train chip)."""
    b = split.block_m
    eps = 1e-6
    bxs = range(int(np.floor(x0 / b)), int(np.floor((x1 - eps) / b)) + 1)
    bys = range(int(np.floor(y0 / b)), int(np.floor((y1 - eps) / b)) + 1)
    splits = {block_split(epsg, bx, by, split) for bx in bxs for by in bys}
    return splits.pop() if len(splits) == 1 else None


# -- pixels -------------------------------------------------------------------------


def coarsen(dn: np.ndarray, f: int) -> np.ndarray:
    """Nodata-aware f x f block mean of uint16 [..., H, W] (H, W multiples of f)."""
    if f == 1:
        return dn
    *lead, h, w = dn.shape
    blocks = dn.reshape(*lead, h // f, f, w // f, f).astype(np.float32)
    valid = (blocks > 0).sum(axis=(-3, -1))
    total = blocks.sum(axis=(-3, -1))
    out = np.where(valid > 0, np.rint(total / np.maximum(valid, 1)), 0)
    return out.astype(np.uint16)


def resize_bilinear(dn: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nodata-aware bilinear resize of uint16 [..., H, W] (pixel-centre aligned).

    Values and a validity weight are interpolated separately, so nodata never bleeds into
    valid pixels as dark values; outputs with less than half valid support become nodata.
    """
    *lead, h, w = dn.shape

    def axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    y0, y1, wy = axis_weights(h, out_h)
    x0, x1, wx = axis_weights(w, out_w)
    v = dn.astype(np.float32)
    m = (dn > 0).astype(np.float32)

    def interp(a: np.ndarray) -> np.ndarray:
        rows = a[..., y0, :] * (1 - wy)[:, None] + a[..., y1, :] * wy[:, None]
        return rows[..., x0] * (1 - wx) + rows[..., x1] * wx

    vw = interp(v * m)
    mw = interp(m)
    out = np.where(mw >= 0.5, np.rint(vw / np.maximum(mw, 1e-6)), 0)
    return np.clip(out, 0, 65535).astype(np.uint16)


def resize_nearest(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    *lead, h, w = a.shape
    yi = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    xi = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return a[..., yi, :][..., xi]


def box_fractions(mask: np.ndarray, col0: np.ndarray, width: int) -> np.ndarray:
    """Fraction of True in each [:, c : c + width] box of a 2-D mask [H, W], for all c at once."""
    col = np.concatenate([[0], np.cumsum(mask.sum(axis=0, dtype=np.int64))])
    return (col[col0 + width] - col[col0]) / float(mask.shape[0] * width)


def quality_masks(dn: np.ndarray, scl: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks [H, W] for one date: dn [C, H, W] uint16, scl [H, W] uint8."""
    nodata = dn.min(axis=0) == 0  # any band at nodata (one pass; 2x faster than (dn == 0).any)
    masks = {"nodata": nodata}
    if (scl == SCL_MISSING).all():
        masks["invalid"] = nodata
        return masks
    for name, lut in _scl_luts().items():
        m = lut[scl]  # a 256-entry lookup: one gather, ~3x faster than np.isin on uint8
        masks[name] = (m | nodata) if name == "invalid" else m
    return masks


@functools.cache
def _scl_luts() -> dict[str, np.ndarray]:
    """SCL class -> in group, per quality group (catalogs: sensor SCL groups)."""
    luts = {}
    for name, classes in sensor().scl_groups.items():
        lut = np.zeros(256, dtype=bool)
        lut[list(classes)] = True
        luts[name] = lut
    return luts


# -- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One decoded chunk row of a cube: rows ``[y0, y1)``, columns ``[0, width)``.

    ``dn`` [T, C, rows, width] uint16; ``masks`` quality group -> [T, rows, width] bool (see
    `quality_masks`, from ``dn`` and the SCL band). Read-only: shared between threads.
    """

    y0: int
    y1: int
    dn: np.ndarray
    masks: dict[str, np.ndarray]


class _SharedBlocks:
    """Decoded blocks shared by the datasets that tile one cube at the same time.

    Every dataset (chip size) walks the same cube top to bottom in its own thread; the first
    to need a chunk row decodes it and computes its quality masks, the others wait for and
    reuse the result (the cube's decode was ~1.3 s per dataset per quarter scene, and the
    masks are per pixel, so the same for every chip size). The last `keep` blocks are kept:
    a dataset that falls further behind decodes again, which is only slower.
    """

    def __init__(self, keep: int = 3) -> None:
        self.blocks: SharedLRU[Block] = SharedLRU(keep)
        self._lock = threading.Lock()
        self._users: Counter[str] = Counter()

    def open(self, store: str) -> None:
        with self._lock:
            self._users[store] += 1

    def close(self, store: str) -> None:
        """One user of ``store`` is done; its blocks are dropped with the last user."""
        with self._lock:
            self._users[store] -= 1
            if self._users[store] <= 0:
                del self._users[store]
                self.blocks.discard(lambda k: k[0] == store)  # type: ignore[index]

    def get(self, key: tuple[Any, ...], load: Callable[[], Block]) -> Block:
        return self.blocks.get(key, load)


_SHARED = _SharedBlocks()
_PREFETCH = cf.ThreadPoolExecutor(1, thread_name_prefix="cube-prefetch")


class LiveFeed:
    """Chunk rows of a cube while it is being written, handed to its tiling from memory.

    The writer (`cube.write_cube_streaming`) puts each date's chunk rows in order, after their
    chunks are on disk; the tiling takes them instead of reading them back (no decode, and
    tiling overlaps the write). At most `max_pending` rows wait: the writer blocks until the
    tiling catches up, so memory stays bounded. A row already taken (a dataset that fell
    behind the shared blocks) is read from disk, where it already is.
    """

    def __init__(self, max_pending: int = 4) -> None:
        self._cond = threading.Condition()
        self._rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._produced: set[tuple[int, int]] = set()
        self._max = max_pending
        self._done = False
        self._closed = False  # no reader will take anything any more
        self._error: BaseException | None = None

    def put(self, t: int, y0: int, dn: np.ndarray, scl: np.ndarray) -> None:
        """Row block [1, C, rows, W] / [1, rows, W] of date `t` starting at row `y0` (written)."""
        with self._cond:
            while len(self._rows) >= self._max and not self._closed:
                self._cond.wait()
            if not self._closed:
                self._rows[(t, y0)] = (dn, scl)
            self._produced.add((t, y0))
            self._cond.notify_all()

    def take(self, t: int, y0: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The row block when it is produced; None when it was taken before or never comes
        (then it is on disk). Raises what made the writer fail."""
        with self._cond:
            while (t, y0) not in self._produced and not self._done and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError(f"the cube's writer failed: {self._error}") from self._error
            got = self._rows.pop((t, y0), None)
            self._cond.notify_all()
            return got

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        """The readers are done (or gone): the writer stops waiting and keeps nothing."""
        with self._cond:
            self._closed = True
            self._rows.clear()
            self._cond.notify_all()


#: store path -> the feed of a cube being written right now (`cube.write_cube_streaming`)
LIVE: dict[str, LiveFeed] = {}


class RowBlocks:
    """Row strips of a cube, read a chunk-row block at a time and sliced in memory.

    Strips (chip height x full width) are much thinner than a zarr chunk row; reading them
    one by one decodes every chunk once per strip (x11 for 96 px strips in 1024-row chunks).
    Here each chunk row is decoded once, for every dataset tiled concurrently from the same
    cube store (`_SharedBlocks`), and every strip inside it is a numpy view. The zarr arrays
    are read directly (no Dask graph per strip). Memory: up to `_SharedBlocks` `keep` chunk
    rows of `time_steps` dates, all bands, full width, plus their masks. Call `close()`.
    """

    def __init__(self, cube: xr.Dataset) -> None:
        self.cube = cube
        dn = cube["dn"]
        chunks = dn.encoding.get("chunks") or dn.encoding.get("preferred_chunks") or None
        self.ych = int(chunks[2]) if isinstance(chunks, tuple | list) and len(chunks) == 4 else 1024
        self._block: Block | None = None
        self._t_idx: tuple[int, ...] = ()
        src = _store_path(cube)
        self._raw = _raw_arrays(src) if src else None
        # Blocks are shared by store; a cube not read from a store is not shared (own key).
        self._store = src if self._raw is not None else f"cube-{id(cube)}"
        _SHARED.open(self._store)

    def close(self) -> None:
        _SHARED.close(self._store)

    def read(self, t_idx: list[int], y_lo: int, y_hi: int, width: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows ``[y_lo, y_hi)``: dn [T, C, rows, width] and quality masks [T, rows, width] (views)."""
        b = self._block
        if b is None or self._t_idx != tuple(t_idx) or not (b.y0 <= y_lo and y_hi <= b.y1) or b.dn.shape[-1] < width:
            b0 = (y_lo // self.ych) * self.ych
            b1 = min(-(-y_hi // self.ych) * self.ych, self.cube.sizes["y"])
            key = (self._store, tuple(t_idx), b0, b1, width)
            b = self._block = _SHARED.get(key, lambda: self._load(t_idx, b0, b1, width))
            self._t_idx = tuple(t_idx)
            n0, n1 = b1, min(b1 + self.ych, self.cube.sizes["y"])
            if n0 < n1 and self._raw is not None:
                # decode the next chunk row meanwhile: its reads wait on the disk (the cube is
                # written around the page cache) and the masks hold the GIL in places
                nkey = (self._store, tuple(t_idx), n0, n1, width)
                _PREFETCH.submit(_SHARED.get, nkey, lambda: self._load(t_idx, n0, n1, width))
        o = slice(y_lo - b.y0, y_hi - b.y0)
        return b.dn[:, :, o, :width], {k: m[:, o, :width] for k, m in b.masks.items()}

    def _load(self, t_idx: list[int], b0: int, b1: int, width: int) -> Block:
        feed = LIVE.get(self._store)
        if feed is not None and len(t_idx) == 1:
            got = feed.take(t_idx[0], b0)  # from the writer's memory: no read-back, no decode
            if got is not None:
                dn, scl = got[0][:, :, : b1 - b0, :width], got[1][:, : b1 - b0, :width]
                return Block(b0, b1, dn, _date_masks(dn, scl))
        if self._raw is not None:
            dn_arr, scl_arr = self._raw
            t0 = t_idx[0]
            if t_idx == list(range(t0, t0 + len(t_idx))):  # consecutive dates: one read, no stacking copy
                dn = _region(dn_arr, (slice(t0, t0 + len(t_idx)), slice(None), slice(b0, b1), slice(0, width)))
                scl = _region(scl_arr, (slice(t0, t0 + len(t_idx)), slice(b0, b1), slice(0, width)))
            else:
                dn = np.stack([_region(dn_arr, (slice(t, t + 1), slice(None), slice(b0, b1), slice(0, width)))[0] for t in t_idx])
                scl = np.stack([_region(scl_arr, (slice(t, t + 1), slice(b0, b1), slice(0, width)))[0] for t in t_idx])
        else:
            dn = self.cube["dn"].isel(time=t_idx, y=slice(b0, b1), x=slice(0, width)).values
            scl = self.cube["scl"].isel(time=t_idx, y=slice(b0, b1), x=slice(0, width)).values
        return Block(b0, b1, dn, _date_masks(dn, scl))


def _region(arr: Any, box: tuple[slice, ...]) -> np.ndarray:
    """`box` of a cube array: a direct chunk read (`zarr_chunks`) or zarr's own indexing."""
    return arr.region(box) if isinstance(arr, ChunkedArray) else arr[box]


def _store_path(cube: xr.Dataset) -> str | None:
    src = cube.encoding.get("source") or cube.attrs.get("_store_path")
    return str(src) if src else None


def _raw_arrays(src: str) -> tuple[Any, Any] | None:
    """The cube store's arrays for direct (Dask-free) reads: `zarr_chunks.ChunkedArray`s for
    the cube's own local layout, else zarr arrays; None if not a local zarr store."""
    chunked = [open_chunked(Path(src) / name) for name in ("dn", "scl")]
    if all(chunked):
        return chunked[0], chunked[1]
    try:
        import zarr

        g = zarr.open_group(src, mode="r")
        return g["dn"], g["scl"]
    except Exception:  # not a local zarr store: fall back to xarray reads
        return None


# -- the generator ------------------------------------------------------------------


def iter_chips(
    cube: xr.Dataset, spec: TilingSpec, cfg: BuildConfig, source: dict[str, Any] | None = None
) -> Iterator[Chip | Dropped]:
    """Yield every chip position of one cube for one tiling spec, in enumeration order.

    Each position yields either a `Chip` (passed quality and split) or a `Dropped`.
    """
    s = sensor()
    f = spec.factor
    size = spec.size
    stride = size - spec.overlap
    t_all = cube.sizes["time"]
    h10, w10 = cube.sizes["y"], cube.sizes["x"]
    a, _, c0, _, e, f0 = cube.attrs["grid_transform"][:6]
    epsg = int(cube.attrs["epsg"])
    has_scl = list(cube.attrs["has_scl"])
    datetimes = list(cube.attrs["datetimes"])
    scene_ids = list(cube.attrs["scene_ids"])
    harm = list(cube.attrs["harmonisation"])
    tile = cube.attrs.get("tile") or f"EPSG{epsg}"
    h, w = h10 // f, w10 // f  # output grid
    small = small_scene_shape(h, w, size, cfg.small_scene)
    if (h < size or w < size) and small is None:
        # rule 'skip': a scene smaller than the chip gives nothing
        yield Dropped("scene smaller than chip (small_scene: skip)")
        return
    groups = [tuple(range(i, i + spec.time_steps)) for i in range(0, t_all - spec.time_steps + 1, spec.time_steps)]
    if not groups:
        yield Dropped(f"fewer than {spec.time_steps} dates on this grid")
        return
    q = cfg.quality
    common = {
        "dataset": spec.name,
        "bands": s.band_names,
        "dtype": "uint16",
        "layout": "CHW" if spec.time_steps == 1 else "TCHW",
        "value_scale": s.scale,
        "nodata": s.nodata,
        "tile": cube.attrs.get("tile", ""),
        "crs": f"EPSG:{epsg}",
        "resampling": dict(cube.attrs["resampling"]),
        "source": dict(source or {}),
    }
    rows_reader = RowBlocks(cube)
    try:
        for tg in groups:
            t_idx = list(tg)
            if small is not None:
                yield from _small_scene_chips(cube, spec, cfg, t_idx, small, common)
                continue
            rows = positions(h, size, stride)
            cols = positions(w, size, stride)
            for r in rows:
                y_lo, y_hi = int(r) * f, (int(r) + size) * f
                strip, masks = rows_reader.read(t_idx, y_lo, y_hi, w * f)  # [T, C, S*f, W*f], name -> [T, S*f, W*f]
                col10 = cols * f
                fr = _mask_fractions(masks, col10, size * f)  # name -> [T, ncols]
                worst = {k: v.max(axis=0) for k, v in fr.items()}
                x0 = c0 + col10 * a
                x1 = x0 + size * f * a
                y_top = f0 + y_lo * e
                y_bot = f0 + y_hi * e
                ll = lonlat_bounds(epsg, x0, np.full_like(x0, y_bot, dtype=float), x1, np.full_like(x0, y_top, dtype=float))
                for j, c in enumerate(cols):
                    frac = {k: float(v[j]) for k, v in worst.items()}
                    reason = _quality_reason(frac, q)
                    if reason:
                        yield Dropped(reason, frac["nodata"] >= 1.0)
                        continue
                    split = chip_split(epsg, float(x0[j]), float(y_bot), float(x1[j]), float(y_top), cfg.split)
                    if split is None:
                        yield Dropped("straddles a train/val block boundary")
                        continue
                    xs = slice(int(c) * f, (int(c) + size) * f)
                    data = coarsen(strip[:, :, :, xs], f)  # [T, C, S, S]
                    if spec.time_steps == 1:
                        data = data[0]
                    meta = _meta(
                        common, spec, tile, t_idx, int(r), int(c), scene_ids, datetimes, harm, has_scl,
                        transform=[a * f, 0.0, float(x0[j]), 0.0, e * f, float(y_top)],
                        gsd=abs(a) * f, bbox=ll[j].tolist(), frac=frac, small_rule="none", split=split,
                    )
                    yield Chip(meta["key"], split, np.ascontiguousarray(data), meta)
    finally:
        rows_reader.close()


def _small_scene_chips(
    cube: xr.Dataset, spec: TilingSpec, cfg: BuildConfig, t_idx: list[int], shape: tuple[int, int], common: dict[str, Any]
) -> Iterator[Chip | Dropped]:
    """Chips of a scene smaller than the chip: resized or padded as `cfg.small_scene` says."""
    f = spec.factor
    size = spec.size
    stride = size - spec.overlap
    h10, w10 = cube.sizes["y"], cube.sizes["x"]
    h, w = h10 // f, w10 // f
    a, _, c0, _, e, f0 = cube.attrs["grid_transform"][:6]
    epsg = int(cube.attrs["epsg"])
    dn = coarsen(cube["dn"].isel(time=t_idx, y=slice(0, h * f), x=slice(0, w * f)).values, f)  # [T, C, h, w]
    scl = cube["scl"].isel(time=t_idx, y=slice(0, h * f), x=slice(0, w * f)).values
    scl = resize_nearest(scl, h, w) if f > 1 else scl
    out_h, out_w = shape
    if cfg.small_scene == "resize":
        dn = resize_bilinear(dn, out_h, out_w)
        scl = resize_nearest(scl, out_h, out_w)
        rule = f"resize:{h}x{w}->{out_h}x{out_w}:bilinear"
        px_x, px_y = abs(a) * f * w / out_w, abs(e) * f * h / out_h
    else:  # pad with nodata at the bottom/right
        dn = np.pad(dn, [(0, 0), (0, 0), (0, out_h - h), (0, out_w - w)])
        scl = np.pad(scl, [(0, 0), (0, out_h - h), (0, out_w - w)], constant_values=SCL_MISSING)
        rule = f"pad:{h}x{w}->{out_h}x{out_w}:nodata"
        px_x, px_y = abs(a) * f, abs(e) * f
    rows = positions(out_h, size, stride)
    cols = positions(out_w, size, stride)
    tile = cube.attrs.get("tile") or f"EPSG{epsg}"
    for r in rows:
        for c in cols:
            sub = dn[:, :, r : r + size, c : c + size]
            fr = _mask_fractions(_date_masks(sub, scl[:, r : r + size, c : c + size]), np.array([0]), size)
            frac = {k: float(v[:, 0].max()) for k, v in fr.items()}
            reason = _quality_reason(frac, cfg.quality)
            if reason:
                yield Dropped(reason, frac["nodata"] >= 1.0)
                continue
            x0 = c0 + c * px_x
            y_top = f0 - r * px_y
            x1, y_bot = x0 + size * px_x, y_top - size * px_y
            split = chip_split(epsg, x0, y_bot, x1, y_top, cfg.split)
            if split is None:
                yield Dropped("straddles a train/val block boundary")
                continue
            ll = lonlat_bounds(epsg, np.array([x0]), np.array([y_bot]), np.array([x1]), np.array([y_top]))[0]
            data = sub[0] if spec.time_steps == 1 else sub
            meta = _meta(
                common, spec, tile, t_idx, int(r), int(c), list(cube.attrs["scene_ids"]), list(cube.attrs["datetimes"]),
                list(cube.attrs["harmonisation"]), list(cube.attrs["has_scl"]),
                transform=[px_x, 0.0, x0, 0.0, -px_y, y_top], gsd=px_x, bbox=ll.tolist(), frac=frac,
                small_rule=rule, split=split,
            )
            yield Chip(meta["key"], split, np.ascontiguousarray(data), meta)


def _date_masks(dn: np.ndarray, scl: np.ndarray) -> dict[str, np.ndarray]:
    """`quality_masks` of every date: dn [T, C, H, W], scl [T, H, W] -> name -> [T, H, W]."""
    per_date = [quality_masks(dn[t], scl[t]) for t in range(dn.shape[0])]
    return {k: np.stack([m[k] for m in per_date]) for k in per_date[0]}


def _mask_fractions(masks: dict[str, np.ndarray], col0: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """Quality fractions [T, ncols] of boxes of `width` columns starting at `col0`."""
    return {k: np.stack([box_fractions(mt, col0, width) for mt in m]) for k, m in masks.items()}


def _quality_reason(frac: dict[str, float], q: Any) -> str:
    if frac.get("invalid", frac["nodata"]) > q.max_invalid:
        return "invalid/nodata fraction above quality.max_invalid"
    if frac.get("cloud", 0.0) > q.max_cloud:
        return "cloud fraction above quality.max_cloud"
    if frac.get("snow", 0.0) > q.max_snow:
        return "snow fraction above quality.max_snow"
    return ""


def _meta(
    common: dict[str, Any], spec: TilingSpec, tile: str, t_idx: list[int], r: int, c: int,
    scene_ids: list[str], datetimes: list[str], harm: list[dict[str, Any]], has_scl: list[bool], *,
    transform: list[float], gsd: float, bbox: list[float], frac: dict[str, float], small_rule: str, split: str,
) -> dict[str, Any]:
    ids = [scene_ids[t] for t in t_idx]
    sh = hashlib.sha256("|".join(ids).encode()).hexdigest()[:8]
    date = datetimes[t_idx[0]][:10].replace("-", "")
    key = f"{tile}_{date}_{sh}_{spec.name}_{r:05d}_{c:05d}"
    scl_known = all(has_scl[t] for t in t_idx)
    quality: dict[str, Any] = {
        "nodata": frac["nodata"],
        "invalid": frac.get("invalid", frac["nodata"]),
        "scl": scl_known,
    }
    for k in ("cloud", "shadow", "cirrus", "snow"):
        quality[k] = frac.get(k) if scl_known else None
    shape = [len(sensor().band_names), spec.size, spec.size]
    if spec.time_steps > 1:
        shape = [spec.time_steps, *shape]
    return {
        **common,
        "key": key,
        "split": split,
        "shape": shape,
        "scene_ids": ids,
        "datetimes": [datetimes[t] for t in t_idx],
        "transform": [float(v) for v in transform],
        "gsd": float(gsd),
        "bbox_lonlat": [round(float(v), 7) for v in bbox],
        "pixel_offset": [r, c],
        "harmonisation": [harm[t] for t in t_idx],
        "small_scene_rule": small_rule,
        "quality": quality,
        "mask_note": None if scl_known else "no SCL asset: only nodata is known; cloud/shadow/cirrus/snow are null",
    }
