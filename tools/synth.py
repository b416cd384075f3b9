"""Scale data: full-size Sentinel-2 L2A scenes as Earth-Search-style COGs, from real pixels.

    python -m tools.synth --out /tmp/s2synth --scenes 4 --size 10980 --seed 0

Each scene is one `sentinel-2-c1-l2a`-style STAC item in a static catalog
(`catalog.json` -> `sentinel-2-c1-l2a/collection.json` -> `<item>/<item>.json`, relative
hrefs) with one COG per band at its native size (`size` px at 10 m, `ceil(size/2)` at 20 m,
`ceil(size/6)` at 60 m; 10980 / 5490 / 1830 for a full 109.8 km scene): uint16, nodata 0,
DEFLATE + predictor 2, internally tiled, with overviews; plus SCL at 20 m (uint8).

Pixels are not noise. The scene is a mosaic of the real BigEarthNet-S2 patches in
`tests/data/bigearthnet-s2-tiny` (1.2 km each): every 120 px mosaic tile is one randomly
chosen patch under one of the 8 flips/rotations, times a per-tile gain in
[1 - PERTURBATION, 1 + PERTURBATION]. Every band takes the same patch, orientation and gain,
each from that band's own native-resolution raster (10 m: 120 px, 20 m: 60 px, 60 m: 20 px),
so texture and spectra are real at every resolution. On top of that:

* clouds (SCL 8/9), thin cirrus (10) and their shadows (3, displaced from the clouds in a
  random sun direction) from smooth random blobs, blended into the DN;
* a nodata wedge (DN 0 in every band, SCL 0) in one corner, like a real orbit-swath edge;
* SCL 4/5/6 (vegetation / not vegetated / water) from the patches' own spectra;
* the +1000 DN offset on every valid pixel (processing baseline 05.10, Collection-1: the
  provider ships raw DN, `raster:bands` scale 0.0001 offset -0.1).

`eo:cloud_cover` and the `s2:*_percentage` properties are computed from the SCL written.
Grids are real Sentinel-2 tiles (MGRS name, EPSG and origin copied from real Earth Search /
Planetary Computer items in `../shared/data/stac`), so several scenes are distinct grids;
beyond the six tiles listed, scenes revisit them on later dates (5-day repeat).
The same seed and size give byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from pipeline.catalogs import CATALOG_DIR, Band, sensor
from tools.sample_catalog import COG_MEDIA_TYPE, collection_extent, write_static_catalog

log = logging.getLogger(__name__)

STAC_VERSION = "1.1.0"
COLLECTION_ID = "sentinel-2-c1-l2a"
PROCESSING_BASELINE = "05.10"
OFFSET_DN = 1000  # baseline >= 04.00: DN = 10000 * reflectance + 1000
PERTURBATION = 0.1  # per-tile multiplicative gain in [0.9, 1.1]
PATCH_PX_10M = 120  # BigEarthNet patch edge at 10 m (1.2 km)
FULL_SIZE = 10980  # 10 m pixels of a 109.8 km MGRS tile
#: The embedded sample catalog's COGs: the same real BigEarthNet-S2 patches (original DN,
#: <name>/<name>_<band>.tif), shipped with the package; nothing is read from tests/.
DEFAULT_PATCHES = CATALOG_DIR / "sample" / "sentinel-2-l2a"

EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/view/v1.0.0/schema.json",
]


@dataclass(frozen=True)
class Tile:
    """A real Sentinel-2 MGRS tile: name, UTM EPSG and upper-left corner of its 10 m grid."""

    name: str
    epsg: int
    ulx: float
    uly: float
    orbit: int  # relative orbit of the real item it was copied from


# Name, EPSG, origin and relative orbit copied from the real items in ../shared/data/stac.
TILES = (
    Tile("35MNM", 32735, 499980.0, 9200020.0, 78),  # planetary-computer_timeseries_35MNM_2020
    Tile("13TDE", 32613, 399960.0, 4500000.0, 141),  # earth-search-v1_search_S2A_13TDE_20231008
    Tile("47XML", 32647, 399960.0, 9100020.0, 122),  # planetary-computer_items_2024-04-19
    Tile("47XMJ", 32647, 399960.0, 8900040.0, 122),
    Tile("46XES", 32646, 499980.0, 9200040.0, 122),
    Tile("46XER", 32646, 499980.0, 9100020.0, 122),
)

# Rough top-of-cloud DN (before the offset) per band: bright and flat in the VNIR, darker in
# the SWIR and the B09 water-vapour band. Enough to make cloudy pixels look like clouds.
CLOUD_DN = {"B01": 6500, "B02": 6300, "B03": 6200, "B04": 6200, "B05": 6300, "B06": 6400, "B07": 6400,
            "B08": 6500, "B8A": 6400, "B09": 3500, "B11": 4500, "B12": 3000}
SHADOW_DARKENING = 0.6  # DN *= 1 - 0.6 * shadow opacity


def band_shape(size: int, gsd: int) -> int:
    """Pixels per side of a band at `gsd` m for a scene of `size` px at 10 m (10980 -> 5490, 1830)."""
    return -(-size * 10 // gsd)


# --------------------------------------------------------------------------- real patches


@functools.cache
def load_patches(folder: Path = DEFAULT_PATCHES) -> dict[str, np.ndarray]:
    """Band name -> uint16 [N, 8, p, p]: every patch under the 8 flips/rotations (p = native px).

    Orientation o = 4 * flip + k: `rot90(patch, k)` then, if flip, a left-right flip.
    """
    folders = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no BigEarthNet patch folders in {folder}")
    out: dict[str, np.ndarray] = {}
    for band in sensor().bands:
        arrs = []
        for f in folders:
            with rasterio.open(f / f"{f.name}_{band.name}.tif") as src:
                arrs.append(src.read(1))
        stack = np.stack(arrs)  # [N, p, p]
        out[band.name] = np.stack([orient(stack, o) for o in range(8)], axis=1)
    return out


def orient(a: np.ndarray, o: int) -> np.ndarray:
    """Orientation `o` in 0..7 of [..., p, p]: rot90 by `o % 4`, then a left-right flip if `o >= 4`."""
    r = np.rot90(a, o % 4, axes=(-2, -1))
    return np.ascontiguousarray(r[..., ::-1] if o >= 4 else r)


# --------------------------------------------------------------------------- scene layout


@dataclass(frozen=True)
class Layout:
    """Everything random about one scene, drawn once from the seed (pixels follow from it)."""

    size: int
    n_tiles: int  # mosaic tiles per side
    patch: np.ndarray  # [n, n] patch index per mosaic tile
    orientation: np.ndarray  # [n, n] in 0..7
    gain: np.ndarray  # [n, n] float32
    cloud: np.ndarray  # [s60, s60] float32 opacity of thick cloud on the 60 m grid
    cirrus: np.ndarray  # [s60, s60] float32
    shadow: np.ndarray  # [s60, s60] float32
    nodata_corner: int  # 0 UL, 1 UR, 2 LR, 3 LL
    nodata_m: float  # the wedge holds pixels whose centre is closer than this (x + y metres) to the corner


def draw_layout(rng: np.random.Generator, size: int, n_patches: int) -> Layout:
    n = -(-size // PATCH_PX_10M)
    patch = rng.integers(0, n_patches, (n, n))
    orientation = rng.integers(0, 8, (n, n))
    gain = rng.uniform(1 - PERTURBATION, 1 + PERTURBATION, (n, n)).astype(np.float32)
    s60 = band_shape(size, 60)
    scale = size / FULL_SIZE
    # Cumulus fields: clusters of small blobs (a few hundred metres to 1.5 km) and wide thin
    # cirrus, about 10-30 % cover. Spreads shrink for scenes far smaller than a tile so a
    # test-sized scene keeps clear areas.
    f = min(1.0, 4 * scale)
    centres = rng.uniform(0, s60, (max(2, round(12 * scale * scale)), 2))
    cloud = _blobs(rng, s60, centres, per_cluster=12, spread_m=4000 * f, sigma_m=(300 * f, 1500 * f), amp=(0.6, 1.4))
    cirrus = 0.4 * _blobs(rng, s60, rng.uniform(0, s60, (max(1, round(2 * scale * scale)), 2)), per_cluster=1,
                          spread_m=0, sigma_m=(3000 * f, 8000 * f), amp=(0.5, 1.0))
    # Shadows: the cloud field displaced 600-2000 m away from the sun, outside the clouds.
    ang = rng.uniform(0, 2 * math.pi)
    dist = rng.uniform(600, 2000) / 60.0
    shadow = np.clip(_shift(cloud, round(dist * math.sin(ang)), round(dist * math.cos(ang))) - cloud, 0, 1)
    side_m = size * 10.0
    return Layout(
        size=size, n_tiles=n, patch=patch, orientation=orientation, gain=gain,
        cloud=cloud, cirrus=cirrus, shadow=shadow.astype(np.float32),
        nodata_corner=int(rng.integers(0, 4)), nodata_m=float(rng.uniform(0.25, 0.45) * side_m),
    )


def _blobs(
    rng: np.random.Generator, s: int, centres: np.ndarray, *, per_cluster: int, spread_m: float,
    sigma_m: tuple[float, float], amp: tuple[float, float],
) -> np.ndarray:
    """Opacity in [0, 1] on an [s, s] 60 m grid: clipped sum of Gaussian blobs, `per_cluster`
    of them scattered (normal, `spread_m`) around each of `centres` [K, 2] (60 m px)."""
    field = np.zeros((s, s), np.float32)
    pos = np.repeat(centres, per_cluster, axis=0) + rng.normal(0, spread_m / 60.0, (len(centres) * per_cluster, 2))
    for cy, cx in pos:
        sig = rng.uniform(*sigma_m) / 60.0
        a = rng.uniform(*amp)
        r = int(3 * sig) + 1
        y0, y1 = max(0, int(cy) - r), min(s, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(s, int(cx) + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        xx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        field[y0:y1, x0:x1] += a * np.exp(-(yy * yy + xx * xx) / (2 * sig * sig))
    return np.clip(field, 0, 1)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _axis_weights(n_out: int, n_in: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (pixel-centre aligned) source indices and weights to upsample `factor` x."""
    pos = np.clip((np.arange(n_out) + 0.5) / factor - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)


