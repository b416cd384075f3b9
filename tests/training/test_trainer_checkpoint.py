"""DeepSpeed in this process (a 1-process gloo group): checkpoint round trip, NaN stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training.checkpoint import TrainerState
from training.config import load_config
from training.models.spectral_mae import SpectralMAE, build_model
from training.optim import param_groups

# DeepSpeed 0.19 calls collectives and torch.jit APIs that torch 2.13 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def process_group() -> None:
    """A world of one (DeepSpeed needs torch.distributed even for one process)."""
    from training.pretrain import _init_distributed

    _init_distributed()


def _engine(zero_stage: int, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = build_model("tiny", img_size=32)
    checkpoint.mark_universal(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": zero_stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 12, 32, 32, generator=gen)
    out = engine(x, generator=torch.Generator().manual_seed(seed))
    engine.backward(out.loss)
    engine.step()
    return out.loss.item()


def _optimizer_tensors(engine) -> dict[str, torch.Tensor]:
    """Every tensor of the (ZeRO-wrapped) optimizer state, by its path in the state dict."""
    out: dict[str, torch.Tensor] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, torch.Tensor):
            out[path] = node.detach().clone()
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(engine.optimizer.state_dict(), "")
    return out


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_save_then_load_gives_identical_states(process_group: None, tmp_path: Path,
                                               zero_stage: int) -> None:
    a = _engine(zero_stage, seed=0)
    for i in range(2):
        _step(a, i)
    state = TrainerState(0, "s", 2, 10, 2, 16, 1, {"consumed": [[16]]},
                         load_config().to_dict())
    tag = checkpoint.save(a, tmp_path, state, keep=2)
    assert (tmp_path / checkpoint.LATEST).read_text() == tag == "global_step2"
    assert checkpoint.read_state(tmp_path, tag) == state

    b = _engine(zero_stage, seed=1)  # different initial weights
    b.load_checkpoint(str(tmp_path), tag=tag)
    wa, wb = checkpoint.full_fp32_state_dict(a), checkpoint.full_fp32_state_dict(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = _optimizer_tensors(a), _optimizer_tensors(b)
    assert oa.keys() == ob.keys() and any("exp_avg" in k for k in oa)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # Same state -> the next step is identical too (moments, step count, LR all restored).
    assert _step(a, 7) == _step(b, 7)
    wa, wb = checkpoint.full_fp32_state_dict(a), checkpoint.full_fp32_state_dict(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The consolidated fp32 weights of the files equal the engine's (export path).
    files = checkpoint.fp32_state_dict_from_checkpoint(tmp_path, tag)
    model = SpectralMAE(a.module.cfg)
    model.load_state_dict(files, strict=True)


def test_latest_points_only_at_complete_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "global_step4").mkdir()  # a save that was killed: no trainer_state.json
    (tmp_path / checkpoint.LATEST).write_text("global_step4")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.resolve(tmp_path)
    for step in (2, 4, 6, 8):
        (tmp_path / f"global_step{step}").mkdir(exist_ok=True)
        if step != 4:
            (tmp_path / f"global_step{step}" / checkpoint.STATE_FILE).write_text("{}")
    (tmp_path / checkpoint.LATEST).write_text("global_step8")
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step6",
                                                                     "global_step8"]
    assert checkpoint.resolve(tmp_path.parent / tmp_path.name) == (tmp_path, "global_step8")


def test_non_finite_loss_stops_the_run_naming_the_step(
        process_group: None, manifest: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from training.pretrain import main

    real = SpectralMAE.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask, valid=None):
        calls["n"] += 1
        loss, lt, ls = real(self, imgs, pred, mask, valid)
        return (loss * float("nan"), lt, ls) if calls["n"] >= 3 else (loss, lt, ls)

    monkeypatch.setattr(SpectralMAE, "forward_loss", poisoned)
    rc = main(["--set", f"manifest={manifest}", "--set", f"output_dir={tmp_path / 'run'}",
               "--set", "num_workers=0", "--set", "micro_batch=2", "--set", "global_batch=2",
               "--set", "bf16=false",
               "--set", "stages=[{name: a, dataset: s96_g10m, img_size: 96, samples: 20}]"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is nan at step 3 (stage 'a', step 3/10")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "stage_start"
