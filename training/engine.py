"""One progressive-pretraining stage: the optimisation loop on a DeepSpeed engine.

Per optimizer step: set the LR from the schedule, run ``accumulation`` micro-batches
(forward, ``engine.backward``), all-reduce the summed losses, stop if they are not finite
(before the weights are touched), then ``engine.step()``. Logging, reconstruction images and
checkpoints happen on step boundaries. Everything that needs all ranks (the loss reduction,
ZeRO-3 parameter gathering for images, checkpoint writes) is called on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training import checkpoint, flops, report
from training.checkpoint import TrainerState
from training.config import ModelConfig, RunConfig, StageConfig
from training.data import DataPosition, track
from training.errors import NonFiniteLossError
from training.optim import Schedule

logger = logging.getLogger(__name__)


@dataclass
class StageContext:
    """Everything the loop of one stage needs; built by ``pretrain.py``."""

    engine: Any
    """``deepspeed.DeepSpeedEngine`` wrapping :class:`~training.models.spectral_mae.SpectralMAE`."""
    run: RunConfig
    stage: StageConfig
    model_cfg: ModelConfig
    schedule: Schedule
    state: TrainerState
    """State at the start (step_in_stage > 0 when resuming inside the stage)."""
    position: DataPosition
    make_batches: Callable[[DataPosition, int], Iterator[dict[str, Any]]]
    """(position, number of micro-batches) -> batches continuing from ``position``."""
    accumulation: int
    micro_batch: int
    global_batch: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    """Input dtype: bf16 when the engine runs in bf16, else float32."""
    run_dir: Path
    bands: tuple[str, ...]
    run_steps_left: int
    """Optimizer steps left in the whole run at the start of this stage (for the ETA)."""
    trackers: Any = None
    """``training.tracking.Trackers`` of rank 0 (a copy of every metrics record), or None."""


@dataclass(frozen=True)
class StageResult:
    state: TrainerState
    stopped: bool
    """True when ``stop_at_step`` ended the run early (after checkpointing)."""


def _mask_generator(ctx: StageContext, step: int, micro: int) -> torch.Generator:
    """RNG for the masks of one micro-batch, a pure function of where we are.

    Seeding per (seed, stage, rank, step, micro-batch) makes a resumed run draw the same
    masks as an uninterrupted one without saving RNG states.
    """
    seed = int(np.random.SeedSequence([ctx.run.seed, ctx.state.stage_index, ctx.rank, step,
                                       micro]).generate_state(1)[0])
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(seed)
    return gen


def _all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world_size
    return values


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """What the model takes from a batch besides the image: ``dates`` and ``valid`` of time
    stacks, ``gsd`` for the GSD encoding (see :class:`training.data.ShardStream`)."""
    return {k: batch[k].to(device, torch.float32) for k in ("dates", "valid", "gsd") if k in batch}


def _save_images(ctx: StageContext, batch_image: torch.Tensor, step: int,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Reconstruct the first sample of the batch with a fixed mask; rank 0 writes the PNG
    (a time stack: one row per date).

    Runs on every rank: under ZeRO-3 the forward pass gathers parameters collectively.
    """
    engine = ctx.engine
    model = engine.module
    x = batch_image[:1]
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(ctx.run.seed)
    with torch.no_grad():
        out = model(x, generator=gen, **{k: v[:1] for k, v in (extra or {}).items()})
    if ctx.rank != 0:
        return
    pred = model.unpatchify(out.pred.float())[0]  # [C, H, W], or [T, C, H, W] for a stack
    token_mask = out.mask.float()[:, :, None].expand(-1, -1, ctx.model_cfg.patch_dim)
    mask = model.unpatchify(token_mask)[0]
    image = x[0].float()
    recon = image * (1 - mask) + pred * mask
    path = ctx.run_dir / "images" / f"{ctx.stage.name}_step{step:07d}.png"
    report.save_reconstruction(path, image.cpu().numpy(), recon.cpu().numpy(),
                               mask.cpu().numpy(), ctx.bands,
                               title=f"{ctx.stage.name}, step {step}: loss of this sample "
                                     f"{out.loss.item():.4f}")


