"""Progressive SpectralGPT pretraining with DeepSpeed ZeRO: the entry point.

Usage (from the repository root)::

    deepspeed training/pretrain.py                                  # tiny CPU default
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 training/pretrain.py --config training/configs/tiny_cpu.yaml
    torchrun --nproc_per_node 8 training/pretrain.py --config training/configs/base_gpu.yaml
    deepspeed training/pretrain.py --set deepspeed_config=ds_zero3.json --set stages.0.samples=64
    deepspeed training/pretrain.py --resume                         # continue runs/<name>

For every stage of the config: build the model at the stage's image size (from the previous
stage's weights, spatial position tables interpolated or re-initialised), wrap it in a
DeepSpeed engine with a fresh AdamW (as the official code does between stages), stream the
stage's shards and run :func:`training.engine.train_stage`.

``--resume`` refuses a checkpoint whose data or optimisation config (:data:`RESUME_KEYS`,
:data:`RESUME_STAGE_KEYS`) differs from the run's, naming the changed keys;
``--resume --allow-config-change`` continues anyway, logs a warning and records an
``{"event": "config_change"}`` line in ``metrics.jsonl``.

Exit codes: 0 done (or stopped at ``stop_at_step``), 1 non-finite loss, 2 configuration,
data or checkpoint error, 6 disk full (a checkpoint, ``metrics.jsonl``, an image or the
config could not be written: its temporary files are removed, ``latest`` still names the
previous complete checkpoint; free space and ``--resume``). Errors are one line on
stderr, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script by the deepspeed launcher or torchrun: make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import warnings  # noqa: E402

import torch  # noqa: E402

# DeepSpeed 0.19 calls a collective that torch 2.13 deprecates, once per step and rank.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # DeepSpeed would probe for CUDA and warn; say what we mean before it is imported.
    os.environ["DS_ACCELERATOR"] = "cpu"

from pipeline.config import show_value  # noqa: E402
from training import checkpoint, report  # noqa: E402
from training.checkpoint import TrainerState  # noqa: E402
from training.config import ModelConfig, RunConfig, StageConfig, dump_config, load_config  # noqa: E402
from training.data import (  # noqa: E402
    DataPosition,
    MixedShardSet,
    MixedStream,
    ShardSet,
    ShardStream,
    iterate,
    make_loader,
    read_stage_data,
)
from training.engine import StageContext, train_stage  # noqa: E402
from training.tracking import Trackers  # noqa: E402
from training.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    TrainingError,
    no_space,
)
from training.models.spectral_mae import SpectralMAE, adapt_state_dict  # noqa: E402
from training.optim import Schedule, param_groups  # noqa: E402

logger = logging.getLogger("training.pretrain")


# --------------------------------------------------------------------------- arguments


def build_parser(prog: str = "deepspeed training/pretrain.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Progressive SpectralGPT pretraining on pipeline shards (DeepSpeed ZeRO).",
        epilog="exit codes: 0 done or stopped at stop_at_step, 1 non-finite loss, 2 "
               "configuration, data or checkpoint error, 6 disk full (free space, then "
               "--resume)")
    parser.add_argument("--config", default=None,
                        help="YAML run config (default: training/configs/tiny_cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set stages.1.samples=64 "
                             "--set deepspeed_config=ds_zero3.json (repeatable)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue from the latest checkpoint of the run directory, or "
                             "of PATH (a run dir, its checkpoints/ dir or a global_stepN dir); "
                             "the data and optimisation config must be the checkpoint's")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: continue although the data or optimisation "
                             "config differs from the checkpoint's (logged as a warning and "
                             "recorded in metrics.jsonl)")
    # Passed by the deepspeed launcher; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------- setup


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(message)s" if rank == 0 else \
        f"%(asctime)s %(levelname)s [rank {rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)
    # signed URLs, SAS tokens and URL credentials (an s3:// manifest's, say) are masked in every
    # record, the libraries' included, as the pipeline's commands do
    from pipeline.redact import install_redaction

    install_redaction()
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _LogFile(logging.FileHandler):
    """``train.log``: a line that cannot be written for want of space is dropped quietly.

    logging's default prints a traceback for every such line; the console shows the same
    lines, and the failure that ends the run (a checkpoint or ``metrics.jsonl`` that cannot
    be written) is reported as one line of its own.
    """

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if no_space(sys.exc_info()[1]) is None:
            super().handleError(record)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Launchers that start every process themselves and say so in their own variables, not in
#: RANK/WORLD_SIZE: (rank, size, local rank, local size). Open MPI (mpirun, deepspeed
#: --launcher openmpi), MVAPICH2, MPICH / Intel MPI (PMI), Slurm (srun, deepspeed --launcher slurm).
LAUNCHER_VARS = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MVAPICH2": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                 "MV2_COMM_WORLD_LOCAL_SIZE"),
    "MPICH/Intel MPI": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "Slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
}


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from an MPI or Slurm launcher's own
    variables when RANK is not set (empty: none found, or RANK is set).

    Without this, every process of `srun`/`mpirun` took itself for a one-process run: N
    independent jobs writing one run folder. Several processes must also be told where to
    meet (MASTER_ADDR, MASTER_PORT): the launcher does not say, so their absence is an error.

    Raises:
        ConfigError: several processes and no MASTER_ADDR/MASTER_PORT, or a malformed value.
    """
    if "RANK" in environ:
        return {}
    for name, (rank, size, local, local_size) in LAUNCHER_VARS.items():
        if rank in environ and size in environ:
            try:
                r, n = int(environ[rank]), int(environ[size])
                lr = int(environ.get(local, "0"))
                # Slurm may write "4(x2)" for per-node counts: the first number is this node's
                ln = int(str(environ.get(local_size, "1")).split("(")[0].split(",")[0] or 1)
            except ValueError:
                raise ConfigError(f"{name} launcher variables {rank}={environ.get(rank)!r}, "
                                  f"{size}={environ.get(size)!r} are not integers") from None
            if n > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
                raise ConfigError(f"started by {name} as {n} processes ({rank}={r}) but MASTER_ADDR and "
                                  "MASTER_PORT are not set: export the first node's address and a free "
                                  "port so the processes can meet (training/PRETRAIN.md, launchers)")
            return {"RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(lr), "LOCAL_WORLD_SIZE": str(ln)}
    return {}


def _init_distributed() -> tuple[int, int, int]:
    """Join the process group set up by deepspeed/torchrun (or described by an MPI or Slurm
    launcher's variables: :func:`launcher_env`), or make a 1-process one."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(launcher_env(os.environ))
    if "RANK" not in os.environ:  # plain `python training/pretrain.py`
        # MASTER_PORT only names DeepSpeed's CPU shared-memory region here (shm_interface.cpp);
        # nothing listens on it. A one-process group needs no rendezvous: an in-memory store
        # avoids the race in which another process takes a probed free port before the
        # TCPStore binds it (EADDRINUSE seen in CI).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized() and os.environ.get("WORLD_SIZE") == "1":
        from deepspeed.accelerator import get_accelerator

        dist.init_process_group(get_accelerator().communication_backend_name(),
                                store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed()  # joins the launcher's group, or wraps the one made above
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cuda":
        # a scheduler that shows each process only its own GPU makes device 0 the right one
        index = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the processes of this node instead of oversubscribing.
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device(accel.device_name())


# --------------------------------------------------------------------------- derived numbers


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Numbers derived for one stage from the config, the manifest and the world size."""

    samples: int
    steps: int
    warmup_steps: int
    micro_batch: int
    accumulation: int
    global_batch: int
    peak_lr: float


def plan_stage(run: RunConfig, stage: StageConfig, shard_set: ShardSet | MixedShardSet,
               world_size: int) -> StagePlan:
    """Steps, warm-up, accumulation and LR of ``stage`` (LR = blr x effective batch / 256)."""
    mb, gb = run.micro_batch_for(stage), run.global_batch_for(stage)
    if gb % (mb * world_size):
        raise ConfigError(f"stage '{stage.name}': global_batch {gb} is not divisible by "
                          f"micro_batch {mb} x {world_size} processes; change micro_batch, "
                          f"global_batch or the number of processes")
    accumulation = gb // (mb * world_size)
    samples = stage.samples if stage.samples is not None else \
        round(stage.epochs * shard_set.num_samples)  # type: ignore[operator]
    steps = max(1, math.ceil(samples / gb))
    if stage.warmup_samples is not None:
        warmup = math.ceil(stage.warmup_samples / gb)
    elif stage.warmup_epochs is not None:
        warmup = math.ceil(stage.warmup_epochs * shard_set.num_samples / gb)
    else:
        warmup = 0
    return StagePlan(samples, steps, min(warmup, steps), mb, accumulation, gb,
                     stage.blr * gb / 256)


#: ZeRO stages whose optimizer keeps fp32 gradient accumulation of a bf16 model in ZeRO's own
#: checkpoint format. DeepSpeed 0.19 (``engine._do_optimizer_sanity_check``) hands bf16 + fp32
#: accumulation at ZeRO-1 to its ``BF16_Optimizer``, whose checkpoints ``zero_to_fp32`` refuses
#: ("is not a zero checkpoint"; training.export and the evaluation loader read checkpoints with
#: it), and without ZeRO raises ``NotImplementedError`` for the mix.
FP32_ACCUMULATION_ZERO_STAGES = (2, 3)


def read_deepspeed_json(run: RunConfig) -> dict[str, Any]:
    """The run's DeepSpeed JSON as a dict (one line on a file that is not valid JSON)."""
    path = run.deepspeed_config_path()
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config '{path}' is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"deepspeed_config '{path}' must hold a JSON object")
    return cfg