def _upsample_rows(field: np.ndarray, factor: int, r0: int, r1: int, xw: tuple[np.ndarray, ...]) -> np.ndarray:
    """Rows r0:r1 of `field` bilinearly upsampled by `factor` (columns via precomputed `xw`)."""
    if factor == 1:
        return field[r0:r1, : len(xw[0])]
    y0, y1, wy = _axis_weights(r1, field.shape[0], factor)
    y0, y1, wy = y0[r0:], y1[r0:], wy[r0:, None]
    rows = field[y0] * (1 - wy) + field[y1] * wy
    x0, x1, wx = xw
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def nodata_mask(layout: Layout, gsd: int, r0: int, r1: int, width: int) -> np.ndarray:
    """[r1-r0, width] True inside the corner wedge, for pixels of `gsd` m (centre test)."""
    side = layout.size * 10.0
    y = (np.arange(r0, r1) + 0.5)[:, None] * gsd
    x = (np.arange(width) + 0.5)[None, :] * gsd
    c = layout.nodata_corner
    dy = y if c in (0, 1) else side - y
    dx = x if c in (0, 3) else side - x
    return (dx + dy) < layout.nodata_m


# --------------------------------------------------------------------------- pixels


def band_pixels(layout: Layout, band: Band, patches: np.ndarray, *, clean: bool = False) -> np.ndarray:
    """uint16 [S, S] of one band at its native resolution: mosaic, clouds, offset, nodata.

    `clean=True` returns the cloud-free mosaic before offset and nodata (for SCL classes).
    Built one mosaic-tile row at a time, so the float temporaries stay small.
    """
    gsd = int(band.gsd)
    p = PATCH_PX_10M * 10 // gsd  # patch edge at this resolution
    s = band_shape(layout.size, gsd)
    n = layout.n_tiles
    flat = patches.reshape(-1, p, p)  # [N * 8, p, p]
    idx = layout.patch * 8 + layout.orientation
    out = np.empty((s, s), np.uint16)
    f60 = 60 // gsd
    xw = _axis_weights(s, layout.cloud.shape[1], f60)
    cloud_dn = np.float32(CLOUD_DN[band.name])
    for ty in range(n):
        r0, r1 = ty * p, min((ty + 1) * p, s)
        if r0 >= s:
            break
        tiles = flat[idx[ty]].astype(np.float32) * layout.gain[ty][:, None, None]  # [n, p, p]
        row = tiles.transpose(1, 0, 2).reshape(p, n * p)[: r1 - r0, :s]
        if not clean:
            cl = _upsample_rows(layout.cloud, f60, r0, r1, xw)
            ci = _upsample_rows(layout.cirrus, f60, r0, r1, xw)
            sh = _upsample_rows(layout.shadow, f60, r0, r1, xw)
            row = row * (1 - SHADOW_DARKENING * sh)
            op = np.maximum(cl, ci)
            row = row * (1 - op) + cloud_dn * op
        v = np.clip(np.rint(row), 1, 65535 - OFFSET_DN)
        if clean:
            out[r0:r1] = v
            continue
        v = v.astype(np.uint16) + np.uint16(OFFSET_DN)
        v[nodata_mask(layout, gsd, r0, r1, s)] = 0
        out[r0:r1] = v
    return out


