"""``python -m training.embed``: GeoParquet embeddings of the real sample dataset, search,
resume, several processes, object storage, an area built first, and bad input."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers.eval_fixtures import write_checkpoints
from tests.helpers.paths import REPO
from training import embed as emb
from training.evaluation import checkpoints
from training.evaluation.heads import Encoder

DATASET = "s128_g10m"


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The main job's dataset from the embedded sample catalog, and random-init tiny checkpoints."""
    from pipeline.build_shards import main as build

    root = tmp_path_factory.mktemp("embed")
    assert build(["--aoi", "europe", "--output", str(root / "ds")]) == 0
    return {"root": root, "manifest": root / "ds" / "manifest.json",
            **write_checkpoints(root / "ckpt", img_size=32)}


def _embed(fx: dict[str, Path], out: Path | str, *extra: str, ckpt: str = "safetensors") -> int:
    return emb.main(["--checkpoint", str(fx[ckpt]), "--manifest", str(fx["manifest"]), "--dataset", DATASET,
                     "--output", str(out), *extra])


@pytest.fixture(scope="module")
def one(fx: dict[str, Path]) -> Path:
    out = fx["root"] / "one"
    assert _embed(fx, out) == 0
    return out


def _shard_samples(manifest: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (chip, sample json) read with tarfile, independently of the code under test."""
    man = json.loads(manifest.read_text())
    found = {}
    for split in man["datasets"][DATASET]["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(manifest.parent / shard["path"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
            for name, data in members.items():
                if name.endswith(".npy"):
                    key = name[:-4]
                    found[key] = (np.load(io.BytesIO(data)), json.loads(members[key + ".json"]))
    return found


def _table(out: Path):  # type: ignore[no-untyped-def]
    return pads.dataset(str(out), format="parquet").to_table().sort_by("key")


def _vectors(table) -> np.ndarray:  # type: ignore[no-untyped-def]
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(table), col.type.list_size).astype(np.float32)


def test_every_sample_once_with_values_footprints_and_metadata(fx: dict[str, Path], one: Path) -> None:
    from pyproj import Transformer
    import shapely

    samples = _shard_samples(fx["manifest"])
    table = _table(one)
    keys = table.column("key").to_pylist()
    assert keys == sorted(samples) and len(keys) == len(set(keys)) == 9  # 7 train + 2 val
    man = json.loads(fx["manifest"].read_text())
    splits = table.column("split").to_pylist()
    assert {s: splits.count(s) for s in set(splits)} == \
        {s: v["num_samples"] for s, v in man["datasets"][DATASET]["splits"].items()}

    # the vectors: per-image min-max (the checkpoint's pretraining choice) by hand, the
    # encoder on the whole chip, the mean over every token
    ckpt = checkpoints.load_checkpoint(fx["safetensors"])
    encoder = Encoder(checkpoints.build_mae(ckpt, 128)).eval()
    chips = np.stack([samples[k][0] for k in keys]).astype(np.float32)
    valid = chips != 0
    lo = np.where(valid, chips, np.inf).min(axis=(2, 3), keepdims=True)
    hi = np.where(valid, chips, -np.inf).max(axis=(2, 3), keepdims=True)
    x = np.where(valid, (chips - lo) / (hi - lo + 1e-10), 0.0).astype(np.float32)
    with torch.no_grad():
        want = encoder(torch.from_numpy(x)).mean(dim=(1, 2)).numpy()
    got = _vectors(table)
    assert got.shape == (9, ckpt.config.embed_dim)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))

    # footprints: the chip's centre from its own grid lies inside; the bounds agree with the
    # sample's bbox_lonlat; the bbox columns cover the polygon
    geoms = shapely.from_wkb(table.column("geometry").to_pylist())
    bbox = table.column("bbox").to_pylist()
    for key, g, b in zip(keys, geoms, bbox, strict=True):
        meta = samples[key][1]
        a, _, c, _, e, f = meta["transform"]
        cx, cy = Transformer.from_crs(meta["crs"], "EPSG:4326", always_xy=True).transform(c + a * 64, f + e * 64)
        assert g.contains(shapely.Point(cx, cy)), key
        assert np.allclose(g.bounds, meta["bbox_lonlat"], atol=2e-4), (g.bounds, meta["bbox_lonlat"])
        assert np.allclose([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], g.bounds)
    row = table.slice(0, 1).to_pylist()[0]
    meta = samples[keys[0]][1]
    assert row["tile"] == meta["tile"] and row["scene_ids"] == meta["scene_ids"] and row["gsd"] == meta["gsd"]
    assert row["datetime"].strftime("%Y-%m-%dT%H:%M:%SZ") == meta["datetimes"][0]
    assert row["crs"] == meta["crs"] and row["transform"] == meta["transform"] and row["dataset_version"] == 1
    assert row["quality_nodata"] == meta["quality"]["nodata"] and row["quality_scl"] is meta["quality"]["scl"]

    # file metadata: GeoParquet 1.1 with a bbox covering, and the run's facts
    part = next(one.rglob("*.parquet"))
    kv = pq.read_metadata(part).metadata
    geo = json.loads(kv[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    info = json.loads(kv[b"spectralgpt"])
    import hashlib

    assert info["checkpoint_sha256"] == hashlib.sha256(fx["safetensors"].read_bytes()).hexdigest()
    assert info["pool"] == "mean" and info["normalisation"]["mode"] == "per_image_minmax"
    assert info["model"]["embed_dim"] == ckpt.config.embed_dim and info["model"]["img_size"] == 128
    done = json.loads((one / "_embeddings.json").read_text())
    assert done["rows"] == {"train": 7, "val": 2}


def test_geopandas_reads_it_as_geometries(one: Path) -> None:
    import geopandas as gpd

    frame = gpd.read_parquet(one)
    assert len(frame) == 9 and frame.geometry.geom_type.eq("Polygon").all()
    assert frame.crs is not None and frame.crs.equals("OGC:CRS84")
    assert frame.geometry.is_valid.all()


def test_group_pooling_tokens_and_float16_agree_with_the_mean(fx: dict[str, Path], one: Path) -> None:
    mean = _vectors(_table(one))
    assert _embed(fx, fx["root"] / "groups", "--pool", "groups") == 0
    groups = _vectors(_table(fx["root"] / "groups"))
    d = mean.shape[1]
    assert groups.shape == (9, 4 * d)
    # every group has the same number of tokens, so the mean of the group means is the mean
    assert np.abs(groups.reshape(9, 4, d).mean(axis=1) - mean).max() < 1e-5
    assert _embed(fx, fx["root"] / "f16", "--float16") == 0
    t16 = _table(fx["root"] / "f16")
    assert str(t16.schema.field("embedding").type.value_type) == "halffloat"
    assert np.abs(_vectors(t16) - mean).max() <= 1e-3 * np.abs(mean).max()

    import zarr

    out = fx["root"] / "tokens"
    assert _embed(fx, out, "--pool", "none", "--batch-size", "3") == 0
    table = pads.dataset(str(out), format="parquet").to_table()
    assert "embedding" not in table.schema.names
    for part in out.rglob("*.parquet"):
        info = json.loads(pq.read_metadata(part).metadata[b"spectralgpt"])
        tokens = zarr.open_array(str(out / info["tokens"]["path"]), path="tokens", mode="r")[:]
        keys = pq.read_table(part, columns=["key"]).column("key").to_pylist()
        assert tokens.shape == (len(keys), 4, 16 * 16, d)
        by_key = dict(zip(_table(one).column("key").to_pylist(), mean, strict=True))
        assert np.abs(tokens.mean(axis=(1, 2)) - np.stack([by_key[k] for k in keys])).max() < 1e-5


def test_search_by_key_and_point(fx: dict[str, Path], one: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = _table(one)
    keys = table.column("key").to_pylist()
    vec = _vectors(table)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    query = keys[4]
    sims = unit @ unit[4]
    want = [keys[i] for i in np.argsort(-sims, kind="stable")[:3]]
    assert emb.main(["search", str(one), "--key", query, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = [ln.split("\t") for ln in lines]
    assert [k for k, _ in got] == want and got[0][0] == query and abs(float(got[0][1]) - 1) < 1e-5
    assert np.allclose([float(s) for _, s in got], np.sort(sims)[::-1][:3], atol=1e-5)
    # the approximate index finds the same neighbours on a set this small
    assert [k for k, _ in emb.search(str(one), key=query, k=3, index="hnsw")] == want

    # a point at a chip's centre finds that chip first
    import shapely

    centre = shapely.from_wkb(table.column("geometry")[2].as_py()).centroid
    assert emb.main(["search", str(one), "--point", f"{centre.x},{centre.y}", "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split("\t")[0] == keys[2]


@pytest.mark.parametrize(("argv", "needle"), [
    (["search", "{one}", "--key", "no-such-key"], "is not in"),
    (["search", "{one}", "--point", "abc"], "give LON,LAT"),
    (["search", "{root}/nothing", "--key", "k"], "no finished embeddings"),
])
def test_search_bad_input(fx: dict[str, Path], one: Path, argv: list[str], needle: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(one=one, root=fx["root"]) for a in argv]
    assert emb.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bad_input_one_line_exit_2(fx: dict[str, Path], one: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"\xff\xd8")
    cases = {
        "not empty and holds no embeddings": _embed(fx, foreign),
        "differ from this run in checkpoint_sha256:": _embed(fx, one, ckpt="official"),
        "data set 'nope' not in manifest": emb.main(["--checkpoint", str(fx["safetensors"]), "--manifest",
                                                      str(fx["manifest"]), "--dataset", "nope", "--output",
                                                      str(tmp_path / "x")]),
        "not found": emb.main(["--checkpoint", str(tmp_path / "none.pth"), "--manifest", str(fx["manifest"]),
                               "--dataset", DATASET, "--output", str(tmp_path / "y")]),
        "give --manifest and --dataset, or --aoi": emb.main(["--checkpoint", str(fx["safetensors"]),
                                                             "--output", str(tmp_path / "z")]),
    }
    err = capsys.readouterr().err.strip().splitlines()
    assert list(cases.values()) == [2] * len(cases)
    assert len(err) == len(cases)
    for needle, line in zip(cases, err, strict=True):
        assert needle in line, (needle, line)
    assert sorted(p.name for p in foreign.iterdir()) == ["a.jpg"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_failed_run_keeps_finished_parts_and_resumes(fx: dict[str, Path], one: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A shard that cannot be read (cut in half, for real) stops the run with exit 2 after the
    parts before it were published; no partial part is visible; once the shard is back, the
    same command embeds only what is missing and the result equals an uninterrupted run."""
    ds = tmp_path / "ds"
    shutil.copytree(fx["manifest"].parent, ds)
    man = json.loads((ds / "manifest.json").read_text())
    val = ds / man["datasets"][DATASET]["splits"]["val"]["shards"][0]["path"]
    good = val.read_bytes()
    val.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    argv = ["--checkpoint", str(fx["safetensors"]), "--manifest", str(ds / "manifest.json"), "--dataset",
            DATASET, "--output", str(out), "--workers", "1"]  # a DataLoader worker process reads
    assert emb.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read shard" in err[0] and "Traceback" not in err[0], err
    published = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert published == [f"{DATASET}/train/{Path(s['path']).stem}.parquet"
                         for s in man["datasets"][DATASET]["splits"]["train"]["shards"]]
    assert not (out / "_embeddings.json").exists()
    val.write_bytes(good)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="training.embed")
    assert emb.main(argv) == 0
    assert any("1 part(s) to embed, 1 finished by an earlier run" in r.getMessage() for r in caplog.records)
    a, b = _table(one), _table(out)
    assert a.column("key") == b.column("key") and np.array_equal(_vectors(a), _vectors(b))
    assert not (out / ".partial").exists()


