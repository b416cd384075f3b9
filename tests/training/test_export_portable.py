"""``python -m training.export --format onnx|exported-program``: the pooled encoder as a
portable file, its parity with eager PyTorch, the STAC MLM Item beside it, bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.eval_fixtures import write_checkpoints
from training import export as export_mod
from training.evaluation import checkpoints
from training.evaluation.heads import Embedder, Encoder
from training.evaluation.readers import model_bands
from training.export import main

REPO = Path(__file__).resolve().parents[2]
IMG = 32  # the fixture checkpoints' img_size
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoints(tmp_path_factory.mktemp("ckpt"), img_size=IMG)


@pytest.fixture(scope="module")
def onnx_export(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "encoder.onnx"
    assert main([str(ckpts["safetensors"]), "--format", "onnx", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def program_export(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pt2") / "encoder.pt2"
    assert main([str(ckpts["official"]), "--format", "exported-program", "--out", str(out)]) == 0
    return out


def _eager(path: Path, img_size: int = IMG) -> Embedder:
    ckpt = checkpoints.load_checkpoint(path)
    return Embedder(Encoder(checkpoints.build_mae(ckpt, img_size)), pool="mean").eval()


def _batch(n: int, img_size: int = IMG, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # not the exporter's tracing or parity batch
    return torch.randn(n, 12, img_size, img_size, generator=g)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _item(out: Path) -> dict:
    return json.loads(out.with_name(f"{out.stem}.item.json").read_text())


def test_onnx_matches_eager_and_pools_the_mean(onnx_export: Path, ckpts: dict[str, Path]) -> None:
    import onnxruntime as ort

    assert onnx_export.is_file()
    assert not onnx_export.with_name(f"{onnx_export.name}.data").exists()  # tiny: self-contained
    session = ort.InferenceSession(str(onnx_export), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("image", "embedding")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [12, IMG, IMG]  # dynamic batch
    model = _eager(ckpts["safetensors"])
    for n in (3, 1):
        x = _batch(n)
        (got,) = session.run(["embedding"], {"image": x.numpy()})
        got = torch.from_numpy(got)
        with torch.no_grad():
            ref = model(x)
            tokens = model.encoder(x)  # [B, G, L, D]
        assert got.shape == ref.shape == (n, 96)
        assert float((got - ref).abs().max()) <= 1e-4
        by_hand = tokens.reshape(n, -1, tokens.shape[-1]).mean(dim=1)  # mean over all G x L
        assert tokens.shape[1:3] == (4, (IMG // 8) ** 2)
        assert torch.allclose(got, by_hand, atol=1e-4, rtol=0)


def test_exported_program_of_the_official_pth_matches_eager(program_export: Path,
                                                            ckpts: dict[str, Path]) -> None:
    program = torch.export.load(str(program_export)).module()
    model = _eager(ckpts["official"])
    x = _batch(3)
    with torch.no_grad():
        got, ref = program(x), model(x)
    assert got.shape == (3, 96)
    assert float((got - ref).abs().max()) <= 1e-4
    item = _item(program_export)
    assert item["assets"]["model"]["mlm:artifact_type"] == "torch.export.save"
    assert item["properties"]["mlm:framework"] == "PyTorch"
    assert item["properties"]["spectralgpt:checkpoint_sha256"] == _sha256(ckpts["official"])
    assert item["properties"]["spectralgpt:checkpoint"]["kind"] == "official"


def test_mlm_item(onnx_export: Path, ckpts: dict[str, Path]) -> None:
    import pystac

    item = _item(onnx_export)
    assert onnx_export.with_name("encoder.item.json").is_file()
    for key in ("type", "stac_version", "stac_extensions", "id", "geometry", "properties",
                "links", "assets"):
        assert key in item, key
    assert item["type"] == "Feature" and item["geometry"] is None and "bbox" not in item
    assert MLM_SCHEMA in item["stac_extensions"]
    props = item["properties"]
    assert props["datetime"].endswith("Z")
    for key in ("mlm:name", "mlm:architecture", "mlm:tasks", "mlm:framework",
                "mlm:framework_version", "mlm:input", "mlm:output", "mlm:total_parameters",
                "mlm:pretrained", "mlm:accelerator"):
        assert key in props, key
    assert props["mlm:accelerator"] == "amd64"
    # the fixture is a random init (global_step 0): MLM wants an explicit null source then
    assert props["mlm:pretrained"] is False and props["mlm:pretrained_source"] is None
    assert props["mlm:framework"] == "ONNX"
    (inp,) = props["mlm:input"]
    assert inp["bands"] == list(model_bands()) and len(inp["bands"]) == 12
    assert inp["input"] == {"shape": [-1, 12, IMG, IMG], "data_type": "float32",
                            "dim_order": ["batch", "bands", "height", "width"]}
    # the fixture was pretrained with per-image min-max: no statistics to scale with
    assert inp["value_scaling"] is None
    assert inp["pre_processing_function"]["format"] == "python"
    assert props["spectralgpt:normalisation"]["mode"] == "per_image_minmax"
    (out,) = props["mlm:output"]
    assert out["result"] == {"shape": [-1, 96], "dim_order": ["batch", "embedding"],
                             "data_type": "float32"}
    assert props["mlm:total_parameters"] == sum(
        p.numel() for p in _eager(ckpts["safetensors"]).parameters())
    assert [b["name"] for b in props["bands"]] == list(model_bands())  # STAC 1.1 bands
    assert props["spectralgpt:checkpoint_sha256"] == _sha256(ckpts["safetensors"])
    assert props["spectralgpt:parity"]["max_abs_diff"] <= 1e-4
    asset = item["assets"]["model"]
    assert asset["href"] == "encoder.onnx"  # relative, beside the Item
    assert asset["roles"] == ["mlm:model"] and asset["mlm:artifact_type"] == "onnx"
    assert asset["type"] == "application/octet-stream; application=onnx"
    assert asset["file:checksum"] == "1220" + _sha256(onnx_export)
    assert asset["file:size"] == onnx_export.stat().st_size
    parsed = pystac.Item.from_dict(item)
    assert parsed.id == "encoder" and parsed.geometry is None and parsed.bbox is None


def test_dataset_stats_and_img_size(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint pretrained with dataset statistics: z-score value scaling in DN, one
    entry per band; ``--img-size`` changes the fixed input side."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(ckpts["safetensors"]), "pt") as f:
        info = json.loads(f.metadata()["spectralgpt"])
    mean = [1000.0 + 100 * i for i in range(12)]
    std = [500.0 + 10 * i for i in range(12)]
    info.update(normalisation="dataset_stats", stats={"mean": mean, "std": std})
    src = tmp_path / "stats.safetensors"
    save_file(load_file(str(ckpts["safetensors"])), str(src),
              metadata={"spectralgpt": json.dumps(info)})
    out = tmp_path / "out" / "enc48.pt2"
    assert main([str(src), "--format", "exported-program", "--output", str(out),
                 "--img-size", "48"]) == 0
    (inp,) = _item(out)["properties"]["mlm:input"]
    assert inp["input"]["shape"] == [-1, 12, 48, 48]
    assert inp["value_scaling"] == [{"type": "z-score", "mean": m, "stddev": s}
                                    for m, s in zip(mean, std)]
    assert inp["pre_processing_function"] is None
    x = _batch(2, 48)
    with torch.no_grad():
        got, ref = torch.export.load(str(out)).module()(x), _eager(src, 48)(x)
    assert float((got - ref).abs().max()) <= 1e-4


def test_checkpoint_sha256_of_a_folder_hashes_the_weights(ckpts: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """DeepSpeed folders: sha256 of the consolidated weights in sorted key order, so the
    order of the state dict does not matter and any weight change does."""
    ckpt = checkpoints.load_checkpoint(ckpts["safetensors"])
    ckpt.path, ckpt.kind = tmp_path, "deepspeed"
    first = export_mod.checkpoint_sha256(ckpt)
    ckpt.state = dict(reversed(list(ckpt.state.items())))
    assert export_mod.checkpoint_sha256(ckpt) == first
    key = sorted(ckpt.state)[0]
    expected = hashlib.sha256()
    for k in sorted(ckpt.state):
        t = ckpt.state[k].contiguous()
        expected.update(k.encode() + b"\0" + f"{str(t.dtype)[6:]}:{'x'.join(map(str, t.shape))}"
                        .encode() + b"\0" + t.numpy().tobytes())
    assert first == expected.hexdigest()
    ckpt.state[key] = ckpt.state[key] + 1
    assert export_mod.checkpoint_sha256(ckpt) != first


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training.export", *args],
                          capture_output=True, text=True, cwd=REPO)


def test_missing_checkpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path / "nope.safetensors"), "--format", "onnx",
                "--output", str(tmp_path / "x.onnx"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0], proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_format_is_an_argparse_error(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path), "--format", "tflite")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_img_size_is_refused(ckpts: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.onnx"
    assert main([str(ckpts["safetensors"]), "--format", "onnx", "--output", str(out),
                 "--img-size", "30"]) == 2
    assert "patch size 8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_failed_parity_publishes_nothing(fmt: str, ckpts: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    real = export_mod._eager_embedding
    monkeypatch.setattr(export_mod, "_eager_embedding", lambda m, x: real(m, x) + 1e-3)
    out = tmp_path / "out" / ("enc.onnx" if fmt == "onnx" else "enc.pt2")
    rc = main([str(ckpts["safetensors"]), "--format", fmt, "--output", str(out)])
    assert rc == export_mod.ParityError.exit_code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "differs from eager PyTorch" in errors[0]
    assert list(out.parent.iterdir()) == []  # no file, no Item, no temporary folder


def test_large_onnx_weights_go_to_a_data_file_beside_it(ckpts: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights above ONNX_INLINE_LIMIT (the huge preset) go to ``<out>.data``, named in the
    Item; the pair is published together and runs from its final folder."""
    import onnxruntime as ort

    monkeypatch.setattr(export_mod, "ONNX_INLINE_LIMIT", 0)
    out = tmp_path / "big.onnx"
    assert main([str(ckpts["safetensors"]), "--format", "onnx", "--output", str(out)]) == 0
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and out.stat().st_size < data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.item.json", "big.onnx",
                                                          "big.onnx.data"]
    assert _item(out)["assets"]["model_data"]["href"] == "big.onnx.data"
    x = _batch(2)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["embedding"], {"image": x.numpy()})
    with torch.no_grad():
        ref = _eager(ckpts["safetensors"])(x)
    assert float((torch.from_numpy(got) - ref).abs().max()) <= 1e-4


def test_an_output_that_is_a_folder_or_under_a_file_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers.eval_fixtures import write_checkpoints
    from tests.helpers.paths import REPO

    ckpt = write_checkpoints(tmp_path / "ckpt", img_size=32)["safetensors"]
    (tmp_path / "afile").write_text("x")
    for out, needle in ((tmp_path, "is a folder"), (tmp_path / "afile" / "enc.pt2", "cannot write --output")):
        p = subprocess.run([sys.executable, "-m", "training.export", str(ckpt), "--format", "exported-program",
                            "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
        assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert not list(tmp_path.glob("*.item.json"))