def scl_pixels(layout: Layout, patches: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 SCL [S20, S20]: 4/5/6 from the clean spectra, then 3, 8, 9, 10 and 0 on top."""
    bands = {b.name: b for b in sensor().bands}
    b05 = band_pixels(layout, bands["B05"], patches["B05"], clean=True).astype(np.float32)
    b8a = band_pixels(layout, bands["B8A"], patches["B8A"], clean=True).astype(np.float32)
    b11 = band_pixels(layout, bands["B11"], patches["B11"], clean=True).astype(np.float32)
    ndvi = (b8a - b05) / np.maximum(b8a + b05, 1)
    scl = np.where(ndvi > 0.3, 4, 5).astype(np.uint8)
    scl[(b8a < 800) & (b11 < 600)] = 6  # water: dark in the NIR and SWIR
    s = scl.shape[0]
    xw = _axis_weights(s, layout.cloud.shape[1], 3)
    cl = _upsample_rows(layout.cloud, 3, 0, s, xw)
    ci = _upsample_rows(layout.cirrus, 3, 0, s, xw)
    sh = _upsample_rows(layout.shadow, 3, 0, s, xw)
    scl[sh > 0.3] = 3
    scl[ci > 0.15] = 10
    scl[cl > 0.3] = 8
    scl[cl > 0.6] = 9
    scl[nodata_mask(layout, 20, 0, s, s)] = 0
    return scl


# --------------------------------------------------------------------------- files


def write_cog(path: Path, data: np.ndarray, *, epsg: int, transform: Affine, blocksize: int, resampling: str) -> None:
    """One-band COG via GDAL's COG driver: DEFLATE + predictor 2, tiled, overviews, nodata 0.

    Compression runs on all cores (NUM_THREADS); the file layout does not depend on it.
    """
    h, w = data.shape
    profile = dict(driver="MEM", height=h, width=w, count=1, dtype=data.dtype.name, crs=f"EPSG:{epsg}",
                   transform=transform, nodata=0)
    with MemoryFile() as mem, mem.open(**profile) as src:
        src.write(data, 1)
        rasterio.shutil.copy(
            src, str(path), driver="COG", BLOCKSIZE=blocksize, COMPRESS="DEFLATE", PREDICTOR="YES",
            OVERVIEWS="AUTO", OVERVIEW_RESAMPLING=resampling, NUM_THREADS="ALL_CPUS",
        )


def _lonlat(epsg: int, xy: Sequence[tuple[float, float]]) -> list[list[float]]:
    from pyproj import Transformer

    t = Transformer.from_crs(epsg, 4326, always_xy=True)
    return [[round(float(v), 7) for v in t.transform(x, y)] for x, y in xy]


def footprint(layout: Layout, tile: Tile) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON of the valid-data area (the square minus the nodata wedge) and its lon/lat bbox."""
    side = layout.size * 10.0
    k = min(layout.nodata_m, side)
    ring = [(k, 0.0), (side, 0.0), (side, side), (0.0, side), (0.0, k)]  # UL wedge cut, (x, y-down) metres
    c = layout.nodata_corner
    pts = [((side - x) if c in (1, 2) else x, (side - y) if c in (2, 3) else y) for x, y in ring]
    xy = [(tile.ulx + x, tile.uly - y) for x, y in pts]
    # densify each edge (UTM straight lines are not straight in lon/lat)
    dense = [(x0 + (x1 - x0) * t / 8, y0 + (y1 - y0) * t / 8)
             for (x0, y0), (x1, y1) in zip(xy, xy[1:] + xy[:1]) for t in range(8)]
    ll = _lonlat(tile.epsg, dense)
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ll, ll[1:] + ll[:1]))
    if area < 0:
        ll = ll[::-1]  # RFC 7946: exterior rings counter-clockwise
    lons, lats = [p[0] for p in ll], [p[1] for p in ll]
    return {"type": "Polygon", "coordinates": [[*ll, ll[0]]]}, [min(lons), min(lats), max(lons), max(lats)]


