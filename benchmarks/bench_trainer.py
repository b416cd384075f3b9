"""Training throughput of the SpectralGPT MAE: tokens/s and samples/s per preset and size.

Not a test. Prints ``NAME: VALUE`` lines, e.g.::

    cpu_fp32_tiny_96px_tokens_per_s: 21000
    cpu_fp32_base_128px_samples_per_s: 0.41

One training step = forward (90% masking), backward and an AdamW update on one process,
the work a DeepSpeed rank does per micro-batch (without the gradient all-reduce). Tokens
are all 3D tokens of the input (576 at 96 px, 1024 at 128 px), as in the trainer's logs.
On CUDA it also runs bf16 autocast and prints the model FLOP utilisation (MFU) against the
GPU's dense bf16 peak, from an analytic FLOP count (matmuls only, training = 3x forward).

Usage::

    python benchmarks/bench_trainer.py                 # tiny + base at 96 and 128 px
    python benchmarks/bench_trainer.py --presets tiny --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ModelConfig  # noqa: E402
from training.models.spectral_mae import build_model  # noqa: E402
from training.optim import param_groups  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def train_flops_per_sample(c: ModelConfig) -> float:
    """Matmul FLOPs of one training step per sample (2 per MAC, backward = 2x forward)."""
    n_vis, n_all = c.num_visible, c.num_tokens

    def blocks(n: int, d: int, depth: int) -> float:
        # q, k, v, proj (4 d^2) + MLP (2 x ratio x d^2) per token, plus the two n^2 d products.
        per_block = 2 * n * d * d * (4 + 2 * c.mlp_ratio) + 2 * 2 * n * n * d
        return depth * per_block

    forward = (2 * n_all * c.patch_dim * c.embed_dim  # Conv3d tokeniser over all tokens
               + blocks(n_vis, c.embed_dim, c.depth)
               + 2 * n_vis * c.embed_dim * c.decoder_embed_dim
               + blocks(n_all, c.decoder_embed_dim, c.decoder_depth)
               + 2 * n_all * c.decoder_embed_dim * c.patch_dim)
    return 3 * forward


def bench(preset: str, img: int, batch: int, steps: int, device: torch.device,
          bf16: bool, dates: int = 1) -> dict[str, float]:
    """One rank's training steps per second; ``dates`` > 1 trains on ``[B, T, 12, S, S]``
    stacks (the default sin-cos date encoding, dates 5 days apart)."""
    torch.manual_seed(0)
    model = build_model(preset, img_size=img, num_dates=dates).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    x = torch.rand(batch, *((dates,) if dates > 1 else ()), 12, img, img, device=device)
    when = torch.tensor([[2024.0, 160.0 + 5 * t] for t in range(dates)], device=device).expand(batch, -1, -1)
    extra = {"dates": when} if dates > 1 else {}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, **extra)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    samples = batch / dt
    result = {"samples_per_s": samples, "tokens_per_s": samples * model.cfg.num_tokens,
              "step_time_s": dt,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak is not None:
            result["mfu"] = samples * train_flops_per_sample(model.cfg) / peak
        result["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--sizes", default="96,128")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default: 5 tiny / 2 base on CPU, 20 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's choice, usually the core count)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        runs = [(torch.device("cuda"), True)]
    else:
        runs = [(torch.device("cpu"), False)]
    print(f"torch_threads: {torch.get_num_threads()}")
    for device, bf16 in runs:
        tag = f"{device.type}_{'bf16' if bf16 else 'fp32'}"
        for preset in args.presets.split(","):
            for img in map(int, args.sizes.split(",")):
                big = preset != "tiny"
                if device.type == "cuda":
                    batch, steps = (64 if big else 256), args.steps or 20
                else:
                    batch, steps = (2 if big else 8), args.steps or (2 if big else 5)
                r = bench(preset, img, batch, steps, device, bf16)
                name = f"{tag}_{preset}_{img}px"
                print(f"{name}_batch: {batch}")
                for key, value in r.items():
                    print(f"{name}_{key}: {value:.4g}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