@pytest.mark.slow
def test_two_processes_give_the_same_rows(fx: dict[str, Path], one: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "training.embed", "--checkpoint", str(fx["safetensors"]), "--manifest",
                        str(fx["manifest"]), "--dataset", DATASET, "--output", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1/2: 1 part(s) to embed" in p.stderr
    a, b = _table(one), _table(out)
    assert a.column("key") == b.column("key")
    va, vb = _vectors(a), _vectors(b)
    assert np.abs(va - vb).max() <= 1e-4 * np.abs(va).max()


def test_object_storage_output(fx: dict[str, Path], one: Path) -> None:
    """Parts written to an S3 API (moto on loopback) read back as the local result; search works there."""
    import fsspec

    from tests.helpers.s3 import moto_s3

    with moto_s3("emb"):
        url = "s3://emb/run1"
        assert _embed(fx, url) == 0
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        names = sorted(p for p in fs.find("emb/run1"))
        assert "emb/run1/_embeddings.json" in names and sum(n.endswith(".parquet") for n in names) == 2
        table = pads.dataset([n for n in names if n.endswith(".parquet")], format="parquet",
                             filesystem=fs).to_table().sort_by("key")
        local = _table(one)
        assert table.column("key") == local.column("key") and np.array_equal(_vectors(table), _vectors(local))
        first = local.column("key")[0].as_py()
        assert emb.search(url, key=first, k=1)[0][0] == first


def test_an_area_is_built_then_embedded(fx: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "area"
    assert emb.main(["--checkpoint", str(fx["safetensors"]), "--aoi", "europe", "--chip-size", "128",
                     "--output", str(out)]) == 0
    man = json.loads((out / "_dataset" / "manifest.json").read_text())
    assert list(man["datasets"]) == [DATASET]
    rows = json.loads((out / "_embeddings.json").read_text())["rows"]
    assert rows == {s: v["num_samples"] for s, v in man["datasets"][DATASET]["splits"].items()}


def test_page_of_neighbours_in_headless_chromium(fx: dict[str, Path], one: Path, tmp_path: Path) -> None:
    from tests.pipeline.test_inspect import DevTools, _chromium

    key = _table(one).column("key")[0].as_py()
    page = tmp_path / "page" / "near.html"
    assert emb.main(["search", str(one), "--key", key, "-k", "3", "--html", str(page)]) == 0
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not found and scripts/install_chromium.sh could not install it (needs root + apt)")
    browser = DevTools(exe, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        result = browser.send("Runtime.evaluate", {
            "expression": "JSON.stringify([...document.images].map(i => [i.alt, i.naturalWidth]))",
            "returnByValue": True}, session=session)
    finally:
        browser.close()
    images = json.loads(result["result"]["value"])
    assert len(images) == 4 and images[0][0] == key and images[1][0] == key  # the query, then itself nearest
    assert all(w == 128 for _, w in images)


def test_time_stacks_are_embedded_with_their_dates(fx: dict[str, Path], tmp_path: Path) -> None:
    """A 3-date stack (synthetic scenes of one tile on 3 dates) is one row: all its datetimes,
    and the vector of the encoder on the stack with each date's (year, day of year)."""
    import datetime as dt

    from pipeline.build_shards import main as build
    from tools.synth import generate_scenes

    catalog = generate_scenes(tmp_path / "scenes", 13, 768, 0)
    ds = tmp_path / "ds"
    assert build(["--catalog", str(catalog), "--bbox=26.99,-7.31,27.07,-7.23", "--max-cloud", "100",
                  "--config", "timeseries", "--output", str(ds)]) == 0
    out = tmp_path / "out"
    name = "s96_g10m_t3"
    assert emb.main(["--checkpoint", str(fx["safetensors"]), "--manifest", str(ds / "manifest.json"),
                     "--dataset", name, "--output", str(out)]) == 0
    table = _table(out)
    man = json.loads((ds / "manifest.json").read_text())
    assert len(table) == sum(v["num_samples"] for v in man["datasets"][name]["splits"].values()) > 0
    row = table.slice(0, 1).to_pylist()[0]
    shard = next(ds.glob(f"{name}/*.tar"))
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    chip = np.load(io.BytesIO(members[row["key"] + ".npy"]))
    meta = json.loads(members[row["key"] + ".json"])
    assert chip.shape == (3, 12, 96, 96)
    assert [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in row["datetimes"]] == meta["datetimes"]
    ckpt = checkpoints.load_checkpoint(fx["safetensors"])
    encoder = Encoder(checkpoints.build_mae(ckpt, 96)).eval()
    x = torch.from_numpy(chip.astype(np.float32))
    x = checkpoints.normalise(x, checkpoints.resolve_normalisation(ckpt))
    when = [dt.datetime.fromisoformat(s.replace("Z", "+00:00")) for s in meta["datetimes"]]
    dates = torch.tensor([[[w.year, w.timetuple().tm_yday] for w in when]], dtype=torch.float32)
    with torch.no_grad():
        want = encoder(x[None], dates).mean(dim=(1, 2, 3))[0].numpy()
    got = _vectors(table.slice(0, 1))[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def _variant(fx: dict[str, Path], tmp_path: Path, **model: object) -> Path:
    """The fixture's tiny export with other config values (same weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(fx["safetensors"]), "pt") as f:
        info = json.loads(f.metadata()["spectralgpt"])
    for k, v in model.items():
        if k == "normalisation":
            info["normalisation"] = v
        else:
            info["model"][k] = v
    path = tmp_path / "variant.safetensors"
    save_file(load_file(str(fx["safetensors"])), str(path), metadata={"spectralgpt": json.dumps(info)})
    return path


def test_a_gsd_model_gets_each_samples_gsd_as_in_pretraining(fx: dict[str, Path], tmp_path: Path) -> None:
    """With the GSD encoding on, the vector is the pretraining encoder's (no tokens masked) on
    the sample's own gsd from its JSON, not the reference GSD's."""
    from training.models.spectral_mae import SpectralMAE  # noqa: F401  (the model built below)

    ckpt_path = _variant(fx, tmp_path, gsd_encoding=True)
    out = tmp_path / "gsd"
    assert emb.main(["--checkpoint", str(ckpt_path), "--manifest", str(fx["manifest"]), "--dataset", DATASET,
                     "--output", str(out), "--split", "val"]) == 0
    table = _table(out)
    samples = _shard_samples(fx["manifest"])
    ckpt = checkpoints.load_checkpoint(ckpt_path)
    mae = checkpoints.build_mae(ckpt, 128).eval()
    chips = torch.from_numpy(np.stack([samples[k][0] for k in table.column("key").to_pylist()]).astype(np.float32))
    x = checkpoints.normalise(chips, checkpoints.resolve_normalisation(ckpt))
    gsd = torch.tensor([samples[k][1]["gsd"] for k in table.column("key").to_pylist()])
    assert float(gsd[0]) != ckpt.config.reference_gsd  # the resized 120 -> 128 px chips: 9.375 m
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x[:, None], 0.0, gsd=gsd)  # every token kept (shuffled)
        at_reference = Encoder(mae)(x).mean(dim=(1, 2))
    want = latent.mean(dim=1).numpy()
    got = _vectors(table)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    assert np.abs(got - at_reference.numpy()).max() > 1e-3  # the gsd mattered


def test_dataset_statistics_are_the_embedded_data_sets(fx: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint trained with dataset statistics that it does not carry: the statistics of
    the data set embedded, at the version read (--version 1 given as text, as on the command line)."""
    ckpt_path = _variant(fx, tmp_path, normalisation="dataset_stats")
    out = tmp_path / "stats"
    assert emb.main(["--checkpoint", str(ckpt_path), "--manifest", str(fx["manifest"]), "--dataset", DATASET,
                     "--output", str(out), "--version", "1"]) == 0
    man = json.loads(fx["manifest"].read_text())
    run = json.loads((out / "_run.json").read_text())
    want = man["datasets"][DATASET]["stats"]
    assert run["normalisation"]["mode"] == "dataset_stats"
    assert np.allclose(run["normalisation"]["mean"], want["mean"])
    assert np.allclose(run["normalisation"]["std"], [max(v, 1.0) for v in want["std"]])
    assert not np.allclose(run["normalisation"]["mean"], man["datasets"]["s96_g10m"]["stats"]["mean"])
    assert run["dataset_version"] == 1 and not Path(run["manifest"]).is_absolute()


def test_a_split_name_that_is_a_path_is_refused(fx: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(fx["manifest"].parent, ds)
    man = json.loads((ds / "manifest.json").read_text())
    splits = man["datasets"][DATASET]["splits"]
    splits["../../escaped"] = splits.pop("val")
    (ds / "manifest.json").write_text(json.dumps(man))
    out = tmp_path / "a" / "b"
    assert emb.main(["--checkpoint", str(fx["safetensors"]), "--manifest", str(ds / "manifest.json"),
                     "--dataset", DATASET, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split name" in err[0] and "not a plain name" in err[0]
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.rglob("*.parquet"))


def test_outputs_that_cannot_be_written_are_one_line(fx: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _embed(fx, afile / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to --output" in err[0], err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert emb.main(["--checkpoint", str(fx["safetensors"]), "--aoi", "europe", "--chip-size", "128",
                     "--output", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no embeddings" in err[-1]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing built there


def test_tokens_with_scratch_space_on_another_filesystem(fx: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--pool none stages its zarr stores inside OUT, so a TMPDIR on another filesystem
    (here /dev/shm, a tmpfs) does not turn the final move into a cross-device rename."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    scratch = Path(tempfile.mkdtemp(dir=shm))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    try:
        assert _embed(fx, tmp_path / "tok", "--pool", "none", "--split", "val") == 0
        assert len(list((tmp_path / "tok" / "_tokens").rglob("*.zarr"))) == 1
        assert not (tmp_path / "tok" / ".partial").exists()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_finished_train_run_is_extended_to_every_split(fx: dict[str, Path], one: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "ext"
    assert _embed(fx, out, "--split", "train") == 0
    caplog.set_level(logging.INFO, logger="training.embed")
    assert _embed(fx, out) == 0
    assert any("1 part(s) to embed, 1 finished by an earlier run" in r.getMessage() for r in caplog.records)
    assert _table(out).column("key") == _table(one).column("key")


def test_the_hnsw_index_is_built_once_and_kept(one: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="training.embed")
    one = Path(shutil.copytree(one, tmp_path / "one", ignore=shutil.ignore_patterns("_index")))
    key = _table(one).column("key")[0].as_py()
    first = emb.search(str(one), key=key, k=3, index="hnsw")
    again = emb.search(str(one), key=key, k=3, index="hnsw")
    assert first == again and first[0][0] == key
    assert sum("HNSW index over 9 vectors built" in r.getMessage() for r in caplog.records) == 1
    assert json.loads((one / "_index" / "hnsw.json").read_text())["rows"] == 9


@pytest.mark.slow
def test_one_rank_failing_stops_both_with_its_error(fx: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1's shard cannot be read: both ranks exit non-zero with that one line (rank 0
    names rank 1), never a collective's traceback or a hang."""
    ds = tmp_path / "ds"
    shutil.copytree(fx["manifest"].parent, ds)
    man = json.loads((ds / "manifest.json").read_text())
    val = ds / man["datasets"][DATASET]["splits"]["val"]["shards"][0]["path"]  # part 1: rank 1's
    val.write_bytes(val.read_bytes()[:5000])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "training.embed", "--checkpoint", str(fx["safetensors"]), "--manifest",
                        str(ds / "manifest.json"), "--dataset", DATASET, "--output", str(tmp_path / "out")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    # the two ranks write to one stream: count the messages, not the lines
    assert re.findall(r"error: (rank 1: )?cannot read shard", p.stderr) in (["rank 1: ", ""], ["", "rank 1: "]), \
        p.stderr[-3000:]
    assert "Connection closed by peer" not in p.stderr and "Caught DataError" not in p.stderr
