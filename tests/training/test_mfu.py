"""Model FLOPs per training step and MFU (training/flops.py) and their metrics records.

The expected FLOPs are counted here by hand from the architecture numbers of the tiny
preset (embed 96, depth 2, 4 heads, MLP 4x; decoder 64 wide, 1 block, 4 heads; tokens of
u=3 bands x 8 x 8 px), not computed by the code under test. A real short CPU run of the
trainer (tiny model, DeepSpeed on CPU, in this process) then shows that every loss record
carries ``model_tflops`` and ``mfu``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from training import flops
from training.models.spectral_mae import SpectralMAE, tiny_config

# DeepSpeed 0.19 calls collectives and torch.jit APIs that torch 2.13 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(autouse=True)
def _no_peak_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the override themselves; one in the caller's environment would leak in."""
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)


def test_tiny_96px_forward_flops_by_hand() -> None:
    cfg = tiny_config(img_size=96)  # mask ratio 0.9, random masking, one date
    # Tokens: 12 bands / 3 = 4 groups; 96 / 8 = 12 -> 144 positions; N = 4 * 144 = 576.
    # K = 3 * 8 * 8 = 192 values per token. Kept: int(576 * 0.1) = int(57.6) = 57.
    n, k, keep = 576, 192, 57
    assert flops.encoder_tokens(cfg) == keep

    patch_embed = 2 * n * k * 96                                 # [576,192] x [192,96]
    assert patch_embed == 21_233_664
    # one encoder block on 57 tokens, width 96, MLP 384:
    enc_qkv_proj = 4 * (2 * keep * 96 * 96)                      # q, k, v, proj: 4 x 1,050,624
    enc_mlp = 2 * (2 * keep * 96 * 384)                          # fc1, fc2: 2 x 4,202,496
    enc_attn = 2 * (2 * keep * keep * 96)                        # q k^T and attn v: 2 x 623,808
    enc_block = enc_qkv_proj + enc_mlp + enc_attn
    assert enc_block == 4_202_496 + 8_404_992 + 1_247_616 == 13_855_104
    encoder = 2 * enc_block                                      # depth 2
    decoder_embed = 2 * keep * 96 * 64                           # [57,96] x [96,64]
    assert decoder_embed == 700_416
    # one decoder block on all 576 tokens, width 64, MLP 256:
    dec_qkv_proj = 4 * (2 * n * 64 * 64)                         # 4 x 4,718,592
    dec_mlp = 2 * (2 * n * 64 * 256)                             # 2 x 18,874,368
    dec_attn = 2 * (2 * n * n * 64)                              # 2 x 42,467,328
    decoder = dec_qkv_proj + dec_mlp + dec_attn                  # depth 1
    assert decoder == 18_874_368 + 37_748_736 + 84_934_656 == 141_557_760
    decoder_pred = 2 * n * 64 * k                                # [576,64] x [64,192]
    assert decoder_pred == 14_155_776
    forward = patch_embed + encoder + decoder_embed + decoder + decoder_pred
    assert forward == 205_357_824

    got = flops.forward_flops(cfg)
    assert dataclasses.astuple(got) == (patch_embed, encoder, decoder_embed, decoder, decoder_pred)
    assert got.total == forward
    assert flops.train_flops_per_sample(cfg) == 3 * forward == 616_073_472


def test_tube_and_random_masking_counts() -> None:
    """A 3-date stack of 576 tokens a date at ratio 0.9: random masking keeps
    int(1728 * 0.1) = 172 tokens, tube masking 3 * int(576 * 0.1) = 3 * 57 = 171; only the
    encoder and decoder_embed terms differ. The counts are those the model's masking keeps."""
    rnd = tiny_config(img_size=96, num_dates=3, masking="random")
    tube = tiny_config(img_size=96, num_dates=3, masking="tube")
    assert flops.encoder_tokens(rnd) == 172 and flops.encoder_tokens(tube) == 171
    for cfg in (rnd, tube):
        x = torch.zeros(2, cfg.num_tokens, 8)
        kept, _, _ = SpectralMAE.random_masking(x, cfg.mask_ratio, tubes=3 if cfg.masking == "tube" else 1)
        assert kept.shape[1] == flops.encoder_tokens(cfg) == cfg.num_visible

    def encoder_side(n_e: int) -> int:  # blocks on n_e tokens + decoder_embed, by hand
        block = 4 * 2 * n_e * 96 * 96 + 2 * 2 * n_e * 96 * 384 + 2 * 2 * n_e * n_e * 96
        return 2 * block + 2 * n_e * 96 * 64

    f_rnd, f_tube = flops.forward_flops(rnd), flops.forward_flops(tube)
    assert f_rnd.encoder + f_rnd.decoder_embed == encoder_side(172)
    assert f_tube.encoder + f_tube.decoder_embed == encoder_side(171)
    assert (f_rnd.patch_embed, f_rnd.decoder, f_rnd.decoder_pred) == \
        (f_tube.patch_embed, f_tube.decoder, f_tube.decoder_pred)
    assert f_rnd.decoder == 1 * (4 * 2 * 1728 * 64 * 64 + 2 * 2 * 1728 * 64 * 256 + 2 * 2 * 1728**2 * 64)
    assert f_rnd.total - f_tube.total == encoder_side(172) - encoder_side(171)
    # one date: tube masking is random masking
    assert flops.forward_flops(tiny_config(img_size=96, masking="tube")) == \
        flops.forward_flops(tiny_config(img_size=96))