def _gather_position(ctx: StageContext) -> DataPosition:
    """Every rank's consumed counts in one :class:`DataPosition` (rank 0 saves it)."""
    pos = ctx.position
    if dist.is_initialized() and ctx.world_size > 1:
        rows: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(rows, (pos.consumed[ctx.rank], pos.next_stream[ctx.rank]))
        return dataclasses.replace(pos, consumed=[list(r[0]) for r in rows],
                                   next_stream=[int(r[1]) for r in rows])
    return dataclasses.replace(pos, consumed=[list(r) for r in pos.consumed],
                               next_stream=list(pos.next_stream))


def train_stage(ctx: StageContext) -> StageResult:
    """Run (the rest of) one stage; return the final state. Raises NonFiniteLossError."""
    run, stage, engine = ctx.run, ctx.stage, ctx.engine
    state = ctx.state
    total = ctx.schedule.total_steps
    start = state.step_in_stage
    tokens_per_sample = ctx.model_cfg.num_tokens
    metrics = report.MetricsWriter(ctx.run_dir / "metrics.jsonl", ctx.trackers) if ctx.rank == 0 else None
    if start >= total:
        return StageResult(state, stopped=False)
    peak = _peak_flops(ctx) if ctx.rank == 0 else None

    batches = ctx.make_batches(ctx.position, (total - start) * ctx.accumulation)
    engine.train()
    window = {"loss": 0.0, "loss_token": 0.0, "loss_spectral": 0.0, "steps": 0,
              "step_time": 0.0, "data_wait": 0.0}
    stage_t0 = time.perf_counter()
    last_image, last_extra = None, None
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = ctx.schedule.lr(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # NCCL needs GPU tensors
        data_wait = 0.0
        for micro in range(ctx.accumulation):
            t_data = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_data
            track(ctx.position, ctx.rank, batch)
            x = batch["image"].to(ctx.device, ctx.dtype, non_blocking=True)
            extra = model_inputs(batch, ctx.device)
            out = engine(x, generator=_mask_generator(ctx, step, micro), **extra)
            engine.backward(out.loss)
            sums += torch.stack([out.loss.detach(), out.loss_token.detach(),
                                 out.loss_spectral.detach()]).double()
            if micro < ctx.accumulation - 1:
                engine.step()  # not a boundary: DeepSpeed only advances its micro-step count
            last_image, last_extra = x, extra
        sums = _all_reduce_mean(sums / ctx.accumulation, ctx.world_size)
        loss, loss_token, loss_spectral = sums.cpu().tolist()
        global_step = state.global_step + 1
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss} at step {global_step} (stage '{stage.name}', step "
                f"{step + 1}/{total}, lr {lr:.3g}); weights were not updated. Lower the "
                f"stage's blr or check the data; resume from the last checkpoint with --resume")
        engine.step()  # accumulation boundary: clip, optimizer step, zero grads
        step_time = time.perf_counter() - t0
        state = dataclasses.replace(state, step_in_stage=step + 1, global_step=global_step,
                                    samples_seen=state.samples_seen + ctx.global_batch)

        window["loss"] += loss
        window["loss_token"] += loss_token
        window["loss_spectral"] += loss_spectral
        window["steps"] += 1
        window["step_time"] += step_time
        window["data_wait"] += data_wait
        done = step + 1
        if done % run.log_every == 0 or done == total:
            _log(ctx, metrics, window, state, lr, tokens_per_sample, stage_t0, start, peak,
                 ctx.world_size)
            window = dict.fromkeys(window, 0.0) | {"steps": 0}
        last_step = done == total
        stop = run.stop_at_step is not None and global_step >= run.stop_at_step
        if done % run.image_every == 0 or last_step:
            _save_images(ctx, last_image, global_step, last_extra)
        if done % run.checkpoint_every == 0 or last_step or stop:
            state = dataclasses.replace(state,
                                        data_position=_gather_position(ctx).to_dict())
            checkpoint.save(engine, ctx.run_dir / "checkpoints", state, run.keep_checkpoints)
        if stop and not last_step:
            if ctx.rank == 0:
                logger.info("stop_at_step=%d reached: stopping (resume with --resume)",
                            run.stop_at_step)
            return StageResult(state, stopped=True)
    return StageResult(state, stopped=run.stop_at_step is not None
                       and state.global_step >= run.stop_at_step)


