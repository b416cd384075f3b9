"""Lazy load of one grid's scenes into a harmonised, analysis-ready cube stored as zarr.

A *grid* is the set of scenes that share one 10 m grid (same CRS, transform and shape:
one MGRS tile, or one sample patch). Its cube is

    dn  [time, band, y, x] uint16   harmonised DN (reflectance = dn / 10000, 0 = nodata)
    scl [time, y, x]       uint8    SCL classes resampled (nearest) to 10 m; 255 = no SCL

in one zarr v3 store with consolidated metadata, `time` (acquisition datetimes, UTC) and
`band` (names) as coordinates, georeferenced with rioxarray (CRS + transform travel with
it): `xarray.open_zarr(url)` gives an analysis-ready dataset. Re-tiling at another size,
GSD or time window reads the zarr and never the COGs again. The load is lazy (native
windowed reads on aligned grids, else odc-stac; both Dask) and the write streams chunk by
chunk, so memory does not grow with the scene size.

A cube is complete only when its marker `<grid>.zarr.complete` (content hash and chunk
counts, beside the store) is there, written last; it is reused only when that marker matches and every chunk it
counts is present (`cube_is_complete`): a missing chunk is rebuilt, never read as zeros.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.catalogs import sensor
from pipeline.config import BuildConfig
from pipeline.errors import SceneError
from pipeline.harmonise import apply_offsets
from pipeline.location import Location
from pipeline.search import Scene
from pipeline.zarr_chunks import open_chunked

if TYPE_CHECKING:  # xarray (with pandas) costs ~0.7 s to import: only where it is used
    import xarray as xr

log = logging.getLogger(__name__)

SCL_MISSING = 255  # value of the cube's scl where the item had no SCL asset

# GDAL settings for remote COGs (union of odc-stac/stackstac cloud defaults, see
# research/pipeline-anchors.md section 2): no directory listing, retries on transient HTTP errors.
# GDAL doubles the delay after each retry, so 4 retries from 0.5 s wait at most ~7.5 s per
# request before our own per-grid retry (with its own backoff) takes over. Any of these can be
# overridden by setting the same variable in the environment.
_GDAL_DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_TIMEOUT": "60",
    # GDAL's block cache defaults to 5% of RAM and is never released between scenes: peak RSS
    # grew from 1.5 GB (1 scene) to 3.4 GB (4 scenes) in benchmark 2. Blocks are read once here.
    "GDAL_CACHEMAX": "256",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "VSI_CACHE": "TRUE",
}
GDAL_CLOUD_ENV: dict[str, Any] = {k: os.environ.get(k, v) for k, v in _GDAL_DEFAULTS.items()}
GDAL_CLOUD_ENV["GDAL_CACHEMAX"] = int(GDAL_CLOUD_ENV["GDAL_CACHEMAX"])  # rasterio wants an int (MB) here


@dataclass(frozen=True)
class Grid:
    """Scenes on one 10 m grid, in ascending (datetime, id) order."""

    id: str
    epsg: int
    tile: str
    shape: tuple[int, int]
    transform: tuple[float, float, float, float, float, float]
    scenes: tuple[Scene, ...]

    def cube_hash(self, cfg: BuildConfig) -> str:
        """Identity of the cube's content: scenes, their rules, and the resampling used."""
        d = {
            "scenes": [(s.id, s.harmonisation.rule, sorted(s.hrefs)) for s in self.scenes],
            "resampling": cfg.resampling_full,
            "grid": [self.epsg, list(self.shape), list(self.transform)],
            # 2: bilinear computed in float64, columns first (pipeline.kernels); 60 m bands
            # 1 DN apart from version 1 on ~0.5 % of B01/B09 pixels: a version 1 cube is not reused
            "version": 2,
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def group_grids(scenes: Sequence[Scene]) -> tuple[list[Grid], list[tuple[Scene, str]]]:
    """Group scenes by grid. Same grid + same datetime = the same acquisition twice (a
    reprocessed item, or one scene in two collections): keep the newest processing baseline
    (the first in (datetime, id) order on a tie) and reject the other, so no location and
    date appears twice."""
    by_grid: dict[tuple[Any, ...], dict[str, Scene]] = {}
    dropped: list[tuple[Scene, str]] = []
    for s in sorted(scenes, key=lambda s: (s.datetime, s.id)):
        key = (s.epsg, s.grid_shape, s.grid_transform)
        slot = by_grid.setdefault(key, {})
        prev = slot.get(s.datetime)
        if prev is None:
            slot[s.datetime] = s
            continue
        new_pb = s.harmonisation.processing_baseline or ""
        old_pb = prev.harmonisation.processing_baseline or ""
        keep, drop = (s, prev) if new_pb > old_pb else (prev, s)
        slot[s.datetime] = keep
        why = "superseded by a reprocessed item (newer baseline)" if new_pb != old_pb else "duplicate acquisition (same grid and datetime)"
        log.debug("%s: %s %s", drop.id, why, keep.id)
        dropped.append((drop, why))
    grids = []
    for (epsg, shape, transform), slot in by_grid.items():
        ss = tuple(sorted(slot.values(), key=lambda s: (s.datetime, s.id)))
        h = hashlib.sha256(json.dumps([epsg, list(shape), list(transform)]).encode()).hexdigest()[:8]
        tile = ss[0].tile or f"EPSG{epsg}"
        grids.append(Grid(f"{tile}_{h}", epsg, ss[0].tile, shape, transform, ss))
    grids.sort(key=lambda g: g.id)
    return grids, dropped


def clear_gdal_http_cache(url: str | None = None) -> None:
    """Forget GDAL's /vsicurl/ cache (file sizes, existence, blocks) in this process,
    for one remote `url` only when given (`VSICurlPartialClearCache`), else all of it.

    GDAL remembers a failed or partial HTTP answer for a URL; without clearing, a retry
    would see the cached failure instead of asking the server again. rasterio does not
    wrap `VSICurlClearCache`, so it is called through ctypes on rasterio's bundled libgdal
    (the same library instance rasterio already loaded). Best effort: a no-op if not found.
    """
    import ctypes
    import glob

    import rasterio

    here = os.path.dirname(rasterio.__file__)
    for lib in sorted(glob.glob(os.path.join(here, "..", "rasterio.libs", "libgdal*"))) or ["libgdal.so"]:
        try:
            gdal = ctypes.CDLL(lib)
            if url is None:
                gdal.VSICurlClearCache()
            else:
                scheme, _, rest = url.partition("://")  # GDAL's cache keys are its own paths
                vsi = {"s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}.get(scheme)
                gdal.VSICurlPartialClearCache(ctypes.c_char_p((f"{vsi}{rest}" if vsi else f"/vsicurl/{url}").encode()))
            return
        except (OSError, AttributeError):
            continue


def check_scene_assets(scene: Scene, *, patch_url: Any = None, threads: int = 8, gdal_env: dict[str, Any] | None = None) -> None:
    """Read every asset's header and compare it with the item's STAC metadata.

    Raises `SceneError` when a COG contradicts its item (CRS, shape or transform), because
    odc-stac would otherwise warp such a file silently onto the wrong grid. Transient read
    errors (HTTP 5xx, resets) propagate as ordinary exceptions so the caller can retry.
    """
    import concurrent.futures as cf

    import rasterio

    def one(band: str) -> str:
        href = scene.hrefs[band]
        meta = scene.item["assets"][band]
        url = patch_url(href) if patch_url else href
        with rasterio.Env(**(gdal_env or GDAL_CLOUD_ENV)), rasterio.open(url) as r:
            epsg = r.crs.to_epsg() if r.crs else None
            if epsg != scene.epsg:
                return f"asset {band}: CRS EPSG:{epsg} differs from the item's EPSG:{scene.epsg}"
            shape = meta.get("proj:shape")
            if shape and [r.height, r.width] != [int(v) for v in shape]:
                return f"asset {band}: shape {r.height}x{r.width} differs from proj:shape {shape[0]}x{shape[1]}"
            t = meta.get("proj:transform")
            if t and any(abs(a - b) > 1e-6 for a, b in zip(list(r.transform)[:6], t[:6])):
                return f"asset {band}: transform differs from proj:transform"
            if r.dtypes[0] not in ("uint16", "uint8"):
                return f"asset {band}: dtype {r.dtypes[0]}, expected uint16"
        return ""

    with cf.ThreadPoolExecutor(threads) as ex:
        problems = [p for p in ex.map(one, sorted(scene.hrefs)) if p]
    if problems:
        raise SceneError(scene.id, problems[0])


def load_grid(
    grid: Grid, cfg: BuildConfig, *, patch_url: Any = None, gdal_env: dict[str, Any] | None = None
) -> xr.Dataset:
    """Lazy Dask-backed harmonised cube of a grid (nothing is read until computed).

    `gdal_env`: GDAL options for the reads (default `GDAL_CLOUD_ENV`; a source's own
    settings, such as unsigned S3 access, go on top of it)."""
    import xarray as xr

    s = sensor()
    bands = s.band_names
    res = cfg.resampling_full
    resampling = {b.name: ("nearest" if b.gsd == 10 else res[f"{b.gsd}m"]) for b in s.bands}
    resampling["SCL"] = "nearest"  # classes must never be interpolated
    with_scl = [sc.has_scl for sc in grid.scenes]
    want = bands + (["SCL"] if any(with_scl) else [])
    ych, load_y = cube_row_chunks(cfg)
    chunk = min(cfg.cube_chunk, max(grid.shape))
    offsets = [sc.harmonisation.offset_dn for sc in grid.scenes]
    chunks = (min(load_y, grid.shape[0]), chunk)
    env = dict(gdal_env or GDAL_CLOUD_ENV)
    native = _native_load(grid, bands, any(with_scl), resampling, chunks, offsets, patch_url, env)
    if native is not None:
        dn, scl = native
    else:
        ds = _odc_load(grid, want, resampling, chunks, patch_url, env)
        if ds.sizes["time"] != len(grid.scenes):
            raise RuntimeError(f"odc-stac returned {ds.sizes['time']} time slices for {len(grid.scenes)} items of {grid.id}")
        dn = ds[bands].to_dataarray("band").transpose("time", "band", "y", "x")
        dn = apply_offsets(dn, xr.DataArray(np.array(offsets, dtype=np.int32), dims=["time"]))
        if "SCL" in ds:
            has = xr.DataArray(np.array(with_scl), dims=["time"])
            scl = ds["SCL"].astype(np.uint8).where(has, SCL_MISSING).astype(np.uint8)
        else:
            scl = xr.full_like(dn.isel(band=0), SCL_MISSING, dtype=np.uint8)
    order = [sc.id for sc in grid.scenes]
    out = xr.Dataset({"dn": dn, "scl": scl})
    # time and band as coordinates for xarray users; band names as variable-length strings
    # (zarr v3's "string" type; fixed-width unicode has no v3 specification yet)
    times = np.array([np.datetime64(sc.datetime.replace("Z", "").replace("+00:00", ""), "ms") for sc in grid.scenes])
    out = out.assign_coords(time=("time", times), band=("band", np.array(bands, dtype=object)))
    out.attrs.update(
        {
            "grid": grid.id,
            "tile": grid.tile,
            "epsg": grid.epsg,
            "grid_transform": list(grid.transform),
            "scene_ids": order,
            "datetimes": [sc.datetime for sc in grid.scenes],
            "harmonisation": [{"scene_id": sc.id, **sc.harmonisation.to_json()} for sc in grid.scenes],
            "has_scl": with_scl,
            "resampling": {"20m": res["20m"], "60m": res["60m"], "scl": "nearest"},
            "value_scale": s.scale,
            "nodata": s.nodata,
            "cube_hash": grid.cube_hash(cfg),
        }
    )
    return out


def _native_load(
    grid: Grid, bands: list[str], with_scl: bool, resampling: dict[str, str], chunks: tuple[int, int],
    offsets: list[int], patch_url: Any, env: dict[str, Any],
) -> tuple[xr.DataArray, xr.DataArray] | None:
    """The aligned-grid fast path (see `pipeline.native_read`): harmonised (dn, scl) arrays,
    or None when it does not apply."""
    import xarray as xr

    from pipeline.native_read import BandRead, aligned_factor, cube_arrays

    want = bands + (["SCL"] if with_scl else [])
    if any(resampling[b] not in ("nearest", "bilinear") for b in want):
        return None
    dn_reads: list[list[BandRead]] = []
    scl_reads: list[BandRead | None] = []
    for sc in grid.scenes:
        reads: dict[str, BandRead | None] = {}
        for b in want:
            a = sc.item["assets"].get(b)
            if a is None:
                if b == "SCL":
                    reads[b] = None  # this date has no SCL: filled with SCL_MISSING
                    continue
                return None
            k = aligned_factor(a, grid.transform, grid.shape)
            if k is None:
                return None
            reads[b] = BandRead(sc.hrefs[b], k, resampling[b], (int(a["proj:shape"][0]), int(a["proj:shape"][1])))
        dn_reads.append([r for b, r in reads.items() if b != "SCL"])  # type: ignore[misc]
        scl_reads.append(reads.get("SCL"))
    dn, scl = cube_arrays(dn_reads, scl_reads, offsets, grid.shape, chunks, env, patch_url, SCL_MISSING)
    a, _, c, _, e, f = grid.transform
    coords = {"y": f + (np.arange(grid.shape[0]) + 0.5) * e, "x": c + (np.arange(grid.shape[1]) + 0.5) * a}
    return (xr.DataArray(dn, dims=("time", "band", "y", "x"), coords=coords),
            xr.DataArray(scl, dims=("time", "y", "x"), coords=coords))


def _odc_load(
    grid: Grid, want: list[str], resampling: dict[str, str], chunks: tuple[int, int], patch_url: Any,
    env: dict[str, Any],
) -> xr.Dataset:
    """General path: odc-stac warps every band onto the grid's 10 m geobox."""
    import odc.stac

    _configure_odc(env)
    import pystac
    from affine import Affine
    from odc.geo.geobox import GeoBox

    geobox = GeoBox(grid.shape, Affine(*grid.transform), crs=f"EPSG:{grid.epsg}")
    items = [pystac.Item.from_dict(sc.item, preserve_dict=True) for sc in grid.scenes]
    return odc.stac.load(
        items,
        bands=want,
        geobox=geobox,
        groupby="id",  # one time slice per item: two passes are never fused silently
        resampling=resampling,
        dtype="uint16",
        nodata=0,
        chunks={"time": 1, "y": chunks[0], "x": chunks[1]},
        fail_on_error=True,
        preserve_original_order=True,
        patch_url=patch_url,
    )


def cube_row_chunks(cfg: BuildConfig) -> tuple[int, int]:
    """(zarr row chunk, Dask load row chunk) for the cube.

    The zarr row chunk is a multiple of the least common multiple of the strip heights of
    every tiling (size x GSD factor: 96 and 128 -> 384), so tiling decodes each chunk row
    exactly once and no strip straddles two chunk rows; at least ~512 rows (128 px alone ->
    512, not 128): each chunk is a file, and creating 4x as many cost ~0.4 s per quarter
    scene here. The load chunk is the multiple of it nearest to `cube_chunk`, so odc-stac
    reads COG windows of about the COG's internal tile height.
    """
    import math

    heights = [t.size * t.factor for t in cfg.tiling]
    ych = math.lcm(*heights)
    if ych > 2048:  # unusual size mixes: fall back to a plain chunk (strips may then straddle)
        ych = 512
    ych *= max(1, round(512 / ych))
    load_y = ych * max(1, round(cfg.cube_chunk / ych))
    return ych, load_y


def cube_rel(grid: Grid, version: int = 1) -> str:
    """`cube/v<NNNN>/<grid>.zarr` inside the dataset: a refresh's new dates on a known grid get their own cube."""
    return f"cube/v{version:04d}/{grid.id}.zarr"


COMPLETE = ".complete"  # `<store>.complete`, written last beside a cube: its content hash and chunk counts


def cube_is_complete(loc: Location, rel: str, cube_hash: str) -> bool:
    """True when the cube at `rel` holds exactly this content and every chunk it counts is there."""
    marker = loc.read_json(f"{rel}{COMPLETE}")
    if not isinstance(marker, dict) or marker.get("cube_hash") != cube_hash:
        return False
    counts = marker.get("chunks") or {}
    if not counts:
        return False
    for name, expected in counts.items():
        present = [p for p in loc.list(f"{rel}/{name}/c") if not p.endswith((".tmp", ".partial"))]
        if len(present) != int(expected):
            log.warning("cube %s: %d of %d chunks of %r present: rebuilding it", rel, len(present), expected, name)
            return False
    return True


@dataclass
class _Prepared:
    ds: Any  # the cube dataset, chunked for the write
    pending: Any  # xarray's delayed write of the chunks (metadata already written)
    counts: dict[str, int]  # chunk files per array


def _prepare_cube(ds: xr.Dataset, store: Path, cfg: BuildConfig) -> _Prepared:
    """Encode the cube and write its zarr metadata (consolidated) into the new folder `store`."""
    import warnings

    import rioxarray  # noqa: F401  (registers the .rio accessor)

    ds = ds.rio.write_crs(f"EPSG:{ds.attrs['epsg']}")
    ds = ds.rio.write_transform(_affine(ds.attrs["grid_transform"]))
    from zarr.codecs import BloscCodec

    ych, load_y = cube_row_chunks(cfg)
    xch = min(cfg.cube_chunk, ds.sizes["x"])
    # dask chunks are whole multiples of the zarr chunks, so parallel writes never share a chunk
    ds = ds.chunk({"time": 1, "band": -1, "y": min(load_y, ds.sizes["y"]), "x": xch})
    # Blosc lz4 + byte shuffle: measured on a quarter scene (12 x 2745 x 2745 uint16), it
    # writes 7x and reads 2x faster than zarr's default zstd, and compresses better (1.63 vs 1.45)
    codec = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    chunks = {"dn": (1, ds.sizes["band"], min(ych, ds.sizes["y"]), xch), "scl": (1, min(ych, ds.sizes["y"]), xch)}
    ds["dn"].encoding = {"chunks": chunks["dn"], "compressors": [codec]}
    ds["scl"].encoding = {"chunks": chunks["scl"], "compressors": [codec]}
    ds["time"].encoding = {"units": "milliseconds since 1970-01-01", "dtype": "int64"}
    ds["dn"].attrs.update({"long_name": "harmonised DN (reflectance = dn * 1e-4)", "_FillValue_note": "0 = nodata"})
    if store.exists():
        shutil.rmtree(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is not (yet) in the v3 specification; xarray
        # reads it, and without it every `open_zarr` warns and lists the store
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        # write_empty_chunks: every chunk is written (no "all fill value?" scan: 9% of build time)
        pending = ds.to_zarr(store, mode="w", zarr_format=3, consolidated=True, compute=False, write_empty_chunks=True)
    counts = {name: int(np.prod([-(-n // c) for n, c in zip(ds[name].shape, ch)])) for name, ch in chunks.items()}
    return _Prepared(ds, pending, counts)


def write_cube(ds: xr.Dataset, store: Path, cfg: BuildConfig, threads: int | None = None) -> dict[str, int]:
    """Write the cube into the new local folder `store` (computed on `threads` local threads);
    return the number of chunk files per array (what the `.complete` marker records).

    Every chunk is written, fill values included, so a missing chunk file can only mean a
    lost write, never "all nodata" (`cube_is_complete` relies on that)."""
    prepared = _prepare_cube(ds, store, cfg)
    scheduler = {"scheduler": "threads", "num_workers": threads} if threads else {"scheduler": "threads"}
    # zarr has written the metadata and coordinates; the chunks of dn and scl go through
    # `zarr_chunks` (the same bytes, ~25 % less CPU: no async machinery, no page-cache copies)
    targets = [open_chunked(store / name) for name in ("dn", "scl")]
    if all(targets):
        import dask.array as da

        da.store([prepared.ds["dn"].data, prepared.ds["scl"].data], targets, lock=False, **scheduler)
    else:
        prepared.pending.compute(**scheduler)
    return prepared.counts


def write_cube_streaming(ds: xr.Dataset, store: Path, cfg: BuildConfig, threads: int | None, feed: Any,
                         on_ready: Any = None) -> dict[str, int]:
    """`write_cube`, computed date by date and chunk row by chunk row, in order: each row
    block's chunks are written, then its chunk rows go to `feed` (`tiling.LiveFeed`), so the
    tiling of this cube runs meanwhile from memory. Same chunks, same bytes as `write_cube`.
    `on_ready()` is called once the store's metadata is written (the tiling may open it)."""
    import dask

    from pipeline.zarr_chunks import recycled_empty

    prepared = _prepare_cube(ds, store, cfg)
    if on_ready is not None:
        on_ready()
    dn, scl = prepared.ds["dn"].data, prepared.ds["scl"].data
    targets = [open_chunked(store / name) for name in ("dn", "scl")]
    if not all(targets):
        raise RuntimeError(f"{store}: not the cube's own chunk layout")
    ych, load_y = cube_row_chunks(cfg)
    n_t, n_b, h, w = dn.shape
    for t in range(n_t):
        for r0 in range(0, h, load_y):
            r1 = min(r0 + load_y, h)
            # Each chunk task writes its chunk file and copies its block into this row block,
            # in parallel; computing the row as one Dask array instead assembled it in a
            # single final task (`concatenate3`: ~0.6 CPU-s per quarter scene, serial)
            row_dn = recycled_empty((1, n_b, r1 - r0, w), dn.dtype)
            row_scl = recycled_empty((1, r1 - r0, w), scl.dtype)
            tasks = [dask.delayed(_store_block)(blk, tg, row, where, tuple(o + i for o, i in zip(origin, where)))
                     for a, tg, row, origin in ((dn[t:t + 1, :, r0:r1, :], targets[0], row_dn, (t, 0, r0, 0)),
                                                (scl[t:t + 1, r0:r1, :], targets[1], row_scl, (t, r0, 0)))
                     for blk, where in zip(a.to_delayed().ravel(), _block_origins(a), strict=True)]
            dask.compute(*tasks, scheduler="threads", num_workers=threads)
            for y0 in range(r0, r1, ych):
                y1 = min(y0 + ych, r1)
                feed.put(t, y0, row_dn[:, :, y0 - r0:y1 - r0, :], row_scl[:, y0 - r0:y1 - r0, :])
    return prepared.counts


def _block_origins(a: Any) -> list[tuple[int, ...]]:
    """Offset of every block of the Dask array `a` within `a`, in `to_delayed().ravel()` order."""
    starts = [np.cumsum((0,) + c[:-1]) for c in a.chunks]
    return [tuple(int(s[i]) for s, i in zip(starts, idx)) for idx in np.ndindex(*a.numblocks)]


def _store_block(block: np.ndarray, target: Any, row: np.ndarray, in_row: tuple[int, ...],
                 in_whole: tuple[int, ...]) -> None:
    """Write one computed block into `target` (a `zarr_chunks.ChunkedArray`) at `in_whole`
    (its offset in the whole array) and copy it into `row` at `in_row` (its offset there)."""
    row[tuple(slice(o, o + n) for o, n in zip(in_row, block.shape))] = block
    target[tuple(slice(o, o + n) for o, n in zip(in_whole, block.shape))] = block


def publish_cube(loc: Location, rel: str, store: Path, cube_hash: str, counts: dict[str, int]) -> None:
    """Move (local) or upload (remote) the finished `store` to `rel`, then write its marker last."""
    loc.remove(f"{rel}{COMPLETE}")  # an older cube's marker goes first: never a marker over a half-replaced store
    loc.put_tree(store, rel)
    loc.write_json(f"{rel}{COMPLETE}", {"cube_hash": cube_hash, "chunks": counts})


def open_cube(url: str) -> xr.Dataset:
    """A finished cube, lazily (Dask-backed), from a local path or a URL."""
    import xarray as xr

    return xr.open_zarr(url, consolidated=True)


def _affine(t: Sequence[float]) -> Any:
    from affine import Affine

    return Affine(*t[:6])


def _configure_odc(env: dict[str, Any]) -> None:
    """Install `env` as odc-stac's GDAL settings here and on the Dask cluster's workers, if
    any. Done on first use of the general path only: importing odc-stac costs ~1 s, and the
    aligned-grid path (every Sentinel-2 tile) passes its settings with each read instead."""
    import odc.stac

    odc.stac.configure_rio(cloud_defaults=True, **env)
    try:
        from distributed import get_client

        odc.stac.configure_rio(cloud_defaults=True, client=get_client(), **env)
    except ValueError:  # no Dask client: the local configuration is all there is
        pass
