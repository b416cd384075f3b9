"""The GPU defaults of the trainer, checked on CPU (issue 20, "the first GPU run must work").

* bf16 runs accumulate gradients in fp32 at ZeRO-2/3 (``data_types.grad_accum_dtype``), and a
  real 2-step bf16 ZeRO-2 run on CPU takes it (DeepSpeed's engine reports fp32 accumulation);
* the generated config of a CUDA run overlaps communication with the chosen bucket sizes, a
  CPU run does not overlap (DeepSpeed's CPU accelerator has no streams);
* a stage sized in epochs on a data set smaller than its global batch stops at start with one
  line naming the numbers (``base_gpu.yaml`` on a 7-chip manifest), while the tiny config,
  sized in samples, still starts on the same manifest.

The expected values are written out from training/PRETRAIN.md ("Precision and ZeRO
communication"), not computed by the code under test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from make_test_shards import write_dataset
from training.config import load_config
from training.data import read_stage_data
from training.errors import ConfigError
from training.pretrain import StagePlan, check_data_size, deepspeed_config, main, start_checks

# DeepSpeed 0.19 calls collectives and torch.jit APIs that torch 2.13 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PLAN = StagePlan(samples=4096, steps=1, warmup_steps=0, micro_batch=128, accumulation=32,
                 global_batch=4096, peak_lr=3.2e-3)


def _generated(*overrides: str, accelerator: str = "cuda") -> dict[str, Any]:
    """The DeepSpeed config that base_gpu.yaml (with overrides) produces for one stage."""
    run = load_config("base_gpu", list(overrides))
    return deepspeed_config(run, PLAN, load_universal=False, accelerator=accelerator)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[20")]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("zero", ["ds_zero2.json", "ds_zero3.json"])
def test_bf16_runs_accumulate_gradients_in_fp32(zero: str) -> None:
    cfg = _generated(f"deepspeed_config={zero}")
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["gradient_accumulation_steps"] == 32 and cfg["train_batch_size"] == 4096


@pytest.mark.parametrize("zero", ["ds_zero1.json", "ds_zero2.json", "ds_zero3.json"])
def test_fp32_runs_need_no_accumulation_dtype(zero: str) -> None:
    cfg = _generated("bf16=false", f"deepspeed_config={zero}")
    assert cfg["bf16"] == {"enabled": False} and "data_types" not in cfg


def test_zero1_keeps_bf16_accumulation_and_says_so(manifest: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """DeepSpeed would run ZeRO-1 + fp32 accumulation through BF16_Optimizer, whose
    checkpoints zero_to_fp32 (the export) cannot read: not set there, warned at start."""
    assert "data_types" not in _generated("deepspeed_config=ds_zero1.json")
    run = load_config("tiny_cpu", [f"manifest={manifest}", "bf16=true",
                                   "deepspeed_config=ds_zero1.json"])
    with caplog.at_level(logging.WARNING, logger="training.pretrain"):
        start_checks(run, _shard_sets(run), rank=0)
    assert any("bf16 with ZeRO-1" in r.getMessage() and "accumulate" in r.getMessage()
               for r in caplog.records)


def test_an_accumulation_dtype_in_the_json_is_kept(tmp_path: Path) -> None:
    own = json.loads((Path(__file__).resolve().parents[2] / "training" / "configs" /
                      "ds_zero2.json").read_text())
    own["data_types"] = {"grad_accum_dtype": "bf16"}
    (tmp_path / "own.json").write_text(json.dumps(own))
    assert _generated(f"deepspeed_config={tmp_path / 'own.json'}")["data_types"] == \
        {"grad_accum_dtype": "bf16"}


def test_a_real_bf16_zero2_run_accumulates_in_fp32(manifest: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizer steps of 2 micro-batches each, bf16, ZeRO-2, in this process on CPU:
    DeepSpeed accepts the config and its engine and ZeRO optimizer accumulate in fp32."""
    import deepspeed
    import torch

    seen: list[tuple[Any, ...]] = []
    real = deepspeed.initialize

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        engine = out[0]
        seen.append((kwargs["config"], engine.get_data_types(),
                     getattr(engine.optimizer, "gradient_accumulation_dtype", None)))
        return out

    monkeypatch.setattr(deepspeed, "initialize", spy)
    out = tmp_path / "run"
    rc = main(["--set", f"manifest={manifest}", "--set", f"output_dir={out}",
               "--set", "num_workers=0", "--set", "bf16=true",
               "--set", "deepspeed_config=ds_zero2.json", "--set", "micro_batch=2",
               "--set", "global_batch=4", "--set", "log_every=1",
               "--set", "stages=[{name: a, dataset: s96_g10m, img_size: 96, samples: 8, blr: 0.1}]"])
    assert rc == 0
    [(cfg, (model_dtype, accum_dtype), zero_accum)] = seen
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["overlap_comm"] is False  # the CPU accelerator
    assert (model_dtype, accum_dtype, zero_accum) == (torch.bfloat16, torch.float32, torch.float32)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 2 and all(x == x and x < 1e3 for x in losses)  # finite


