"""The learning rate: peak = blr x effective batch / 256, linear warm-up, half-cycle cosine.

Expected values are written out by hand from the official recipe (MAE ``lr_sched.py``,
``main_pretrain.py``: absolute LR = blr x eff. batch / 256), not computed by the code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from training.config import load_config
from training.data import read_shard_set
from training.optim import Schedule
from training.pretrain import plan_stage


def test_schedule_values_by_hand() -> None:
    s = Schedule(peak_lr=1e-3, min_lr=1e-5, warmup_steps=4, total_steps=12)
    # warm-up: (step + 1) / 4 of the peak
    assert [s.lr(k) for k in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # cosine over the 8 steps after warm-up, from the peak down to min_lr
    assert s.lr(4) == pytest.approx(1e-3)
    assert s.lr(8) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way: cos(pi/2) = 0
    assert s.lr(10) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 6 / 8)))
    assert s.lr(12) == pytest.approx(1e-5) and s.lr(50) == pytest.approx(1e-5)


@pytest.mark.parametrize(("gb", "mb", "world", "blr"), [(8, 4, 1, 0.1), (4096, 64, 8, 2e-4), (16, 2, 2, 1e-4)])
def test_peak_lr_is_blr_times_effective_batch_over_256(manifest: Path, gb: int, mb: int, world: int,
                                                       blr: float) -> None:
    run = load_config(None, [f"manifest={manifest}", f"global_batch={gb}", f"micro_batch={mb}",
                             f"stages.0.blr={blr}", "stages.0.samples=64000", "stages.0.warmup_samples=8192"])
    stage = run.stages[0]
    ss = read_shard_set(manifest, stage.dataset, stage.split, run.model_for(stage))
    plan = plan_stage(run, stage, ss, world)
    assert plan.peak_lr == pytest.approx(blr * gb / 256)
    assert plan.accumulation == gb // (mb * world)
    assert plan.steps == math.ceil(64000 / gb) and plan.warmup_steps == min(math.ceil(8192 / gb), plan.steps)


def test_the_trainer_logs_the_scheduled_lr(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real short run: the lr of every logged step is the schedule's, by hand. Run again
    into the same folder without --resume, it is refused in one line and nothing changes."""
    import json

    from training.pretrain import main

    out = tmp_path / "run"
    args = ["--set", f"manifest={manifest}", "--set", f"output_dir={out}", "--set", "num_workers=0",
            "--set", "stages=[{name: s, dataset: s96_g10m, img_size: 96, samples: 48, blr: 0.2, "
            "warmup_samples: 16}]", "--set", "log_every=1", "--set", "micro_batch=4",
            "--set", "global_batch=8", "--set", "bf16=false"]
    assert main(args) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "loss" in r]
    peak = 0.2 * 8 / 256  # 6.25e-3; 6 steps, 2 of warm-up
    want = [peak / 2, peak] + [peak * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(want)

    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert err == [f"error: '{out}' already holds checkpoints: pass --resume to continue it, "
                   "or set name/output_dir for a new run"]
    assert (out / "metrics.jsonl").read_bytes() == metrics