def _peak_flops(ctx: StageContext) -> float | None:
    """Rank 0, at the start of a stage: the peak FLOP/s of one device for the MFU
    (:func:`training.flops.peak_flops`: the override, or the exact CUDA device name), None
    when unknown. Logs the model FLOPs per sample and where the peak came from."""
    name = flops.device_name(ctx.device)
    try:
        peak = flops.peak_flops(name)
    except ValueError as exc:  # a typo in the override must not stop a run: no MFU then
        logger.warning("%s: MFU is not reported", exc)
        peak = None
    fwd = flops.forward_flops(ctx.model_cfg)
    if peak is not None:
        where = f"peak {peak / 1e12:.4g} TFLOP/s per device"
    elif name is None:
        where = f"MFU not reported on {ctx.device.type} (set {flops.PEAK_ENV} to get one)"
    else:
        where = (f"MFU not reported: no peak for {name!r} in training.flops.PEAK_BF16_FLOPS "
                 f"(set {flops.PEAK_ENV}, TFLOP/s per device)")
    logger.info("model FLOPs per sample: %.4g GFLOP forward (encoder on %d of %d tokens), "
                "%.4g GFLOP per training step (3 x forward) | %s", fwd.total / 1e9,
                flops.encoder_tokens(ctx.model_cfg), ctx.model_cfg.num_tokens,
                3 * fwd.total / 1e9, where)
    return peak


def _log(ctx: StageContext, metrics: report.MetricsWriter | None, window: dict[str, float],
         state: TrainerState, lr: float, tokens_per_sample: int, stage_t0: float,
         start: int, peak: float | None = None, devices: int = 1) -> None:
    """Rank 0: one JSON line and one human line with the ETA of stage and run.

    ``model_tflops`` is the model's FLOP/s per device (:mod:`training.flops`: matrix products
    of forward + backward for the trained masking, the ``global_batch`` samples of all
    ``devices`` over the step time, divided by ``devices``) in TFLOP/s; ``mfu`` that over
    ``peak`` (FLOP/s of one device), None when the peak is unknown (a CPU, or a GPU not in
    the table, without override)."""
    if metrics is None:
        return
    n = window["steps"]
    step_time = window["step_time"] / n
    samples_per_s = ctx.global_batch / step_time
    done_here = state.step_in_stage - start
    avg = (time.perf_counter() - stage_t0) / max(done_here, 1)
    stage_left = ctx.schedule.total_steps - state.step_in_stage
    run_left = ctx.run_steps_left - done_here
    record = {
        "step": state.global_step, "stage": ctx.stage.name, "stage_step": state.step_in_stage,
        "samples": state.samples_seen,
        "loss": window["loss"] / n, "loss_token": window["loss_token"] / n,
        "loss_spectral": window["loss_spectral"] / n, "lr": lr,
        "samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * tokens_per_sample,
        "step_time_s": step_time, "data_wait_s": window["data_wait"] / n,
        "grad_norm": _grad_norm(ctx.engine), "time": time.time(),
        "model_tflops": flops.achieved_flops(step_time, ctx.global_batch, ctx.model_cfg,
                                             devices=devices) / 1e12,
        "mfu": flops.mfu(step_time, ctx.global_batch, ctx.model_cfg, peak, devices=devices),
    }
    if torch.cuda.is_available():
        record["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    metrics.write(record)
    logger.info("[%s] step %d/%d (run step %d) loss %.4f (token %.4f, spectral %.4f) lr %.3g "
                "| %.1f samples/s %.0f tokens/s | %.3g model TFLOP/s per device, MFU %s "
                "| step %.2fs data %.2fs | ETA stage %s run %s",
                ctx.stage.name, state.step_in_stage, ctx.schedule.total_steps, state.global_step,
                record["loss"], record["loss_token"], record["loss_spectral"], lr,
                samples_per_s, record["tokens_per_s"], record["model_tflops"],
                "unknown" if record["mfu"] is None else f"{record['mfu']:.1%}",
                step_time, record["data_wait_s"],
                _fmt_duration(avg * stage_left), _fmt_duration(avg * run_left))


def _grad_norm(engine: Any) -> float | None:
    try:
        norm = engine.get_global_grad_norm()
    except (AttributeError, AssertionError):
        return None
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None