# --------------------------------------------------------------------------- communication


def test_a_cuda_run_overlaps_zero2_communication_with_the_chosen_buckets() -> None:
    zero = _generated("deepspeed_config=ds_zero2.json")["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == 20_000_000      # 5 buckets of the 98.6 M base model
    assert zero["allgather_bucket_size"] == 50_000_000   # 2 weight all-gathers after the step
    assert zero["contiguous_gradients"] is True and zero["reduce_scatter"] is True


def test_a_cuda_run_overlaps_zero3_communication_with_the_chosen_buckets() -> None:
    zero = _generated("deepspeed_config=ds_zero3.json")["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == 20_000_000
    assert zero["stage3_prefetch_bucket_size"] == 50_000_000       # >= 2 blocks of any preset
    assert zero["stage3_param_persistence_threshold"] == 100_000   # norms and biases stay whole


@pytest.mark.parametrize("zero", ["ds_zero2.json", "ds_zero3.json"])
def test_a_cpu_run_does_not_overlap(zero: str) -> None:
    cuda = _generated(f"deepspeed_config={zero}")["zero_optimization"]
    cpu = _generated(f"deepspeed_config={zero}", accelerator="cpu")["zero_optimization"]
    assert cpu["overlap_comm"] is False
    assert {k: v for k, v in cpu.items() if k != "overlap_comm"} == \
        {k: v for k, v in cuda.items() if k != "overlap_comm"}


# --------------------------------------------------------------------------- small data


def _shard_sets(run: Any) -> list[Any]:
    return [read_stage_data(run.manifest, [(d.name, d.weight) for d in run.stage_datasets(s)],
                            s.split, run.model_for(s), version=run.dataset_version)
            for s in run.stages]


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 training chips per data set, as the 128 px data set of the sample build."""
    return write_dataset(tmp_path_factory.mktemp("small"), samples={"train": 7, "val": 2})


def test_base_gpu_refuses_a_data_set_smaller_than_its_batch(
        small_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["--config", "base_gpu", "--set", f"manifest={small_manifest}",
                 "--set", f"output_dir={out}"]) == 2
    assert _one_error_line(capsys) == (
        "error: stage 'stage1_96px': data set s96_g10m has 7 training samples but the global "
        "batch is 4096: fewer than one step per epoch (200 epochs would be 1 step(s)); build a "
        "larger dataset (README, 'The pipeline': python -m pipeline.build_shards) or lower "
        "global_batch, or set allow_small_data: true to train on it anyway")
    assert not out.exists()  # refused before anything is written


def test_the_rule_is_one_step_per_epoch_for_stages_sized_in_epochs(small_manifest: Path) -> None:
    def check(*overrides: str) -> None:
        run = load_config("base_gpu", [f"manifest={small_manifest}", *overrides])
        check_data_size(run, _shard_sets(run))

    check("global_batch=7", "micro_batch=7")            # 7 samples, batch 7: one step per epoch
    with pytest.raises(ConfigError, match="stage 'stage1_96px'.* 7 training samples but the "
                                          "global batch is 8"):
        check("global_batch=8", "micro_batch=8")
    check("allow_small_data=true")                     # the override
    # stage 2 alone, on its own batch
    with pytest.raises(ConfigError, match="stage 'stage2_128px': data set s128_g10m has 7 "
                                          r"training samples but the global batch is 16: .*\(100 "
                                          r"epochs would be 44 step\(s\)\)"):
        check("global_batch=7", "micro_batch=7", "stages.1.global_batch=16",
              "stages.1.micro_batch=8")
    # sized in samples, warm-up in epochs: the warm-up is what depends on the data size
    with pytest.raises(ConfigError, match=r"\(20 warm-up epochs would be 1 step\(s\)\)"):
        check("stages.0.epochs=null", "stages.0.samples=100000")
    # sized in samples throughout: never refused
    check("stages.0.epochs=null", "stages.0.samples=100000", "stages.0.warmup_epochs=null",
          "stages.1.epochs=null", "stages.1.samples=100000", "stages.1.warmup_epochs=null")


def test_the_tiny_config_still_starts_on_the_small_manifest(small_manifest: Path,
                                                            tmp_path: Path) -> None:
    """tiny_cpu.yaml sizes its stages in samples (global batch 8 > 7 chips at 128 px, as the
    sample build): it starts and trains (stopped after its first step)."""
    out = tmp_path / "run"
    assert main(["--set", f"manifest={small_manifest}", "--set", f"output_dir={out}",
                 "--set", "num_workers=0", "--set", "stop_at_step=1", "--set", "log_every=1"]) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert [r["step"] for r in steps] == [1]