def test_peak_table_is_exact_name_only() -> None:
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert flops.peak_flops("NVIDIA H200") == 989e12
    for a100 in ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe"):
        assert flops.peak_flops(a100) == 312e12
    assert flops.peak_flops("NVIDIA L40S") == 362e12
    # no substring, prefix or case matching, no family guess
    for unknown in ("NVIDIA H100", "H100 PCIe", "nvidia h100 80gb hbm3", "NVIDIA H100 80GB HBM3 ",
                    "NVIDIA H100 NVL", "NVIDIA L40", "NVIDIA GeForce RTX 4090", "cpu", ""):
        assert flops.peak_flops(unknown) is None, unknown
    assert flops.peak_flops(None) is None  # a CPU


def test_peak_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert flops.peak_flops(None, override_tflops=100) == 100e12
    monkeypatch.setenv(flops.PEAK_ENV, "250")
    assert flops.peak_flops(None) == 250e12  # a CPU gets one
    assert flops.peak_flops("NVIDIA H100 PCIe") == 250e12  # the environment beats the table
    assert flops.peak_flops("NVIDIA H100 PCIe", override_tflops=50) == 50e12  # the argument beats both
    for bad in ("fast", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(flops.PEAK_ENV, bad)
        with pytest.raises(ValueError, match=flops.PEAK_ENV):
            flops.peak_flops("NVIDIA H200")
    monkeypatch.setenv(flops.PEAK_ENV, "  ")  # blank: no override
    assert flops.peak_flops("NVIDIA H200") == 989e12


def test_mfu_formula() -> None:
    cfg = tiny_config(img_size=96)
    per_sample = 616_073_472  # 3 x forward, by hand above
    # 64 samples in 0.5 s on 2 devices of 10 TFLOP/s each
    achieved = flops.achieved_flops(0.5, 64, cfg, devices=2)
    assert achieved == pytest.approx(per_sample * 64 / 0.5 / 2)
    assert flops.mfu(0.5, 64, cfg, 10e12, devices=2) == pytest.approx(achieved / 10e12)
    assert flops.mfu(0.5, 64, cfg, None) is None
    assert flops.device_name("cpu") is None
    with pytest.raises(ValueError, match="step time"):
        flops.achieved_flops(0.0, 8, cfg)


def _short_run(manifest: Path, out: Path) -> list[dict]:
    """2 optimizer steps of 8 samples (2 micro-batches of 4) of the tiny model at 96 px on
    CPU, a log line per step; the loss records of ``metrics.jsonl``."""
    from training.pretrain import main

    args = ["--set", f"manifest={manifest}", "--set", f"output_dir={out}", "--set", "num_workers=0",
            "--set", "stages=[{name: s, dataset: s96_g10m, img_size: 96, samples: 16, blr: 0.1}]",
            "--set", "log_every=1", "--set", "micro_batch=4", "--set", "global_batch=8",
            "--set", "bf16=false", "--set", "image_every=1000"]
    assert main(args) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def test_a_real_cpu_run_records_model_tflops_and_mfu(manifest: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without override a CPU run has no MFU (null), with ``SPECTRALGPT_PEAK_TFLOPS`` set it
    has one; ``model_tflops`` is the hand count x samples per second in both."""
    per_sample = 616_073_472  # tiny, 96 px, ratio 0.9: 3 x forward, by hand above
    recs = _short_run(manifest, tmp_path / "plain")
    assert len(recs) == 2
    for r in recs:
        assert r["model_tflops"] > 0
        assert r["model_tflops"] == pytest.approx(per_sample * r["samples_per_s"] / 1e12, rel=1e-9)
        assert "mfu" in r and r["mfu"] is None

    monkeypatch.setenv(flops.PEAK_ENV, "0.5")  # 0.5 TFLOP/s: a plausible CPU figure
    recs = _short_run(manifest, tmp_path / "override")
    assert len(recs) == 2
    for r in recs:
        assert r["model_tflops"] > 0
        assert isinstance(r["mfu"], float) and math.isfinite(r["mfu"]) and r["mfu"] > 0
        assert r["mfu"] == pytest.approx(r["model_tflops"] / 0.5, rel=1e-9)

    # the run page's throughput table: the model TFLOP/s in both, the MFU only where known
    def header(run: Path) -> str:
        html = (run / "report" / "index.html").read_text()
        table = html[html.index('<table id="throughput-per-stage">'):]
        return table[:table.index("</thead>")]

    assert "model TFLOP/s per device" in header(tmp_path / "plain")
    assert "MFU" not in header(tmp_path / "plain")
    assert "<th class=\"num\">MFU</th>" in header(tmp_path / "override")