def zero_stage_of(cfg: dict[str, Any]) -> int | None:
    """The ZeRO stage a DeepSpeed config asks for: 0 without ``zero_optimization``, None when
    it is not a plain number (DeepSpeed's own validation then reports it)."""
    zero = cfg.get("zero_optimization")
    if zero is None:
        return 0
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def deepspeed_config(run: RunConfig, plan: StagePlan, *, load_universal: bool,
                     accelerator: str | None = None) -> dict:
    """The shipped ZeRO JSON with batch, accumulation, clipping and precision from the run.

    Besides the batch numbers, clipping and ``bf16.enabled``:

    * a bf16 run at ZeRO-2/3 accumulates its micro-batch gradients in fp32
      (``"data_types": {"grad_accum_dtype": "fp32"}``, unless the JSON names a dtype itself):
      without it DeepSpeed sums them in the model dtype, bf16 (8 mantissa bits), over up to 32
      micro-batches with ``base_gpu.yaml`` on one GPU. ZeRO-1 keeps bf16 accumulation (see
      :data:`FP32_ACCUMULATION_ZERO_STAGES`; :func:`start_checks` warns).
    * on the CPU accelerator ``zero_optimization.overlap_comm`` is set false: DeepSpeed's CPU
      accelerator has no streams (``Stream()`` is None, ``stream()`` a no-op context:
      ``deepspeed/accelerator/cpu_accelerator.py``), so nothing can overlap, and the overlap
      path only adds a second reduce buffer. The shipped JSON files are set for CUDA (true).

    Args:
        accelerator: DeepSpeed's accelerator name (``cuda``, ``cpu``, ...); default the one
            DeepSpeed selected (``get_accelerator().device_name()``).
    """
    cfg = read_deepspeed_json(run)
    cfg.update(train_micro_batch_size_per_gpu=plan.micro_batch,
               gradient_accumulation_steps=plan.accumulation,
               train_batch_size=plan.global_batch,
               gradient_clipping=float(run.grad_clip or 0.0))
    cfg["bf16"] = {"enabled": run.bf16}
    if run.bf16 and zero_stage_of(cfg) in FP32_ACCUMULATION_ZERO_STAGES:
        # DeepSpeed's key (runtime/constants.py DATA_TYPES / GRAD_ACCUM_DTYPE; default None =
        # the model dtype); its ZeRO-2/3 optimizers then keep fp32 gradient partitions.
        data_types = cfg.setdefault("data_types", {})
        data_types.setdefault("grad_accum_dtype", "fp32")
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
    if accelerator == "cpu" and isinstance(cfg.get("zero_optimization"), dict):
        cfg["zero_optimization"]["overlap_comm"] = False
    # Our AdamW groups are torch's; ZeRO accepts it with this flag.
    cfg["zero_allow_untested_optimizer"] = True
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def check_data_size(run: RunConfig, shard_sets: list[ShardSet | MixedShardSet]) -> None:
    """Refuse a stage sized in epochs whose data set is smaller than its global batch.

    The rule: a stage with ``epochs`` or ``warmup_epochs`` needs at least ``global_batch``
    training samples (at least one optimizer step per epoch), unless ``allow_small_data``.
    Below that, an epoch is shorter than one step, every step repeats chips, and the epoch
    counts of the recipe stop meaning passes (``base_gpu.yaml``'s 200 epochs of batch 4096
    on the 7-chip sample set are 1 step). A stage sized in ``samples`` states its length
    itself and is never refused (``tiny_cpu.yaml`` cycles the sample set on purpose).

    Raises:
        ConfigError: one line naming the stage, the data set, its size and the batch.
    """
    if run.allow_small_data:
        return
    for stage, shard_set in zip(run.stages, shard_sets):
        if stage.epochs is None and stage.warmup_epochs is None:
            continue
        gb, have = run.global_batch_for(stage), shard_set.num_samples
        if have >= gb:
            continue
        length = (f"{stage.epochs:g} epochs would be {math.ceil(stage.epochs * have / gb)} "
                  f"step(s)" if stage.epochs is not None else
                  f"{stage.warmup_epochs:g} warm-up epochs would be "
                  f"{math.ceil((stage.warmup_epochs or 0) * have / gb)} step(s)")
        samples = "training samples" if shard_set.split == "train" else \
            f"samples in split {show_value(shard_set.split, 40)}"
        raise ConfigError(
            f"stage {show_value(stage.name, 80)}: data set {shard_set.dataset} has {have} "
            f"{samples} but the global batch is {gb}: fewer than one step per epoch "
            f"({length}); build a larger dataset (README, 'The pipeline': python -m "
            f"pipeline.build_shards) or lower global_batch, or set allow_small_data: true to "
            f"train on it anyway")


