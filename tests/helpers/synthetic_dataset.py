"""A small, seeded dataset in exactly the `spectralgpt-shards/1` format (docs/DATASET_FORMAT.md).

Tests of readers and reports use it so that they do not depend on the pipeline. Pixels are
linear mixtures of four endmember spectra (vegetation, bare soil, water, cloud) with smooth
random abundance fields, so composites and histograms look like Sentinel-2 L2A rather than
noise. Statistics in the manifest are computed from the written train pixels.

    from tests.helpers.synthetic_dataset import write_synthetic_dataset
    manifest = write_synthetic_dataset(tmp_path / "ds", seed=0)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "spectralgpt-shards/1"
BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
PERCENTILES = (1, 2, 50, 98, 99)

# Endmember surface reflectance per band (B01 ... B12), rounded from typical S2 L2A spectra.
ENDMEMBERS = np.array(
    [
        [0.030, 0.040, 0.070, 0.040, 0.100, 0.300, 0.380, 0.420, 0.440, 0.450, 0.220, 0.100],  # vegetation
        [0.080, 0.100, 0.140, 0.180, 0.210, 0.240, 0.260, 0.280, 0.290, 0.300, 0.360, 0.320],  # bare soil
        [0.060, 0.060, 0.050, 0.030, 0.020, 0.015, 0.012, 0.010, 0.010, 0.008, 0.005, 0.003],  # water
        [0.550, 0.560, 0.560, 0.570, 0.570, 0.580, 0.580, 0.580, 0.580, 0.500, 0.420, 0.350],  # cloud
    ],
    dtype=np.float64,
)

# Scenes spread across Europe: (tile, date, lon, lat, processing baseline, has SCL).
SCENES = [
    ("29UPU", "2017-06-17", -7.2, 52.6, "02.05", True),   # Ireland
    ("31UDQ", "2018-07-04", 2.4, 48.9, "02.06", True),    # Paris basin
    ("33UUU", "2021-05-12", 13.4, 52.5, "03.00", True),   # Brandenburg
    ("35VLG", "2022-08-01", 25.0, 61.2, "04.00", True),   # southern Finland
    ("30SVG", "2023-04-20", -3.7, 40.4, "05.09", False),  # Madrid, no SCL asset
    ("34TDT", "2024-06-02", 20.4, 44.8, "05.10", True),   # Serbia
]


def _scene_id(tile: str, date: str, pb: str) -> str:
    d = date.replace("-", "")
    return f"S2A_MSIL2A_{d}T110621_N{pb.replace('.', '')}_R094_T{tile}_{d}T120000"


def _rule(pb: str) -> tuple[str, int]:
    return ("pb>=04.00:dn-1000", 1000) if pb >= "04.00" else ("pb<04.00:none", 0)


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """Smooth random field in [0, 1], [size, size]: bilinear upsampling of a coarse grid."""
    coarse = rng.random((cells + 1, cells + 1))
    x = np.linspace(0, cells, size)
    i = np.minimum(x.astype(int), cells - 1)
    f = x - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _chip(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, float]]:
    """One synthetic chip [12, size, size] uint16 and its quality fractions."""
    veg, soil, water = (_smooth_field(rng, size) ** 2 for _ in range(3))
    water = np.where(water > 0.5, water * 3, 0.0)
    cloud_amount = rng.choice([0.0] * 8 + [0.15, 0.35])
    cloud = np.zeros((size, size))
    if cloud_amount:
        cloud = np.clip(_smooth_field(rng, size, 3) - (1 - cloud_amount), 0, None) * 4
    total = veg + soil + water + 1e-6
    ab = np.stack([veg / total, soil / total, water / total])  # [3, H, W]
    refl = np.einsum("khw,kc->chw", ab, ENDMEMBERS[:3])
    c = np.clip(cloud, 0, 1)[None]
    refl = refl * (1 - c) + ENDMEMBERS[3][:, None, None] * c
    refl *= rng.uniform(0.85, 1.15)  # illumination
    refl += rng.normal(0, 0.004, refl.shape)
    dn = np.clip(np.round(refl * 10000), 1, 65535).astype(np.uint16)
    nodata = np.zeros((size, size), bool)
    if rng.random() < 0.2:  # a scene edge: a band of nodata along one side
        w = int(rng.integers(size // 8, size // 3))
        nodata[:, :w] = True
        dn[:, nodata] = 0
    n = float(size * size)
    frac = {
        "nodata": round(float(nodata.sum()) / n, 6),
        "invalid": round(float(nodata.sum()) / n, 6),
        "cloud": round(float(((cloud > 0.5) & ~nodata).sum()) / n, 6),
        "shadow": round(float(rng.choice([0.0, 0.0, 0.01, 0.04])), 6),
        "cirrus": round(float(((cloud > 0.1) & (cloud <= 0.5) & ~nodata).sum()) / n, 6),
        "snow": 0.0,
    }
    return dn, frac


def _bbox(lon0: float, lat0: float, row: int, col: int, size: int, gsd: float) -> list[float]:
    """Chip bbox [w, s, e, n] in degrees from pixel offsets east/south of a scene origin."""
    m_per_deg_lat = 111_320.0
    m_per_deg_lon = m_per_deg_lat * math.cos(math.radians(lat0))
    w = lon0 + col * gsd / m_per_deg_lon
    n = lat0 - row * gsd / m_per_deg_lat
    e = w + size * gsd / m_per_deg_lon
    s = n - size * gsd / m_per_deg_lat
    return [round(w, 7), round(s, 7), round(e, 7), round(n, 7)]


def _stats(train: list[np.ndarray]) -> dict[str, Any] | None:
    """Per-band stats of valid (!= 0) train pixels in stored units, as the manifest holds them."""
    if not train:
        return None
    per_band = [np.concatenate([a[..., b, :, :][a[..., b, :, :] > 0].ravel() for a in train]) for b in range(len(BANDS))]
    out: dict[str, Any] = {
        "count": [int(v.size) for v in per_band],
        "mean": [round(float(v.mean()), 4) for v in per_band],
        "std": [round(float(v.std()), 4) for v in per_band],
        "min": [int(v.min()) for v in per_band],
        "max": [int(v.max()) for v in per_band],
        "percentiles": {f"p{p}": [int(np.percentile(v, p, method="inverted_cdf")) for v in per_band] for p in PERCENTILES},
        "units": "harmonised DN (reflectance = value * 1e-4); valid pixels of the train split",
    }
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_synthetic_dataset(
    root: Path,
    *,
    seed: int = 0,
    datasets: tuple[tuple[str, int, int], ...] = (("s96_g10m", 96, 1), ("s128_g10m", 128, 1)),
    samples: dict[str, int] | None = None,
    shard_samples: int = 10,
    aoi: str | None = "europe",
) -> dict[str, Any]:
    """Write a dataset directory (shards + manifest.json) under `root`; return the manifest.

    Args:
        root: output directory (created).
        seed: everything (pixels, keys, splits, footprints) follows from it.
        datasets: (name, chip size px, time steps) per dataset; time steps > 1 gives TCHW chips.
        samples: chips per split and dataset, default {"train": 14, "val": 6}.
        shard_samples: samples per shard before a new shard is opened.
        aoi: `config.aoi` of the manifest (None writes a `config.bbox` instead).
    """
    rng = np.random.default_rng(seed)
    samples = samples or {"train": 14, "val": 6}
    root.mkdir(parents=True, exist_ok=True)
    # the last scene was found but rejected (too cloudy); the others are used
    used = SCENES[:-1]
    out_datasets: dict[str, Any] = {}
    chips_summary: dict[str, dict[str, int]] = {}
    total_bytes = 0
    for name, size, t_steps in datasets:
        (root / name).mkdir(exist_ok=True)
        splits: dict[str, Any] = {}
        train_arrays: list[np.ndarray] = []
        for split, n in samples.items():
            shards: list[dict[str, Any]] = []
            for first in range(0, n, shard_samples):
                rel = f"{name}/{split}-{len(shards):06d}.tar"
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
                    count = min(shard_samples, n - first)
                    for i in range(first, first + count):
                        sc = [used[(i + k) % len(used)] for k in range(t_steps)] if t_steps > 1 else [used[i % len(used)]]
                        tile, date, lon0, lat0, pb, has_scl = sc[0]
                        # chips of one scene form a grid, 4 wide; val chips sit in a block of rows
                        # below the train block (a spatial split)
                        j = i // len(used)
                        row = (j // 4 + (4 if split == "val" else 0)) * size
                        col = (j % 4) * size
                        frames = [_chip(rng, size) for _ in range(t_steps)]
                        data = frames[0][0] if t_steps == 1 else np.stack([f[0] for f in frames])
                        frac = {k: max(f[1][k] for f in frames) for k in frames[0][1]}
                        ids = [_scene_id(s[0], s[1], s[4]) for s in sc]
                        key = (
                            f"{tile}_{date.replace('-', '')}_{hashlib.sha256('|'.join(ids).encode()).hexdigest()[:8]}"
                            f"_{name}_{row:05d}_{col:05d}"
                        )
                        scl = all(s[5] for s in sc)
                        quality: dict[str, Any] = {"nodata": frac["nodata"], "invalid": frac["invalid"], "scl": scl}
                        for k in ("cloud", "shadow", "cirrus", "snow"):
                            quality[k] = frac[k] if scl else None
                        meta = {
                            "key": key, "dataset": name, "split": split, "bands": BANDS, "dtype": "uint16",
                            "layout": "CHW" if t_steps == 1 else "TCHW", "shape": list(data.shape),
                            "value_scale": 0.0001, "nodata": 0, "scene_ids": ids,
                            "datetimes": [f"{s[1]}T11:06:21Z" for s in sc], "tile": tile,
                            "crs": "EPSG:32629",
                            "transform": [10.0, 0.0, 600000.0 + col * 10, 0.0, -10.0, 5800000.0 - row * 10],
                            "gsd": 10.0, "bbox_lonlat": _bbox(lon0, lat0, row, col, size, 10.0),
                            "pixel_offset": [row, col],
                            "harmonisation": [
                                {"scene_id": sid, "processing_baseline": s[4], "rule": _rule(s[4])[0],
                                 "offset_dn_removed": _rule(s[4])[1]} for sid, s in zip(ids, sc)
                            ],
                            "resampling": {"20m": "bilinear", "60m": "bilinear"},
                            "small_scene_rule": "none", "quality": quality,
                            "source": {"catalog": "sample", "collection": "sentinel-2-l2a"},
                        }
                        npy = io.BytesIO()
                        np.save(npy, data, allow_pickle=False)
                        _add(tar, f"{key}.npy", npy.getvalue())
                        _add(tar, f"{key}.json", json.dumps(meta).encode())
                        if split == "train":
                            train_arrays.append(data)
                blob = buf.getvalue()
                (root / rel).write_bytes(blob)
                total_bytes += len(blob)
                shards.append({"path": rel, "num_samples": count, "bytes": len(blob),
                               "sha256": hashlib.sha256(blob).hexdigest()})
            splits[split] = {"num_samples": n, "shards": shards}
        shape = [12, size, size] if t_steps == 1 else [t_steps, 12, size, size]
        out_datasets[name] = {
            "chip_size": size, "gsd": 10.0, "time_steps": t_steps, "overlap": 0,
            "layout": "CHW" if t_steps == 1 else "TCHW", "shape": shape, "splits": splits,
            "stats": _stats(train_arrays),
            "dropped": {"cloud fraction above quality.max_cloud": 3, "invalid/nodata fraction above quality.max_invalid": 1},
        }
        chips_summary[name] = {s: splits[s]["num_samples"] for s in splits}
    items = [
        {
            "id": _scene_id(tile, date, pb), "collection": "sentinel-2-l2a", "datetime": f"{date}T11:06:21Z",
            "tile": tile, "crs": "EPSG:32600", "processing_baseline": pb, "rule": _rule(pb)[0], "scl": scl,
            "used": (tile, date, lon, lat, pb, scl) in used,
            "grid": f"{tile}_grid" if (tile, date, lon, lat, pb, scl) in used else None,
        }
        for tile, date, lon, lat, pb, scl in SCENES
    ]
    config = {
        "aoi": aoi, "bbox": None if aoi else [-10.0, 36.0, 30.0, 62.0], "catalog": None, "collection": None,
        "start": None, "end": None, "max_cloud": 30.0, "max_items": 1000, "output": str(root),
        "tiling": [{"size": s, "gsd": 10.0, "time_steps": t, "overlap": 0} for _, s, t in datasets],
    }
    manifest = {
        "format": FORMAT,
        "software_version": "0.1.0",
        "created": "2026-11-24T19:00:00Z",
        "config": config,
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "scenes_hash": hashlib.sha256(json.dumps(items).encode()).hexdigest(),
        "bands": BANDS, "dtype": "uint16", "value_scale": 0.0001, "nodata": 0,
        "source": {"catalog": "sample", "collection": "sentinel-2-l2a"},
        "datasets": out_datasets,
        "scenes": {"found": len(SCENES) + 2, "used": len(used),
                   "rejected": {"scene cloud cover above max_cloud": 1, "not L2A (L1C product)": 2}},
        "items": items,
        "summary": {"chips": chips_summary, "bytes": total_bytes, "seconds": 1.5},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