def scl_percentages(scl: np.ndarray) -> dict[str, float]:
    """`eo:cloud_cover` (SCL 8, 9, 10 over valid pixels, as ESA's CLOUDY_PIXEL_PERCENTAGE) and s2:* shares."""
    counts = np.bincount(scl.ravel(), minlength=12).astype(np.float64)
    valid = max(counts[1:].sum(), 1.0)
    pct = lambda *c: round(float(sum(counts[i] for i in c) / valid * 100), 6)  # noqa: E731
    return {
        "eo:cloud_cover": pct(8, 9, 10),
        "s2:nodata_pixel_percentage": round(float(counts[0] / counts.sum() * 100), 6),
        "s2:saturated_defective_pixel_percentage": pct(1),
        "s2:dark_features_percentage": pct(2),
        "s2:cloud_shadow_percentage": pct(3),
        "s2:vegetation_percentage": pct(4),
        "s2:not_vegetated_percentage": pct(5),
        "s2:water_percentage": pct(6),
        "s2:unclassified_percentage": pct(7),
        "s2:medium_proba_clouds_percentage": pct(8),
        "s2:high_proba_clouds_percentage": pct(9),
        "s2:thin_cirrus_percentage": pct(10),
        "s2:snow_ice_percentage": pct(11),
    }