def start_checks(run: RunConfig, shard_sets: list[ShardSet | MixedShardSet], *,
                 rank: int) -> None:
    """The checks of :func:`main` before any process group: data size, DeepSpeed JSON.

    Raises:
        ConfigError: see :func:`check_data_size` and :func:`read_deepspeed_json`.
    """
    check_data_size(run, shard_sets)
    ds = read_deepspeed_json(run)
    explicit = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if rank == 0 and run.bf16 and zero_stage_of(ds) == 1 and explicit is None:
        logger.warning("bf16 with ZeRO-1 (%s): gradients accumulate over the micro-batches in "
                       "bf16; fp32 accumulation would switch DeepSpeed to its BF16_Optimizer, "
                       "whose checkpoints training.export cannot read. ds_zero2.json accumulates "
                       "in fp32", run.deepspeed_config)


def _log_derived(run: RunConfig, stage: StageConfig, index: int, plan: StagePlan,
                 shard_set: ShardSet | MixedShardSet, model: SpectralMAE, world_size: int, device: torch.device,
                 ds_cfg: dict) -> dict:
    m = model.cfg
    enc, dec = model.encoder_parameters(), model.decoder_parameters()
    derived = {
        "event": "stage_start", "stage": stage.name, "stage_index": index,
        "dataset": f"{shard_set.dataset}/{shard_set.split}", "shards": len(shard_set.shards),
        "dataset_version": getattr(shard_set, "version", None),
        "dataset_samples": shard_set.num_samples, "img_size": m.img_size, "dates": m.num_dates,
        "gsd": getattr(shard_set, "gsd", None),
        "world_size": world_size, "device": str(device),
        "micro_batch": plan.micro_batch, "accumulation": plan.accumulation,
        "effective_batch": plan.global_batch, "blr": stage.blr, "lr": plan.peak_lr,
        "steps": plan.steps, "warmup_steps": plan.warmup_steps, "samples": plan.steps *
        plan.global_batch, "tokens_per_sample": m.num_tokens, "visible_per_sample": m.num_visible,
        "tokens_per_step": m.num_tokens * plan.global_batch,
        "encoder_tokens_per_step": m.num_visible * plan.global_batch,
        "params_encoder": enc, "params_decoder": dec, "params_total": enc + dec,
        "zero_stage": ds_cfg.get("zero_optimization", {}).get("stage", 0),
        "bf16": run.bf16, "normalisation": run.normalisation,
    }
    logger.info(
        "stage %d '%s': %s (%d shards, %d samples) at %d px | world size %d on %s | micro-batch "
        "%d x accumulation %d x %d processes = effective batch %d | lr = blr %.3g x %d / 256 = "
        "%.4g, warm-up %d of %d steps (%d samples) | tokens per step %d (%d per sample, %d seen "
        "by the encoder) | parameters: encoder %.2f M, decoder %.2f M, total %.2f M | ZeRO-%s, "
        "bf16 %s", index + 1, stage.name, derived["dataset"], len(shard_set.shards),
        shard_set.num_samples, m.img_size, world_size, device, plan.micro_batch,
        plan.accumulation, world_size, plan.global_batch, stage.blr, plan.global_batch,
        plan.peak_lr, plan.warmup_steps, plan.steps, derived["samples"],
        derived["tokens_per_step"], m.num_tokens, m.num_visible, enc / 1e6, dec / 1e6,
        (enc + dec) / 1e6, derived["zero_stage"], run.bf16)
    return derived


