"""The official fine-tuning recipe options of ``python -m training.evaluate`` (issue 17):
drop-path, Mixup/CutMix, label smoothing, random erasing, random-resized crops, best-epoch
selection on a validation split, and the position tables' LR under layer-wise decay.

Each option is checked to change training as documented in ``training/evaluation/tasks.py``
and to be off by default. Tiny model (depth 2, 32 px) and tiny EuroSAT fixture: CPU seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.eval_fixtures import write_checkpoints, write_eurosat
from tests.helpers.paths import BIGEARTHNET
from training.evaluate import build_parser, main
from training.evaluation import checkpoints, readers, tasks
from training.evaluation.heads import Classifier, Encoder, param_groups_lrd
from training.models.spectral_mae import Block, build_model, set_drop_path


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    return {"eurosat": write_eurosat(root / "eurosat"), "bigearthnet": BIGEARTHNET,
            **write_checkpoints(root / "ckpt", img_size=32)}


def _settings(**kw: Any) -> tasks.TrainSettings:
    base: dict[str, Any] = dict(epochs=1, batch_size=8, lr=1e-4, weight_decay=0.05,
                                layer_decay=0.75, warmup_epochs=0.0, seed=0,
                                device=torch.device("cpu"))
    return tasks.TrainSettings(**{**base, **kw})


def _run(fx: dict[str, Path], tmp_path: Path, *extra: str, task: str = "eurosat") -> dict:
    out = tmp_path / "out"
    rc = main(["--task", task, "--data", str(fx[task]), "--checkpoint", str(fx["safetensors"]),
               "--out", str(out), "--device", "cpu", "--protocol", "finetune", *extra])
    assert rc == 0
    return json.loads((out / f"{task}-finetune.json").read_text())


# --------------------------------------------------------------------------- defaults


def test_every_option_is_off_by_default() -> None:
    args = build_parser().parse_args(["--task", "eurosat", "--data", "d", "--checkpoint", "c"])
    assert (args.drop_path, args.mixup, args.cutmix, args.smoothing, args.reprob) == (0, 0, 0, 0, 0)
    assert not args.rrc and args.select == "last" and args.val_file is None
    assert args.pos_lr == "official"  # the official lr_decay.py (see test_pos_lr_...)
    s = _settings()
    assert (s.drop_path, s.mixup, s.cutmix, s.smoothing, s.reprob, s.rrc, s.selection,
            s.pos_lr) == (0, 0, 0, 0, 0, False, "last", "official")
    model = build_model("tiny", img_size=32)  # pretraining: no drop-path anywhere
    assert all(b.drop_path == 0 for b in [*model.blocks, *model.decoder_blocks])


def test_recipe_options_refused_where_they_would_be_ignored(fx: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    base = ["--data", str(fx["eurosat"]), "--checkpoint", str(fx["safetensors"]), "--out",
            str(tmp_path)]
    assert main(["--task", "eurosat", *base, "--mixup", "0.8"]) == 2  # linear probe
    assert "--protocol finetune" in capsys.readouterr().err
    assert main(["--task", "segmentation", *base, "--protocol", "finetune", "--rrc"]) == 2
    assert "classification fine-tuning" in capsys.readouterr().err
    assert main(["--task", "eurosat", *base, "--protocol", "finetune", "--drop-path", "1"]) == 2
    assert main(["--task", "eurosat", *base, "--protocol", "finetune", "--smoothing", "-0.1"]) == 2
    assert main(["--task", "eurosat", *base, "--protocol", "finetune", "--select", "best-val",
                 "--val-fraction", "1.5"]) == 2


# --------------------------------------------------------------------------- drop-path


def test_drop_path_rates_and_modes() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", img_size=32, depth=5)
    keys = list(model.state_dict())
    rates = set_drop_path(model.blocks, 0.1)
    assert rates == pytest.approx(np.linspace(0, 0.1, 5).tolist())
    assert [b.drop_path for b in model.blocks] == rates
    assert list(model.state_dict()) == keys  # no new keys: official files still load strictly

    plain = Block(96, 4, 4.0)
    dropped = Block(96, 4, 4.0, drop_path=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(64, 10, 96)
    plain.eval()
    dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))  # eval: identity, nothing drawn
    plain.train()
    dropped.train()
    torch.testing.assert_close(plain(x), plain(x))  # rate 0 in train mode: deterministic
    a, b = dropped(x), dropped(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(x))
    # per sample, each branch is either dropped or kept and scaled by 1 / keep: every output
    # is one of the four combinations, and with rate 0.5 several occur in a batch
    with torch.no_grad():
        combos = []
        for m1 in (0, 1):
            x1 = x + m1 * dropped.attn(dropped.norm1(x)) / 0.5
            for m2 in (0, 1):
                combos.append(x1 + m2 * dropped.mlp(dropped.norm2(x1)) / 0.5)
        match = torch.stack([torch.isclose(a, c, atol=1e-4).flatten(1).all(1) for c in combos])
    assert match.any(0).all() and (match.sum(1) > 0).sum() >= 3


def test_finetune_sets_drop_path_and_records_it(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "--epochs", "1", "--batch-size", "12", "--drop-path", "0.1")
    assert result["training"]["drop_path_rates"] == pytest.approx([0.0, 0.1])
    assert result["settings"]["drop_path"] == 0.1
    assert result["selection"] == "last" and result["selected_epoch"] == 1


# --------------------------------------------------------------------------- mixing, smoothing


def _constant_batch(n: int = 8, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 2, 16, 16]`` of constant value i + 1 with label i % c."""
    values = torch.arange(1, n + 1, dtype=torch.float32)
    x = values.view(-1, 1, 1, 1).expand(n, 2, 16, 16).clone()
    return x, torch.arange(n) % c