def _asset(title: str, href: str, gsd: int, shape: int, tile: Tile, dtype: str, *, band: Band | None) -> dict[str, Any]:
    rb: dict[str, Any] = {"nodata": 0, "data_type": dtype, "spatial_resolution": gsd}
    a: dict[str, Any] = {"href": href, "type": COG_MEDIA_TYPE, "title": title}
    if band is not None:
        rb.update({"bits_per_sample": 15, "scale": 0.0001, "offset": -0.1})
        a["eo:bands"] = [{"name": band.common_name if band.common_name != "rededge" else band.asset_keys["earth_search"],
                          "common_name": band.common_name, "center_wavelength": band.center_wavelength}]
        a["gsd"] = gsd
    a.update({
        "proj:shape": [shape, shape],
        "proj:transform": [float(gsd), 0.0, tile.ulx, 0.0, -float(gsd), tile.uly],
        "raster:bands": [rb],
        "roles": ["data", "reflectance"] if band is not None else ["data"],
    })
    return a


def generate_scene(
    item_dir: Path, index: int, *, size: int, seed: int, tile: Tile, when: dt.datetime,
    patches: dict[str, np.ndarray], blocksize: int = 512, threads: int | None = None,
) -> dict[str, Any]:
    """Write one scene's 12 band COGs + SCL into `item_dir`; return its STAC item (relative hrefs)."""
    s = sensor()
    n_patches = next(iter(patches.values())).shape[0]
    layout = draw_layout(np.random.default_rng([seed, index]), size, n_patches)
    platform = _platform(index)
    iid = item_id(index, tile, when)
    item_dir.mkdir(parents=True, exist_ok=True)

    def write_band(b: Band) -> tuple[str, dict[str, Any]]:
        gsd = int(b.gsd)
        data = band_pixels(layout, b, patches[b.name])
        write_cog(item_dir / f"{b.name}.tif", data, epsg=tile.epsg, transform=Affine(gsd, 0, tile.ulx, 0, -gsd, tile.uly),
                  blocksize=blocksize, resampling="AVERAGE")
        key = b.asset_keys["earth_search"]
        return key, _asset(f"{b.name} - {key} - {gsd}m", f"./{b.name}.tif", gsd, data.shape[0], tile, "uint16", band=b)

    def write_scl() -> tuple[np.ndarray, dict[str, Any]]:
        scl = scl_pixels(layout, patches)
        write_cog(item_dir / "SCL.tif", scl, epsg=tile.epsg, transform=Affine(20, 0, tile.ulx, 0, -20, tile.uly),
                  blocksize=blocksize, resampling="NEAREST")
        return scl, _asset("Scene classification map (SCL)", "./SCL.tif", 20, scl.shape[0], tile, "uint8", band=None)

    # Bands in parallel: numpy and GDAL release the GIL for the heavy work.
    with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1)) as pool:
        scl_future = pool.submit(write_scl)
        band_assets = dict(pool.map(write_band, s.bands))
        scl, scl_asset = scl_future.result()
    assets = {b.asset_keys["earth_search"]: band_assets[b.asset_keys["earth_search"]] for b in s.bands}
    assets["scl"] = scl_asset
    geometry, bbox = footprint(layout, tile)
    zone, lat_band, square = int(tile.name[:2]), tile.name[2], tile.name[3:]
    props: dict[str, Any] = {
        "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
        "platform": platform,
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        **scl_percentages(scl),
        "proj:code": f"EPSG:{tile.epsg}",
        "proj:epsg": tile.epsg,
        "mgrs:utm_zone": zone,
        "mgrs:latitude_band": lat_band,
        "mgrs:grid_square": square,
        "grid:code": f"MGRS-{tile.name}",
        "s2:tile_id": f"S2{platform[-1].upper()}_OPER_MSI_L2A_TL_SYNTH_{when:%Y%m%dT%H%M%S}_T{tile.name}_N05.10",
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": PROCESSING_BASELINE,
        "s2:product_uri": f"S2{platform[-1].upper()}_MSIL2A_{when:%Y%m%dT%H%M%S}_N0510_R{tile.orbit:03d}_T{tile.name}_{when:%Y%m%dT%H%M%S}.SAFE",
        "sat:relative_orbit": tile.orbit,
        "processing:software": {"tools.synth": "1"},
        "synth:seed": seed,
        "synth:size": size,
        "synth:note": (
            "Synthetic scale-test scene: mosaic of real BigEarthNet-S2 patches (flipped/rotated, per-tile gain "
            f"within +-{PERTURBATION:g}), synthetic clouds, shadows and nodata wedge; not a real acquisition."
        ),
    }
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": EXTENSIONS,
        "id": iid,
        "geometry": geometry,
        "bbox": bbox,
        "properties": props,
        "assets": assets,
        "links": [],
    }