# --------------------------------------------------------------------------- bad data


class BadDataLog:
    """Bad-data counters in ``metrics.jsonl``: a line whenever they changed, at log steps.

    The counts travel with the batches (per data stream, cumulative for the stage) into the
    :class:`~training.data.DataPosition` that the loop's ``track`` updates. This wrapper of
    the batch iterator sums them over streams and processes (a collective at every log step,
    on every rank alike) and rank 0 writes ``{"event": "bad_data", "step", "stage",
    "bad_samples", "bad_shards"}`` after the step's loss line; :meth:`flush` ends the stage.
    """

    def __init__(self, position: DataPosition, *, rank: int, world_size: int,
                 device: torch.device, stage: str, accumulation: int, log_every: int,
                 start_step: int, start_global_step: int,
                 metrics: report.MetricsWriter | None) -> None:
        self.position, self.rank, self.world_size, self.device = position, rank, world_size, device
        self.stage, self.accumulation, self.log_every = stage, accumulation, log_every
        self.start_step, self.start_global_step = start_step, start_global_step
        self.metrics = metrics
        self.micro = 0
        self.reported = self._totals()  # a resumed stage already reported its counts

    def _totals(self) -> tuple[int, int]:
        if self.world_size > 1 and torch.distributed.is_initialized():
            counts = torch.tensor(self.position.bad_data(self.rank), dtype=torch.float64,
                                  device=self.device)  # NCCL needs device tensors
            torch.distributed.all_reduce(counts)
            samples, shards = counts.cpu().tolist()
            return int(samples), int(shards)
        return self.position.bad_data(self.rank)

    def wrap(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if self.micro and self.micro % self.accumulation == 0:
                step = self.start_step + self.micro // self.accumulation
                if step % self.log_every == 0:
                    self.flush(step)
            self.micro += 1
            yield batch

    def flush(self, stage_step: int) -> None:
        """Write a line if the counts changed (every rank calls this: it is collective)."""
        totals = self._totals()
        if totals == self.reported:
            return
        self.reported = totals
        if self.metrics is not None:
            step = self.start_global_step + stage_step - self.start_step
            self.metrics.write({"event": "bad_data", "step": step, "stage": self.stage,
                                "stage_step": stage_step, "bad_samples": totals[0],
                                "bad_shards": totals[1]})
            logger.warning("stage '%s' step %d: %d bad shard(s) skipped, %d bad sample(s) "
                           "rejected so far (on_bad_data: skip)", self.stage, stage_step,
                           totals[1], totals[0])


# --------------------------------------------------------------------------- the run


#: Top-level config keys that define the data and the optimisation: a resumed run must
#: have the checkpoint's values (``--allow-config-change`` to change them deliberately).
#: The rest is free on resume: where the run writes (``name``, ``output_dir``), when it
#: logs, saves and stops (``log_every``, ``checkpoint_every``, ``image_every``,
#: ``keep_checkpoints``, ``stop_at_step``), how it runs (``num_workers``: the data streams
#: are re-seeded and logged; ``deepspeed_config``) and ``on_bad_data``.
RESUME_KEYS = ("manifest", "dataset_version", "normalisation", "seed", "micro_batch",
               "global_batch", "weight_decay", "betas", "decay_pos_embed", "grad_clip", "bf16",
               "crop_scale", "crop_ratio", "hflip", "shuffle_buffer", "shuffle_initial")
#: The same for each stage (``stages.N.<key>``).
RESUME_STAGE_KEYS = ("dataset", "datasets", "split", "img_size", "dates", "samples", "epochs", "blr",
                     "warmup_samples", "warmup_epochs", "min_lr", "pos_embed", "micro_batch",
                     "global_batch")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(run: RunConfig, saved: dict[str, Any], saved_stage: int,
                   saved_data: dict[str, Any] | None = None,
                   shard_sets: list[ShardSet | MixedShardSet] | None = None) -> dict[str, dict[str, Any]]:
    """The data and optimisation keys whose value differs from the checkpoint's.

    Returns ``{key: {"checkpoint": old, "now": new}}`` for :data:`RESUME_KEYS`, every
    stage's :data:`RESUME_STAGE_KEYS` (``stages.N.key``) and, when the checkpoint recorded
    it, the data the resumed stage actually reads (``stages.N.data``: dataset version and
    per-band statistics, e.g. a ``dataset_version: latest`` manifest refreshed meanwhile).
    Keys a checkpoint does not record (written before they existed) are not compared.

    Raises:
        ConfigError: a change no flag allows: the model section, the stages' names, or the
            image size of a stage the checkpoint has weights for.
    """
    current = run.to_dict()
    names = [s.get("name") for s in saved.get("stages") or []]
    if names != [s["name"] for s in current["stages"]]:
        raise ConfigError(f"--resume: the checkpoint's stages {names} differ from the "
                          f"config's; resume with the config the run started with")
    # keys newer than the checkpoint (absent there) count as unchanged at their defaults
    defaults = dataclasses.asdict(ModelConfig())
    saved_model = saved.get("model") or {}
    now_model = {k: v for k, v in current["model"].items() if k in saved_model or v != defaults.get(k)}
    if saved_model != now_model:
        raise ConfigError("--resume: the model section differs from the checkpoint's; "
                          "resume with the config the run started with")
    changed: dict[str, dict[str, Any]] = {}

    def compare(key: str, old: Any, new: Any) -> None:
        if old != new:
            changed[key] = {"checkpoint": old, "now": new}

    for key in RESUME_KEYS:
        if key in saved:
            compare(key, saved[key], current[key])
    for index, (old_stage, new_stage) in enumerate(zip(saved["stages"], current["stages"])):
        for key in RESUME_STAGE_KEYS:
            if key == "img_size" and index <= saved_stage and \
                    old_stage.get(key) != new_stage.get(key):
                raise ConfigError(f"--resume: stages.{index}.img_size changed from "
                                  f"{old_stage.get(key)} to {new_stage.get(key)}, but the "
                                  f"checkpoint holds that stage's weights at "
                                  f"{old_stage.get(key)} px; keep it")
            # to_dict leaves out unset (None) stage keys: absent on both sides is equal; a
            # checkpoint from before time stacks trained single dates
            old = old_stage.get(key, 1 if key == "dates" else None)
            compare(f"stages.{index}.{key}", old, new_stage.get(key))
    if saved_data and shard_sets is not None and saved_stage < len(shard_sets):
        now = shard_sets[saved_stage].describe()
        old = {k: saved_data[k] for k in ("dataset", "split", "version", "mean", "std")
               if k in saved_data}
        new = {k: now.get(k) for k in old}
        compare(f"stages.{saved_stage}.data", old, new)
    return changed


def _check_resume_config(run: RunConfig, state: TrainerState, shard_sets: list[ShardSet | MixedShardSet],
                         *, tag: str, allow_change: bool) -> dict[str, dict[str, Any]]:
    """Refuse a resume whose data or optimisation config differs from the checkpoint's.

    A run that silently continues with another batch size, learning rate, data set or
    normalisation is a different experiment under the old one's name. With
    ``allow_change`` the changes are returned (logged and recorded by the caller).
    """
    changed = config_changes(run, state.config, state.stage_index, state.data, shard_sets)
    if changed and not allow_change:
        listed = ", ".join(f"{k} ({_show(v['checkpoint'])} -> {_show(v['now'])})"
                           for k, v in changed.items())
        raise ConfigError(f"--resume: the config differs from checkpoint {tag} in {listed}; "
                          f"resume with the config the run started with, or pass "
                          f"--allow-config-change to change it deliberately")
    return changed


def pretrain(run: RunConfig, shard_sets: list[ShardSet | MixedShardSet], resume: str | None, *,
             allow_config_change: bool = False) -> int:
    """Run all (remaining) stages. Returns the exit code.

    ``allow_config_change`` lets ``resume`` continue with data or optimisation settings
    that differ from the checkpoint's (:data:`RESUME_KEYS`); they are logged as a warning
    and recorded in ``metrics.jsonl`` as ``{"event": "config_change", "keys": [...]}``.
    """
    import deepspeed

    rank, world_size, local_rank = _init_distributed()
    device = _device(local_rank)
    run_dir = run.run_dir
    ckpt_dir = run_dir / "checkpoints"

    resume_state: TrainerState | None = None
    resume_tag = ""
    changes: dict[str, dict[str, Any]] = {}
    if resume is not None:
        ckpt_dir_found, resume_tag = checkpoint.resolve(Path(resume) if resume else run_dir)
        resume_state = checkpoint.read_state(ckpt_dir_found, resume_tag)
        # Every rank, before DeepSpeed unpickles anything (it does not use weights_only).
        checkpoint.check_weights_only(ckpt_dir_found / resume_tag)
        changes = _check_resume_config(run, resume_state, shard_sets, tag=resume_tag,
                                       allow_change=allow_config_change)
        if ckpt_dir_found.resolve() != ckpt_dir.resolve():
            ckpt_dir = ckpt_dir_found
            run_dir = ckpt_dir.parent
    elif (ckpt_dir / checkpoint.LATEST).is_file():
        raise CheckpointError(f"'{run_dir}' already holds checkpoints: pass --resume to "
                              f"continue it, or set name/output_dir for a new run")

    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text_atomic(run_dir / "config.yaml", dump_config(run), "the run config")
        handler = _LogFile(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    trackers = Trackers(run.tracking, run_dir, run.name, run.to_dict()) if rank == 0 and run.tracking else None
    metrics = report.MetricsWriter(run_dir / "metrics.jsonl", trackers) if rank == 0 else None
    if resume_state is not None:
        logger.info("resuming %s: stage '%s' step %d/%d, run step %d (saved with %d "
                    "processes, now %d)", ckpt_dir / resume_tag, resume_state.stage_name,
                    resume_state.step_in_stage, resume_state.stage_steps,
                    resume_state.global_step, resume_state.world_size, world_size)
        if changes:
            logger.warning("--allow-config-change: resuming %s with a changed config: %s",
                           resume_tag, "; ".join(f"{k} {_show(v['checkpoint'])} -> "
                                                 f"{_show(v['now'])}" for k, v in changes.items()))
            if metrics is not None:
                metrics.write({"event": "config_change", "step": resume_state.global_step,
                               "stage": resume_state.stage_name, "checkpoint": resume_tag,
                               "keys": list(changes), "changes": changes})

    plans = [plan_stage(run, s, ss, world_size) for s, ss in zip(run.stages, shard_sets)]
    start_stage = resume_state.stage_index if resume_state else 0
    global_step = resume_state.global_step if resume_state else 0
    samples_seen = resume_state.samples_seen if resume_state else 0
    weights: dict[str, torch.Tensor] | None = None
    for index in range(start_stage, len(run.stages)):
        stage, shard_set, plan = run.stages[index], shard_sets[index], plans[index]
        resume_here = resume_state is not None and index == start_stage
        torch.manual_seed(run.seed + index)
        model = SpectralMAE(run.model_for(stage))
        if weights is not None:
            model.load_state_dict(adapt_state_dict(weights, model, stage.pos_embed))
            logger.info("stage '%s' starts from stage '%s' weights (spatial position tables: "
                        "%s)", stage.name, run.stages[index - 1].name, stage.pos_embed)
        checkpoint.mark_universal(model)
        universal = resume_here and resume_state.world_size != world_size  # type: ignore[union-attr]
        ds_cfg = deepspeed_config(run, plan, load_universal=universal)
        optimizer = torch.optim.AdamW(param_groups(model, run.weight_decay, run.decay_pos_embed),
                                      lr=0.0, betas=run.betas)
        derived = _log_derived(run, stage, index, plan, shard_set, model, world_size, device,
                               ds_cfg) if rank == 0 else {}
        engine, *_ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                          config=ds_cfg)
        num_workers = max(run.num_workers, 1)
        if resume_here:
            assert resume_state is not None
            tag = checkpoint.universal_tag(ckpt_dir, resume_tag) if universal else resume_tag
            if universal:
                checkpoint.check_weights_only(ckpt_dir / tag)
            loaded, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag,
                                               load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
            if resume_state.stage_steps != plan.steps:
                logger.warning("stage '%s' now has %d steps (the checkpoint's run had %d): the "
                               "LR schedule follows the new length", stage.name, plan.steps,
                               resume_state.stage_steps)
            # The run goes on with this config: later checkpoints record it, so a next
            # resume compares against what the run actually trained with from here on.
            state = dataclasses.replace(resume_state, world_size=world_size,
                                        stage_steps=plan.steps, data=shard_set.describe(),
                                        config=run.to_dict())
            position = DataPosition.from_dict(state.data_position).resumed(world_size,
                                                                           num_workers)
        else:
            state = TrainerState(index, stage.name, 0, plan.steps, global_step, samples_seen,
                                 world_size, {}, run.to_dict(), shard_set.describe())
            position = DataPosition.start(world_size, num_workers)
        if metrics is not None:
            metrics.write({**derived, "step": state.global_step,
                           "resumed_at_stage_step": state.step_in_stage if resume_here else None})

        bad_data = BadDataLog(position, rank=rank, world_size=world_size, device=device,
                              stage=stage.name, accumulation=plan.accumulation,
                              log_every=run.log_every, start_step=state.step_in_stage,
                              start_global_step=state.global_step, metrics=metrics)

        def make_batches(pos: DataPosition, num_batches: int, *, _stage: StageConfig = stage,
                         _index: int = index, _ss: ShardSet | MixedShardSet = shard_set,
                         _mb: int = plan.micro_batch,
                         _log: BadDataLog = bad_data) -> Iterator[dict[str, Any]]:
            def one(part: ShardSet) -> ShardStream:
                return ShardStream(part, run, _stage, stage_index=_index, rank=rank,
                                   world_size=world_size, position=pos)

            stream: ShardStream | MixedStream = (
                MixedStream([one(p) for p in _ss.parts], _ss.weights, _mb)
                if isinstance(_ss, MixedShardSet) else one(_ss))
            loader = make_loader(stream, micro_batch=_mb, num_workers=run.num_workers,
                                 num_batches=num_batches, pin_memory=device.type == "cuda")
            return _log.wrap(iterate(loader))

        ctx = StageContext(
            engine=engine, run=run, stage=stage, model_cfg=model.cfg,
            schedule=Schedule(plan.peak_lr, stage.min_lr, plan.warmup_steps, plan.steps),
            state=state, position=position, make_batches=make_batches,
            accumulation=plan.accumulation, micro_batch=plan.micro_batch,
            global_batch=plan.global_batch, rank=rank, world_size=world_size, device=device,
            dtype=torch.bfloat16 if run.bf16 else torch.float32, run_dir=run_dir,
            bands=shard_set.bands,
            run_steps_left=sum(p.steps for p in plans[index:]) - state.step_in_stage,
            trackers=trackers)
        result = train_stage(ctx)
        bad_data.flush(result.state.step_in_stage)
        if rank == 0:
            report.plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        if result.stopped:
            engine.destroy()
            if trackers is not None:
                trackers.close()
            return 0
        global_step, samples_seen = result.state.global_step, result.state.samples_seen
        if index + 1 < len(run.stages):
            weights = checkpoint.full_fp32_state_dict(engine)
        engine.destroy()
        del engine, model, optimizer
        gc.collect()
    if rank == 0:
        logger.info("done: %d steps; metrics %s, checkpoints %s, images %s, loss curve %s",
                    global_step, run_dir / "metrics.jsonl", ckpt_dir, run_dir / "images",
                    run_dir / "loss_curve.png")
    if trackers is not None:
        trackers.close()  # (an exception ends the process, whose exit hooks flush them)
    return 0


def main(argv: list[str] | None = None, prog: str = "deepspeed training/pretrain.py") -> int:
    """CLI entry; returns the exit code (0 ok, 1 non-finite loss, 2 user error, 6 disk full)."""
    args = build_parser(prog).parse_args(argv)
    try:  # srun / mpirun: their variables, before anything reads RANK
        os.environ.update(launcher_env(os.environ))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    if args.allow_config_change and args.resume is None:
        if rank == 0:
            print("error: --allow-config-change only applies to --resume", file=sys.stderr)
        return 2
    try:
        run = load_config(args.config, args.overrides)
        # Check every stage's data before starting processes' collectives: errors stay one line.
        shard_sets = [read_stage_data(run.manifest, [(d.name, d.weight) for d in run.stage_datasets(s)],
                                      s.split, run.model_for(s), version=run.dataset_version)
                      for s in run.stages]
        start_checks(run, shard_sets, rank=rank)
        return pretrain(run, shard_sets, args.resume,
                        allow_config_change=args.allow_config_change)
    except TrainingError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def command_main(argv: list[str] | None = None, prog: str = "deepspeed training/pretrain.py") -> int:
    """:func:`main` as a process's command (the script, ``python -m``, ``spectralgpt
    pretrain``): the process group is torn down before the interpreter exits. (In-process
    callers, the tests, use :func:`main`: DeepSpeed keeps its groups for the next run.)"""
    try:
        return main(argv, prog)
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    """Tear the process group down before the interpreter does: left to interpreter exit,
    its C++ threads were seen to end a stopped run with "terminate called without an active
    exception" (SIGABRT) after it had saved and said so, failing the launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer gone already: nothing left to tear down
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(command_main())
