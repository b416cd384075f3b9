"""``python -m training.evaluate`` end to end on tiny fixtures, checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.eval_fixtures import (write_checkpoints, write_eurosat, write_oscd,
                                         write_segmentation)
from tests.helpers.paths import BIGEARTHNET
from training.evaluate import main
from training.evaluation import checkpoints
from training.evaluation.heads import Classifier, Encoder, param_groups_lrd
from training.models.spectral_mae import build_model, interpolate_spatial_table


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    return {"eurosat": write_eurosat(root / "eurosat"),
            "segmentation": write_segmentation(root / "seg"),
            "change": write_oscd(root / "oscd", size=40),
            "bigearthnet": BIGEARTHNET,
            **write_checkpoints(root / "ckpt", img_size=32)}


def _run(fx: dict[str, Path], tmp_path: Path, task: str, *extra: str,
         ckpt: str = "safetensors") -> dict:
    out = tmp_path / "out"
    rc = main(["--task", task, "--data", str(fx[task]), "--checkpoint", str(fx[ckpt]),
               "--out", str(out), "--device", "cpu", *extra])
    assert rc == 0
    protocol = extra[extra.index("--protocol") + 1] if "--protocol" in extra else "linear"
    assert (out / f"{task}-{protocol}.md").read_text().count("|") > 10
    assert f"| {task} | {protocol} |" in (out / "summary.md").read_text()
    return json.loads((out / f"{task}-{protocol}.json").read_text())


def test_eurosat_linear_probe_learns(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "eurosat", "--batch-size", "8")  # default 100 epochs
    m = result["metrics"]
    assert m["overall_accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert result["split"]["train"] == 24 and result["split"]["test"] == 6
    assert result["normalisation"]["mode"] == "per_image_minmax"
    assert result["checkpoint"]["kind"] == "exported"
    assert result["bands"] == "B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12"


def test_eurosat_knn_and_finetune(fx: dict[str, Path], tmp_path: Path) -> None:
    split = tmp_path / "eurosat-test.txt"
    split.write_text("AnnualCrop/AnnualCrop_1.tif\nForest_1.tif\nRiver_1\n")
    knn = _run(fx, tmp_path, "eurosat", "--protocol", "knn", "--k", "5", "--split-file",
               str(split))
    assert knn["settings"]["k"] == 5
    # the three test images of the split file, one per class: each confusion row holds one
    # image, and the accuracy is the diagonal's share of them
    cm = knn["metrics"]["confusion_matrix"]
    names = list(knn["metrics"]["per_class"])
    rows = {n: sum(r) for n, r in zip(names, cm)}
    assert rows["AnnualCrop"] == rows["Forest"] == rows["River"] == 1 and sum(rows.values()) == 3
    assert knn["metrics"]["overall_accuracy"] == pytest.approx(sum(cm[i][i] for i in range(len(cm))) / 3)
    assert knn["split"] == {"source": "--split-file", "train": 27, "test": 3,
                            "unmatched_test_names": 0}
    ft = _run(fx, tmp_path, "eurosat", "--protocol", "finetune", "--epochs", "1",
              "--batch-size", "12", ckpt="pt")
    assert ft["settings"]["layer_decay"] == 0.75 and len(ft["training"]["loss_per_epoch"]) == 1


def test_bigearthnet_multilabel_on_real_patches(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "bigearthnet", "--epochs", "2", "--label-set", "43",
                  ckpt="official")
    m = result["metrics"]
    assert {"map_macro", "map_micro", "f1_macro", "f1_micro"} <= set(m)
    assert result["checkpoint"]["kind"] == "official"
    assert result["data"]["label_set"] == 43 and len(result["data"]["classes"]) == 43
    assert result["split"]["test"] == 2  # seeded 80/20 of 11, recorded
    assert len(result["split"]["test_ids"]) == 2


def test_segmentation_full_images(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "segmentation", "--epochs", "2", "--batch-size", "8")
    m = result["metrics"]
    assert {"miou", "miou_without_background", "overall_accuracy"} <= set(m)
    cm = torch.tensor(m["confusion_matrix"])
    test_images = result["split"]["test"]
    assert cm.sum() == test_images * 48 * 48 - test_images  # every pixel once, 1 ignored each


def test_change_detection_full_images(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "change", "--epochs", "2", "--protocol", "finetune")
    m = result["metrics"]
    assert result["split"]["source"] == "data set split files"
    assert list(m["per_city"]) == ["lasvegas"]
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == 40 * 40  # one full image, each pixel once
    # the published protocol's crop score beside ours: a 40 px city holds no 128 px crop
    assert m["official_crops"]["crops"] == 0 and m["official_crops"]["protocol"]["stride"] == 63


def test_segmunich_official_layout_through_the_cli(fx: dict[str, Path], tmp_path: Path) -> None:
    from tests.training.test_official_readers import _write_segmunich

    root = tmp_path / "TUM_128"
    _write_segmunich(root)
    result = _run({**fx, "segmunich": root}, tmp_path, "segmunich", "--epochs", "1", "--image-size", "16")
    assert result["split"]["source"] == "data set split files"
    assert result["split"]["test"] == 2 and len(result["metrics"]["iou_per_class"]) == 13


@pytest.mark.parametrize("argv, message", [
    (["--task", "eurosat", "--data", "/nonexistent"], "is not a directory"),
    (["--task", "weather", "--data", "."], "invalid choice"),
    (["--task", "eurosat", "--data", "{change}"], "class folders"),
    (["--task", "segmentation", "--data", "{segmentation}", "--protocol", "knn"], "knn"),
    (["--task", "eurosat", "--data", "{eurosat}", "--checkpoint", "/no/such.pth"], "not found"),
    (["--task", "bigearthnet", "--data", "{missing_band}"], "B8A"),
])
def test_bad_input_one_line_exit_2(fx: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], argv: list[str],
                                   message: str) -> None:
    import shutil

    patch = sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir())[:2]
    for p in patch:
        shutil.copytree(p, tmp_path / "ben" / p.name)
        (tmp_path / "ben" / p.name / f"{p.name}_B8A.tif").unlink()
    paths = {**{k: str(v) for k, v in fx.items()}, "missing_band": str(tmp_path / "ben")}
    argv = [a.format(**paths) for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", str(fx["safetensors"])]
    rc = main([*argv, "--out", str(tmp_path / "o"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_checkpoint_file(fx: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"foo": torch.zeros(2)}}, bad)
    rc = main(["--task", "eurosat", "--data", str(fx["eurosat"]), "--checkpoint", str(bad)])
    assert rc == 2 and "SpectralGPT key layout" in capsys.readouterr().err


# --------------------------------------------------------------------------- model pieces


def test_encoder_is_forward_encoder_without_masking() -> None:
    torch.manual_seed(0)
    mae = build_model("tiny", img_size=32).eval()
    x = torch.randn(2, 12, 32, 32)
    latent, mask, ids_restore = mae.forward_encoder(x.unsqueeze(1), 0.0)
    assert mask.sum() == 0
    unshuffled = torch.gather(latent, 1, ids_restore.unsqueeze(-1).expand_as(latent))
    tokens = Encoder(mae)(x)  # [B, G, L, D]
    torch.testing.assert_close(tokens.reshape(2, -1, 96), unshuffled, rtol=1e-5, atol=1e-5)


def test_position_tables_kept_and_interpolated(fx: dict[str, Path]) -> None:
    ckpt = checkpoints.load_checkpoint(fx["safetensors"])
    mae = checkpoints.build_mae(ckpt, 48)  # checkpoint at 32 px: 4x4 -> 6x6 grid
    assert mae.pos_embed_spatial.shape == (1, 36, 96)
    torch.testing.assert_close(mae.pos_embed_spatial.data,
                               interpolate_spatial_table(ckpt.state["pos_embed_spatial"], 6))
    torch.testing.assert_close(mae.pos_embed_temporal.data, ckpt.state["pos_embed_temporal"])


def test_official_layout_config_is_inferred(fx: dict[str, Path]) -> None:
    ckpt = checkpoints.load_checkpoint(fx["official"])
    exported = checkpoints.load_checkpoint(fx["safetensors"])
    assert ckpt.kind == "official" and ckpt.config == exported.config
    with torch.device("meta"):  # shapes only
        base = build_model("base")
    assert checkpoints.infer_config(base.state_dict()) == base.cfg


def test_layer_decay_groups() -> None:
    model = Classifier(Encoder(build_model("tiny", img_size=32)), 3, probe=False)
    groups = param_groups_lrd(model, 1.0, 0.05, 0.5)
    by_name = {}
    for g in groups:
        for p in g["params"]:
            by_name[id(p)] = g
    named = dict(model.named_parameters())
    assert by_name[id(named["encoder.patch_embed.proj.weight"])]["lr"] == 0.5**3  # depth 2
    assert by_name[id(named["encoder.blocks.0.attn.q.weight"])]["lr"] == 0.5**2
    assert by_name[id(named["encoder.blocks.1.mlp.fc1.weight"])]["lr"] == 0.5
    assert by_name[id(named["head.weight"])]["lr"] == 1.0
    assert by_name[id(named["encoder.pos_embed_spatial"])]["weight_decay"] == 0.0
    assert by_name[id(named["head.weight"])]["weight_decay"] == 0.05


def test_normalisation_from_manifest(fx: dict[str, Path], tmp_path: Path) -> None:
    ckpt = checkpoints.load_checkpoint(fx["safetensors"])
    assert checkpoints.resolve_normalisation(ckpt).mode == "per_image_minmax"
    ckpt.info["normalisation"] = "dataset_stats"
    manifest = tmp_path / "manifest.json"
    bands = "B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12".split()
    manifest.write_text(json.dumps({"bands": bands, "datasets": {"s96": {"stats": {
        "mean": [1000.0] * 12, "std": [0.5] + [500.0] * 11}}}}))
    norm = checkpoints.resolve_normalisation(ckpt, manifest=manifest)
    assert norm.mode == "dataset_stats" and norm.std[0] == 1.0  # floored as in the trainer
    x = torch.full((12, 4, 4), 2000.0)
    assert checkpoints.normalise(x, norm)[1].allclose(torch.tensor(2.0))
    fallback = checkpoints.resolve_normalisation(ckpt)  # stats nowhere to be found
    assert fallback.mode == "per_image_minmax" and "fallback" in fallback.source


@pytest.mark.parametrize("name", ["eurosat_finetune", "bigearthnet_finetune", "segmunich_finetune",
                                  "oscd_finetune"])
def test_shipped_paper_configs_parse_with_their_official_settings(name: str) -> None:
    import yaml

    from training.evaluate import EVAL_CONFIG_DIR, parse_args

    raw = yaml.safe_load((EVAL_CONFIG_DIR / f"{name}.yaml").read_text())
    args = parse_args(["--config", name, "--data", "d", "--checkpoint", "c", "--epochs", "3"], "prog")
    assert args.epochs == 3  # a flag wins over the config
    for key, value in raw.items():
        if key not in ("paper", "epochs"):
            assert getattr(args, key) == value, key
    assert args.paper["value"] > 0 and args.paper["table"] in ("I", "II", "III", "IV")


def test_a_config_run_records_the_paper_figure_and_bad_configs_are_one_line(
        fx: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("task: eurosat\nprotocol: knn\nk: 3\npaper: {metric: overall_accuracy, value: 99.0}\n")
    out = tmp_path / "out"
    assert main(["--config", str(cfg), "--data", str(fx["eurosat"]), "--checkpoint", str(fx["safetensors"]),
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "eurosat-knn.json").read_text())
    assert result["paper"]["value"] == 99.0 and result["config"] == "mine.yaml"
    assert result["settings"]["k"] == 3
    capsys.readouterr()
    for text, needle in (("tasks: eurosat\n", "unknown option 'tasks'"), ("epochs: many\n", "not a valid value"),
                         ("protocol: magic\n", "use one of"), ("- a\n", "expected a mapping")):
        cfg.write_text(text)
        assert main(["--config", str(cfg), "--data", "d", "--checkpoint", "c"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (text, err)
    assert main(["--config", "no_such_config", "--data", "d", "--checkpoint", "c"]) == 2
    assert "shipped: bigearthnet_finetune" in capsys.readouterr().err