def _platform(index: int) -> str:
    return "sentinel-2a" if index % 2 == 0 else "sentinel-2b"


def item_id(index: int, tile: Tile, when: dt.datetime) -> str:
    """Earth Search Collection-1 item id, e.g. `S2A_T35MNM_20240612T103021_L2A`."""
    return f"S2{_platform(index)[-1].upper()}_T{tile.name}_{when:%Y%m%dT%H%M%S}_L2A"


def scene_plan(n_scenes: int, start: dt.datetime) -> list[tuple[Tile, dt.datetime]]:
    """(tile, datetime) of each scene: distinct tiles first, then later dates (5-day repeat)."""
    return [(TILES[i % len(TILES)], start + dt.timedelta(days=5 * (i // len(TILES)), minutes=i)) for i in range(n_scenes)]


def generate_scenes(
    out_dir: str | Path, n_scenes: int = 1, size: int = FULL_SIZE, seed: int = 0, *,
    patches_dir: str | Path = DEFAULT_PATCHES, blocksize: int = 512,
    start: dt.datetime = dt.datetime(2024, 6, 12, 10, 30, 21, tzinfo=dt.timezone.utc),
    threads: int | None = None,
) -> Path:
    """Write `n_scenes` synthetic full-format L2A scenes and their static catalog; return catalog.json.

    `size`: 10 m pixels per side (10980 = a full MGRS tile; 2745 = a quarter of its side).
    """
    if size < 48:
        raise ValueError(f"size={size}: need at least 48 px (8 px at 60 m)")
    if n_scenes < 1:
        raise ValueError(f"n_scenes={n_scenes}: need at least 1")
    out = Path(out_dir)
    patches = load_patches(Path(patches_dir))
    items = []
    for i, (tile, when) in enumerate(scene_plan(n_scenes, start)):
        t0 = time.monotonic()
        iid = item_id(i, tile, when)
        items.append(generate_scene(out / COLLECTION_ID / iid, i, size=size, seed=seed, tile=tile, when=when,
                                    patches=patches, blocksize=blocksize, threads=threads))
        log.info("scene %d/%d %s: %d px, cloud %.1f %% (%.1f s)", i + 1, n_scenes, iid, size,
                 items[-1]["properties"]["eo:cloud_cover"], time.monotonic() - t0)
    catalog = {
        "type": "Catalog",
        "stac_version": STAC_VERSION,
        "id": "spectralgpt-synth",
        "title": "Synthetic Sentinel-2 L2A scale-test scenes",
        "description": "Scale-test scenes made by tools.synth from real BigEarthNet-S2 patches. Contains modified Copernicus Sentinel data.",
    }
    collection = {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": EXTENSIONS,
        "id": COLLECTION_ID,
        "title": "Sentinel-2 Collection 1 Level-2A (synthetic scale test)",
        "description": "Earth Search sentinel-2-c1-l2a layout: one COG per band at native resolution, raw DN with the +1000 offset.",
        "license": "other",
        "extent": collection_extent(items),
        "links": [],
    }
    return write_static_catalog(out, catalog, [(collection, items)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (catalog.json goes there)")
    ap.add_argument("--scenes", type=int, default=1, help="number of scenes (default 1)")
    ap.add_argument("--size", type=int, default=FULL_SIZE, help="10 m pixels per side (default 10980, a full tile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocksize", type=int, default=512, help="COG internal tile edge (default 512)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.monotonic()
    path = generate_scenes(args.out, args.scenes, args.size, args.seed, blocksize=args.blocksize)
    log.info("wrote %s in %.1f s", path, time.monotonic() - t0)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