def test_mixup_targets_follow_the_mixed_images() -> None:
    x, y = _constant_batch()
    target = tasks.soft_targets(y, 5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mixed, t, mix = tasks.mix_batch(x, target, 0.8, 0.0, rng)
        assert mix.mode == "mixup"
        v, partner = x[:, 0, 0, 0], x.flip(0)[:, 0, 0, 0]
        for i in range(len(x)):
            if v[i] == partner[i]:
                continue
            # constant images: the mixed value gives lam back
            lam = float((mixed[i, 0, 0, 0] - partner[i]) / (v[i] - partner[i]))
            assert lam == pytest.approx(mix.lam, abs=1e-5)
            assert torch.allclose(mixed[i], torch.full_like(mixed[i], float(mixed[i, 0, 0, 0])))
            torch.testing.assert_close(t[i], lam * target[i] + (1 - lam) * target.flip(0)[i],
                                       atol=1e-5, rtol=0)
        assert torch.allclose(t.sum(1), torch.ones(len(x)))


def test_cutmix_box_area_matches_lambda() -> None:
    x, y = _constant_batch()
    target = tasks.soft_targets(y, 5, smoothing=0.1)
    rng = np.random.default_rng(1)
    for _ in range(30):
        mixed, t, mix = tasks.mix_batch(x, target, 0.0, 1.0, rng)
        assert mix.mode == "cutmix" and mix.box is not None
        y0, y1, x0, x1 = mix.box
        assert mix.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
        for i in range(len(x)):
            pasted = (mixed[i] == x.flip(0)[i, 0, 0, 0]).float().mean().item()
            # the fraction of pixels taken from the partner image is 1 - lam, all in the box
            assert pasted == pytest.approx(1 - mix.lam)
            assert (mixed[i, :, y0:y1, x0:x1] == x.flip(0)[i, 0, 0, 0]).all()
            torch.testing.assert_close(
                t[i], mix.lam * target[i] + (1 - mix.lam) * target.flip(0)[i])


def test_mixup_cutmix_switch_half_and_half() -> None:
    x, y = _constant_batch()
    target = tasks.soft_targets(y, 5)
    rng = np.random.default_rng(2)
    modes = [tasks.mix_batch(x, target, 0.8, 1.0, rng)[2].mode for _ in range(400)]
    assert 0.42 < modes.count("cutmix") / len(modes) < 0.58


def test_label_smoothing_targets() -> None:
    y = torch.tensor([0, 3, 9])
    t = tasks.soft_targets(y, 10, smoothing=0.1)
    assert t[torch.arange(3), y].tolist() == pytest.approx([1 - 0.1 + 0.01] * 3)
    off = t.clone()
    off[torch.arange(3), y] = 0
    assert off.sum().item() == pytest.approx(0.01 * 27)
    assert ((off == 0) | (off - 0.01).abs().lt(1e-7)).all()
    logits = torch.randn(3, 10)
    # the same as PyTorch's label-smoothed cross-entropy
    torch.testing.assert_close(tasks.soft_cross_entropy(logits, t),
                               F.cross_entropy(logits, y, label_smoothing=0.1))


def test_mixing_and_smoothing_skipped_for_multilabel(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "--epochs", "1", "--mixup", "0.8", "--cutmix", "1.0",
                  "--smoothing", "0.1", task="bigearthnet")
    assert result["training"]["skipped_for_multilabel"] == ["mixup", "cutmix", "smoothing"]
    assert "mixed_batches" not in result["training"]


# --------------------------------------------------------------------------- random erasing


def test_random_erasing_rate_and_boxes() -> None:
    x = torch.zeros(4000, 2, 20, 24)
    gen = torch.Generator().manual_seed(0)
    out, boxes = tasks.random_erase(x, 0.25, gen)
    erased = [b is not None for b in boxes]
    assert abs(sum(erased) / len(boxes) - 0.25) < 0.03  # sd ~0.007
    area = 20 * 24
    changed = out.ne(0)
    for i, box in enumerate(boxes):
        if box is None:
            assert not changed[i].any()
            continue
        top, left, h, w = box
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 24
        assert h < 20 and w < 24
        # timm's area and aspect ranges, up to the rounding of h and w to whole pixels
        assert 0.02 * area * 0.5 <= h * w <= area / 3 * 1.3
        assert 0.3 / 1.6 <= h / w <= 1.6 / 0.3
        inside = torch.zeros(20, 24, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert changed[i][:, inside].all() and not changed[i][:, ~inside].any()  # every band
    assert not tasks.random_erase(x[:50], 0.0, gen)[0].ne(0).any()


def test_random_erasing_values_are_standard_normal() -> None:
    gen = torch.Generator().manual_seed(1)
    out, _ = tasks.random_erase(torch.zeros(500, 3, 32, 32), 1.0, gen)
    values = out[out != 0]
    assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 1) < 0.02


# --------------------------------------------------------------------------- random-resized crop


def test_random_resized_crop_size_and_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(12, 64, 64)
    out = tasks.random_resized_crop(img, 128, gen)
    assert out.shape == (12, 128, 128) and out.dtype == img.dtype
    fractions, aspects = [], []
    for _ in range(2000):
        top, left, h, w = tasks.rrc_box(64, 64, gen)
        assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
        fractions.append(h * w / 64**2)
        aspects.append(w / h)
    # official scale (0.2, 1.0) and torchvision ratio (3/4, 4/3), up to pixel rounding
    assert min(fractions) >= 0.2 - 0.02 and max(fractions) <= 1.0
    assert min(fractions) < 0.25 and max(fractions) > 0.9  # the whole range is used
    assert min(aspects) >= 0.75 - 0.05 and max(aspects) <= 4 / 3 + 0.05
    # the output is that box of every band, resized bicubically
    state = gen.get_state()
    top, left, h, w = tasks.rrc_box(64, 64, gen)
    gen.set_state(state)
    expected = F.interpolate(img[None, :, top:top + h, left:left + w], size=(128, 128),
                             mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(tasks.random_resized_crop(img, 128, gen), expected)


def test_rrc_in_the_training_loader(fx: dict[str, Path]) -> None:
    data = readers.read_eurosat(fx["eurosat"])
    norm = checkpoints.resolve_normalisation(checkpoints.load_checkpoint(fx["safetensors"]))
    torch.manual_seed(0)
    plain = next(iter(tasks._loader(data, [0, 1], norm, 32, _settings(), shuffle=False)))[0]
    torch.manual_seed(0)
    crops = next(iter(tasks._loader(data, [0, 1], norm, 32, _settings(), shuffle=False,
                                    crop=True)))[0]
    assert crops.shape == plain.shape == (2, 12, 32, 32)
    assert not torch.allclose(crops, plain)


# --------------------------------------------------------------------------- best-val selection


def test_best_val_keeps_the_best_epoch(fx: dict[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation scores (best at epoch 2 of 4): the test split is scored with the
    weights the model had after epoch 2, not after the last epoch."""
    data = readers.read_eurosat(fx["eurosat"])
    ckpt = checkpoints.load_checkpoint(fx["safetensors"])
    norm = checkpoints.resolve_normalisation(ckpt)
    train, test, _ = tasks.make_split(data.ids, {}, seed=0)
    train, val, record = tasks.split_validation(data.ids, train, test, seed=0)
    assert record["val"] == len(val) == 2 and not set(val) & (set(train) | set(test))
    script = iter([0.2, 0.9, 0.5, 0.9])  # a tie later: the first best stays
    seen: list[torch.Tensor] = []

    def fake_score(model: Classifier, *args: Any) -> float:
        seen.append(model.head.weight.detach().clone())
        return next(script)

    predicted_with: list[torch.Tensor] = []
    real_predict = tasks.predict_logits

    def spy_predict(model: Classifier, *args: Any) -> torch.Tensor:
        predicted_with.append(model.head.weight.detach().clone())
        return real_predict(model, *args)

    monkeypatch.setattr(tasks, "validation_score", fake_score)
    monkeypatch.setattr(tasks, "predict_logits", spy_predict)
    encoder = Encoder(checkpoints.build_mae(ckpt, 32))
    out = tasks.run_classification(encoder, data, train, test, norm, 32, "finetune",
                                   _settings(epochs=4, lr=1e-2, selection="best-val"), val=val)
    sel = out["training"]["selection"]
    assert sel["mode"] == "best-val" and sel["epoch"] == 2
    assert sel["val_per_epoch"] == [0.2, 0.9, 0.5, 0.9] and sel["val_score"] == 0.9
    assert len(seen) == 4 and not torch.equal(seen[1], seen[3])  # weights moved after epoch 2
    torch.testing.assert_close(predicted_with[-1], seen[1], rtol=0, atol=0)


def test_best_val_end_to_end_json(fx: dict[str, Path], tmp_path: Path) -> None:
    names = tmp_path / "val.txt"
    names.write_text("AnnualCrop_2\nForest_2\nRiver_2\nRiver_3\n")
    result = _run(fx, tmp_path, "--epochs", "3", "--batch-size", "12", "--lr", "1e-3",
                  "--select", "best-val", "--val-file", str(names))
    assert result["selection"] == "best-val"
    sel = result["training"]["selection"]
    curve = sel["val_per_epoch"]
    assert len(curve) == 3
    assert result["selected_epoch"] == sel["epoch"] == curve.index(max(curve)) + 1
    in_test = {"AnnualCrop_2", "Forest_2", "River_2", "River_3"} & set(result["split"]["test_ids"])
    n_val = 4 - len(in_test)  # test samples are never validation samples
    assert result["split"]["val"] == n_val and n_val > 0
    assert result["split"]["val_source"]["source"] == "validation list"
    assert result["split"]["train"] + n_val + result["split"]["test"] == 30
    assert "best on the validation split" in result["notes"]


# --------------------------------------------------------------------------- position-table LR


def test_pos_lr_official_and_decayed() -> None:
    model = Classifier(Encoder(build_model("tiny", img_size=32)), 3, probe=False)
    named = dict(model.named_parameters())

    def lr_of(groups: list[dict[str, Any]], name: str) -> tuple[float, float]:
        g = next(g for g in groups if any(p is named[name] for p in g["params"]))
        return g["lr"], g["weight_decay"]

    official = param_groups_lrd(model, 1e-3, 0.05, 0.75)  # default: official
    decayed = param_groups_lrd(model, 1e-3, 0.05, 0.75, pos_lr="decayed")
    for table in ("encoder.pos_embed_spatial", "encoder.pos_embed_temporal"):
        # official util/lr_decay.py get_layer_id_for_vit: not 'pos_embed' -> num_layers -> 1
        assert lr_of(official, table) == (pytest.approx(1e-3), 0.0)
        assert lr_of(decayed, table) == (pytest.approx(1e-3 * 0.75**3), 0.0)  # depth 2: layer 0
    for groups in (official, decayed):  # everything else as before
        assert lr_of(groups, "encoder.patch_embed.proj.weight")[0] == pytest.approx(1e-3 * 0.75**3)
        assert lr_of(groups, "encoder.blocks.1.attn.q.weight")[0] == pytest.approx(1e-3 * 0.75)
        assert lr_of(groups, "head.weight") == (pytest.approx(1e-3), 0.05)
    with pytest.raises(ValueError):
        param_groups_lrd(model, 1e-3, 0.05, 0.75, pos_lr="bogus")
    # the fine-tuning optimizer follows TrainSettings.pos_lr
    opt = tasks._optimizer(model, _settings(pos_lr="decayed", lr=1e-3), 0.75)
    g = next(g for g in opt.param_groups if any(p is named["encoder.pos_embed_spatial"]
                                                for p in g["params"]))
    assert g["initial_lr"] == pytest.approx(1e-3 * 0.75**3)


# --------------------------------------------------------------------------- everything at once


def test_full_recipe_runs_and_is_recorded(fx: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fx, tmp_path, "--epochs", "2", "--batch-size", "8", "--drop-path", "0.1",
                  "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--reprob", "0.25",
                  "--rrc", "--select", "best-val", "--pos-lr", "decayed")
    s = result["settings"]
    assert (s["drop_path"], s["mixup"], s["cutmix"], s["smoothing"], s["reprob"], s["rrc"],
            s["pos_lr"]) == (0.1, 0.8, 1.0, 0.1, 0.25, True, "decayed")
    t = result["training"]
    assert sum(t["mixed_batches"].values()) == 2 * math.ceil(result["split"]["train"] / 8)
    assert t["erased_samples"] > 0 and result["selection"] == "best-val"
    assert result["split"]["val"] == 2  # 10% of the 24 training samples
