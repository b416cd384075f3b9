"""``python -m training.predict``: official fine-tuned classifier on .npy or GeoTIFF input.

Expected logits come from the hand-written official forward of
``test_official_finetuned.reference_logits`` (plain tensor ops, not the module under test).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from test_official_finetuned import BANDS, CLASSES, HEADS, IMG, official_state, reference_logits

from spectralgpt.cli import main as cli_main
from training.evaluation import checkpoints
from training.evaluation.readers import EUROSAT_BAND_ORDER, model_bands
from training.models.spectral_mae import build_model
from training.predict import main, tile_offsets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout fine-tuned classifier (joint table, 16 px, 5 classes, 2 heads)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-99.pth"
    torch.save({"model": official_state(seed=3), "epoch": 99}, path)
    return path


def _images(n: int = 4, size: int = IMG, bands: int = BANDS, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, bands, size, size)).astype(np.float32)


def _expected(x: np.ndarray | torch.Tensor) -> np.ndarray:
    t = torch.as_tensor(x)
    return reference_logits(official_state(seed=3), t).numpy()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def test_npy_logits_as_a_subprocess(ckpt: Path, tmp_path: Path) -> None:
    x = _images()
    np.save(tmp_path / "input.npy", x)
    out = tmp_path / "logits.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "training.predict", str(ckpt),
                           str(tmp_path / "input.npy"), "--output", str(out), "--num-heads", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    assert got.shape == (4, CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(x), atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.npy", "logits.npy"]  # no temp left


def test_probabilities_and_multilabel(ckpt: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    x = _images(3)
    np.save(tmp_path / "x.npy", x[0])  # one image [12, H, W] is a batch of one
    np.save(tmp_path / "xs.npy", x)
    logits = torch.from_numpy(_expected(x))
    assert main([str(ckpt), str(tmp_path / "xs.npy"), "-o", str(tmp_path / "p.npy"),
                 "--probabilities", "--num-heads", "2", "--batch-size", "2"]) == 0
    p = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(p, logits.softmax(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert main([str(ckpt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.npy"),
                 "--probabilities", "--multilabel", "--num-heads", "2"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), logits[:1].sigmoid().numpy(), atol=1e-5)


def test_csv_output(ckpt: Path, tmp_path: Path) -> None:
    x = _images(3)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "sub" / "logits.csv"  # the folder is created
    assert cli_main(["predict", str(ckpt), str(tmp_path / "x.npy"), "--output", str(out),
                     "--num-heads", "2"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["index"] + [f"logit_{c}" for c in range(CLASSES)]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(got, _expected(x), atol=1e-4, rtol=0)


def test_npy_normalise_applies_the_checkpoint_normalisation(ckpt: Path, tmp_path: Path) -> None:
    dn = np.random.default_rng(5).integers(1, 4000, size=(2, BANDS, IMG, IMG)).astype(np.float32)
    np.save(tmp_path / "dn.npy", dn)
    assert main([str(ckpt), str(tmp_path / "dn.npy"), "-o", str(tmp_path / "o.npy"),
                 "--normalise", "--num-heads", "2"]) == 0
    norm = checkpoints.resolve_normalisation(checkpoints.load_checkpoint(ckpt, num_heads=HEADS))
    assert norm.mode == "per_image_minmax"
    want = _expected(checkpoints.normalise(torch.from_numpy(dn), norm))
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), want, atol=1e-4, rtol=0)


def _write_tif(path: Path, data: np.ndarray, descriptions: tuple[str, ...] | None = None) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype.name, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)


def test_tile_offsets() -> None:
    assert tile_offsets(32, 32, 16) == [(0, 0), (0, 16), (16, 0), (16, 16)]
    assert tile_offsets(40, 16, 16) == [(0, 0), (16, 0), (24, 0)]  # last row flush with the edge


def test_geotiff_windows_csv(ckpt: Path, tmp_path: Path) -> None:
    dn = np.random.default_rng(7).integers(1, 10000, size=(BANDS, 40, 36)).astype(np.uint16)
    _write_tif(tmp_path / "scene.tif", dn)
    out = tmp_path / "scene.csv"
    assert main([str(ckpt), str(tmp_path / "scene.tif"), "-o", str(out), "--num-heads", "2"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0][:3] == ["window", "row_off", "col_off"]
    offsets = [(int(r[1]), int(r[2])) for r in rows[1:]]
    assert offsets == [(r, c) for r in (0, 16, 24) for c in (0, 16, 20)]
    norm = checkpoints.resolve_normalisation(checkpoints.load_checkpoint(ckpt, num_heads=HEADS))
    windows = torch.stack([torch.from_numpy(dn[:, r:r + IMG, c:c + IMG].astype(np.float32))
                           for r, c in offsets])
    want = _expected(checkpoints.normalise(windows, norm))  # each window on its own
    got = np.array([[float(v) for v in r[3:]] for r in rows[1:]])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # Named bands in another order (EuroSAT-MS: B10 kept, B8A last) give the same result.
    names = list(model_bands())
    full = {b: dn[names.index(b)] for b in names}
    full["B10"] = np.full_like(dn[0], 17)
    eurosat = np.stack([full[b] for b in EUROSAT_BAND_ORDER])
    _write_tif(tmp_path / "eurosat.tif", eurosat, EUROSAT_BAND_ORDER)
    assert main([str(ckpt), str(tmp_path / "eurosat.tif"), "-o", str(tmp_path / "e.npy"),
                 "--num-heads", "2"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("bands_npy", "has 11 bands"),
    ("bands_tif", "has 11 bands and no band names"),
    ("named_missing", "missing band(s) B8A"),
    ("size_npy", "15x15 px"),
    ("size_tif", "smaller than the model's 16x16"),
    ("suffix", "must end in .npy or .csv"),
    ("pretrained", "not a fine-tuned classifier"),
    ("dense", "official dense (UPerNet) checkpoints are not supported yet"),
    ("garbage", "cannot read INPUT"),
])
def test_bad_input_is_one_line_exit_2(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      case: str, message: str) -> None:
    from test_official_finetuned import _dense_state

    checkpoint, source, out = ckpt, tmp_path / "in.npy", tmp_path / "out.npy"
    if case == "missing":
        source = tmp_path / "nope.npy"
    elif case == "bands_npy":
        np.save(source, _images(2, bands=11))
    elif case == "bands_tif":
        source = tmp_path / "in.tif"
        _write_tif(source, np.ones((11, IMG, IMG), np.uint16))
    elif case == "named_missing":
        source = tmp_path / "in.tif"
        names = [b for b in model_bands() if b != "B8A"]
        _write_tif(source, np.ones((11, IMG, IMG), np.uint16), tuple(names))
    elif case == "size_npy":
        np.save(source, _images(2, size=15))
    elif case == "size_tif":
        source = tmp_path / "in.tif"
        _write_tif(source, np.ones((BANDS, 8, 8), np.uint16))
    elif case == "suffix":
        np.save(source, _images(1))
        out = tmp_path / "out.txt"
    elif case == "pretrained":
        np.save(source, _images(1))
        checkpoint = tmp_path / "mae.pth"
        torch.save({"model": build_model("tiny", img_size=IMG).state_dict()}, checkpoint)
    elif case == "dense":
        np.save(source, _images(1))
        checkpoint = tmp_path / "dense.pth"
        torch.save({"model": _dense_state()}, checkpoint)
    elif case == "garbage":
        source.write_bytes(b"not an array")
    rc, err = _run([str(checkpoint), str(source), "--output", str(out), "--num-heads", "2"], capsys)
    assert rc == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bad_input_subprocess_has_no_traceback(ckpt: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", _images(1, bands=11))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "training.predict", str(ckpt),
                           str(tmp_path / "in.npy"), "--output", str(tmp_path / "o.npy"),
                           "--num-heads", "2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "11 bands" in lines[0] and "Traceback" not in proc.stderr
