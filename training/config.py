"""Typed configuration of the trainer: one YAML file plus ``--set key=value`` overrides.

Three frozen dataclasses, validated on construction:

* :class:`ModelConfig` - the architecture and the objective (what a checkpoint needs to be
  rebuilt). Presets live as factory functions at the bottom of
  ``training/models/spectral_mae.py``.
* :class:`StageConfig` - one progressive-pretraining stage (data set, image size, length,
  learning rate, warm-up).
* :class:`RunConfig` - everything else: optimiser, batch sizes, DeepSpeed file, data
  loading, outputs, and the list of stages.

YAML layout (see ``training/configs/tiny_cpu.yaml``)::

    name: tiny_cpu
    manifest: datasets/europe/manifest.json
    model: {preset: tiny, mask_ratio: 0.9}
    micro_batch: 4
    global_batch: 8
    stages:
      - {name: s96, dataset: s96_g10m, img_size: 96, samples: 1600, blr: 0.1}
      - {name: s128, dataset: s128_g10m, img_size: 128, samples: 640, blr: 0.05}

Unknown keys anywhere are rejected with one line naming the key (timm ``args.yaml`` and
nanoGPT ``GPTConfig`` are the models; nanoGPT's ``exec``-based configurator is avoided).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# one safe YAML reader for both config loaders (no aliases, bounded nesting and size) and the
# capped value display used in messages: a value from a file can be huge, an error is one line
from pipeline.config import parse_config_yaml, read_config_yaml, show_value
from spectralgpt.shipped import find_config, package_folder, shipped_names
from training.errors import ConfigError

#: Directory holding the shipped YAML and DeepSpeed JSON files.
CONFIG_DIR = package_folder("training", "configs")
#: Used when ``pretrain.py`` gets no ``--config``.
DEFAULT_CONFIG = CONFIG_DIR / "tiny_cpu.yaml"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and objective of the SpectralGPT masked autoencoder.

    Defaults are the official ``mae_vit_base_patch8_128`` builder
    (``models_mae_spectral.py`` L493-509 of danfenghong/IEEE_TPAMI_SpectralGPT).
    """

    img_size: int = 128
    """Square input side in pixels; must be a multiple of ``patch_size``. Set per stage."""
    num_bands: int = 12
    """Spectral axis length (the official code's ``num_frames``): 12 Sentinel-2 L2A bands."""
    patch_size: int = 8
    """Spatial side of one token in pixels (official: 8)."""
    band_patch_size: int = 3
    """Bands per token (official ``t_patch_size`` = 3, giving 4 spectral groups of 12 bands)."""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    """Official decoder width 512 (constructor default, never overridden)."""
    decoder_depth: int = 4
    """Official SpectralGPT uses 4 decoder blocks (MAE and MAE-ST use 8)."""
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.9
    """Fraction of 3D tokens removed; the README passes 0.90 (argparse default is 0.75)."""
    token_loss_weight: float = 1.0
    """Weight of the masked-token MSE ("token-to-token" term)."""
    spectral_loss_weight: float = 1.0
    """Weight of the MSE of the spectral-group sums over all positions ("spectral-to-spectral")."""
    norm_pix_loss: bool = False
    """Normalise each token's target for the token term only (official: off)."""
    num_dates: int = 1
    """Dates per sample T: 1 for single-date chips ``[12, H, W]``, T for time stacks
    ``[T, 12, H, W]`` (4D tokens over date, group, row, column). Set per stage from its data."""
    date_encoding: Literal["sincos", "learned", "none"] = "sincos"
    """Position of each date of a stack (T > 1 only; single dates get none, as the official
    model): ``sincos`` from the acquisition date (year and day of year, SatMAE / Prithvi-EO-2.0:
    revisits are irregular), ``learned`` a table over the date index (``max_dates`` rows,
    parameters ``pos_embed_date`` / ``decoder_pos_embed_date``), ``none``."""
    max_dates: int = 16
    """Rows of the learned date tables (the longest stack a ``learned`` model takes)."""
    masking: Literal["random", "tube"] = "random"
    """``random``: tokens removed independently over all dates (MAE); ``tube``: the same
    (group, row, column) tokens removed at every date of a stack (as video MAEs' tubes)."""
    gsd_encoding: bool = False
    """Add a ground-distance-aware spatial encoding (Scale-MAE): 2D sin-cos of the token grid
    scaled by ``gsd / reference_gsd`` (the sample JSON ``gsd``), so one model trains on
    10 m, 20 m and coarser chips. Off: the spatial table is the official one alone."""
    reference_gsd: float = 10.0
    """Ground distance (m/px) at which the GSD encoding's grid steps are 1."""
    encoding_scale: float = 0.1
    """Factor on the sin-cos date and GSD encodings (unit amplitude) before they are added to
    tokens whose learned tables start at std 0.02 (Prithvi-EO-2.0 starts its scale at 0.1)."""

    def __post_init__(self) -> None:
        for name in ("img_size", "num_bands", "patch_size", "band_patch_size", "embed_dim",
                     "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                     "decoder_num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of "
                              f"model.patch_size {self.patch_size}")
        if self.num_bands % self.band_patch_size:
            raise ConfigError(f"model.num_bands {self.num_bands} is not a multiple of "
                              f"model.band_patch_size {self.band_patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"model.embed_dim {self.embed_dim} is not divisible by "
                              f"model.num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(f"model.decoder_embed_dim {self.decoder_embed_dim} is not divisible "
                              f"by model.decoder_num_heads {self.decoder_num_heads}")
        if not 1 <= self.num_dates <= 366:
            raise ConfigError(f"model.num_dates must be in 1..366, got {self.num_dates}")
        if self.date_encoding == "learned" and self.num_dates > self.max_dates:
            raise ConfigError(f"model.num_dates {self.num_dates} exceeds model.max_dates {self.max_dates} "
                              "(rows of the learned date table)")
        if (self.date_encoding == "sincos" or self.gsd_encoding) and (self.embed_dim % 4 or self.decoder_embed_dim % 4):
            raise ConfigError("model.embed_dim and model.decoder_embed_dim must be multiples of 4 for the "
                              "sin-cos date and GSD encodings")
        if not self.reference_gsd > 0:
            raise ConfigError(f"model.reference_gsd must be > 0, got {self.reference_gsd}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.num_visible < 1:
            raise ConfigError(f"model.mask_ratio {self.mask_ratio} leaves no visible token "
                              f"out of {self.num_tokens}")

    @property
    def num_groups(self) -> int:
        """Spectral groups = tokens along the band axis (4 for 12 bands x 3)."""
        return self.num_bands // self.band_patch_size

    @property
    def grid_size(self) -> int:
        """Tokens along one spatial side (12 at 96 px, 16 at 128 px)."""
        return self.img_size // self.patch_size

    @property
    def num_spatial(self) -> int:
        """Spatial positions L = grid_size ** 2 (144 at 96 px, 256 at 128 px)."""
        return self.grid_size**2

    @property
    def tokens_per_date(self) -> int:
        """3D tokens of one date, groups x spatial (576 at 96 px, 1024 at 128 px)."""
        return self.num_groups * self.num_spatial

    @property
    def num_tokens(self) -> int:
        """Tokens per sample N = dates x groups x spatial (one date: 576 at 96 px, 1024 at 128 px)."""
        return self.num_dates * self.tokens_per_date

    @property
    def num_visible(self) -> int:
        """Tokens the encoder sees: ``int(N * (1 - mask_ratio))`` as in MAE (57 / 102 for one
        date); with tube masking, that many per date times the dates."""
        if self.masking == "tube":
            return self.num_dates * int(self.tokens_per_date * (1 - self.mask_ratio))
        return int(self.num_tokens * (1 - self.mask_ratio))

    @property
    def patch_dim(self) -> int:
        """Values per token = band_patch_size x patch_size^2 (192)."""
        return self.band_patch_size * self.patch_size**2


Normalisation = Literal["dataset_stats", "per_image_minmax"]
PosEmbedInit = Literal["interpolate", "reinit"]


@dataclass(frozen=True)
class DatasetWeight:
    """One dataset of a mixed stage and its share of the micro-batches."""

    name: str
    """Data set name in ``manifest.json``."""
    weight: float = 1.0
    """Relative share: micro-batches are drawn from the datasets in proportion to it."""


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of progressive pretraining (official: 96 px fMoW-S2, then 128 px BigEarthNet)."""

    name: str
    """Label used in logs, metrics and checkpoint metadata."""
    dataset: str | None = None
    """Data set name in ``manifest.json`` (``datasets`` key), e.g. ``s96_g10m``; or use
    ``datasets``."""
    datasets: tuple[DatasetWeight, ...] = ()
    """Several data sets drawn with weights, e.g. ``[{name: s96_g10m, weight: 2}, {name:
    s96_g20m, weight: 1}]``: each micro-batch comes whole from one of them (uniform shapes),
    chosen by a seeded draw, so the mix is deterministic and resumes exactly. All must hold
    the stage's ``dates``; each is normalised with its own statistics."""
    img_size: int
    """Training image side in pixels (random-resized crops are resized to this)."""
    dates: int = 1
    """Dates per sample: 1 for single-date datasets (``[12, H, W]`` chips), T for time-stack
    datasets (``[T, 12, H, W]``, e.g. ``s96_g10m_t3``); checked against the dataset's layout."""
    split: str = "train"
    samples: int | None = None
    """Stage length in samples; exactly one of ``samples`` / ``epochs``."""
    epochs: float | None = None
    """Stage length in passes over the split's ``num_samples`` (from the manifest)."""
    blr: float = 2e-4
    """Base LR; absolute LR = blr x global_batch / 256 (official: 2e-4 stage 1, 1e-4 stage 2)."""
    warmup_samples: int | None = None
    """Linear warm-up length in samples; or use ``warmup_epochs``; default no warm-up."""
    warmup_epochs: float | None = None
    min_lr: float = 0.0
    """Floor of the half-cycle cosine (official: 0)."""
    pos_embed: PosEmbedInit = "interpolate"
    """How this stage's spatial position tables start from the previous stage's when the
    grid changes: ``interpolate`` (bicubic, our default) or ``reinit`` (trunc-normal, the
    official behaviour, ``main_pretrain.py`` L199-216)."""
    micro_batch: int | None = None
    """Per-process micro-batch for this stage; default: the run's ``micro_batch``."""
    global_batch: int | None = None
    """Effective batch for this stage; default: the run's ``global_batch``."""

    def __post_init__(self) -> None:
        where = f"stage {show_value(self.name, 80)}"
        if (self.dataset is None) == (not self.datasets):
            raise ConfigError(f"{where}: set exactly one of 'dataset' or 'datasets'")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: a data set is listed twice in 'datasets'")
        if any(not (d.weight > 0 and math.isfinite(d.weight)) for d in self.datasets):
            raise ConfigError(f"{where}: every 'datasets' weight must be a positive number")
        if (self.samples is None) == (self.epochs is None):
            raise ConfigError(f"{where}: set exactly one of 'samples' or 'epochs'")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"{where}: samples must be >= 1, got {self.samples}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}: epochs must be > 0, got {self.epochs}")
        if self.warmup_samples is not None and self.warmup_epochs is not None:
            raise ConfigError(f"{where}: set at most one of 'warmup_samples' or 'warmup_epochs'")
        if self.blr <= 0:
            raise ConfigError(f"{where}: blr must be > 0, got {self.blr}")
        if self.img_size < 1:
            raise ConfigError(f"{where}: img_size must be >= 1, got {self.img_size}")
        if not 1 <= self.dates <= 366:
            raise ConfigError(f"{where}: dates must be in 1..366, got {self.dates}")


@dataclass(frozen=True)
class RunConfig:
    """Everything about a pretraining run except the architecture numbers."""

    stages: tuple[StageConfig, ...]
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture; ``img_size`` is replaced by each stage's ``img_size``."""
    model_preset: str = "base"
    """Name of the preset the model section started from (recorded in checkpoints/exports)."""
    name: str = "run"
    output_dir: str | None = None
    """Run directory; default ``runs/<name>`` relative to the working directory."""
    seed: int = 0
    manifest: str = "datasets/europe/manifest.json"
    """The pipeline's ``manifest.json`` (contract: docs/DATASET_FORMAT.md): a path or an
    fsspec URL such as ``s3://bucket/prefix/manifest.json`` (credentials and endpoint from
    the usual AWS_* environment); shard paths in it are relative to its folder."""
    dataset_version: int | Literal["latest"] = "latest"
    """``latest``: every shard of the manifest (its cumulative ``datasets``). ``N``: the
    shards that versions 1..N added and the statistics of version N (a pinned run)."""
    on_bad_data: Literal["skip", "fail"] = "skip"
    """A shard that is truncated or corrupt, or a sample whose array is not uint16
    ``[C, chip, chip]`` (pickled arrays included): ``skip`` it with a warning and count it
    (``bad_shards`` / ``bad_samples`` lines in metrics.jsonl), or ``fail`` the run (exit 2)."""
    tracking: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ()
    """Where metrics.jsonl's records also go (training/tracking.py): TensorBoard event files
    in ``<run dir>/tensorboard``, Weights & Biases, MLflow (configured by their own
    environment variables). Off by default: nothing leaves the machine unless named here."""
    deepspeed_config: str = "ds_zero2.json"
    """DeepSpeed JSON: a path, or a file name in ``training/configs/`` (ds_zero1/2/3.json).
    Batch size, accumulation, clipping and bf16 in it are overwritten from this config; a bf16
    run with ZeRO-2/3 also gets fp32 gradient accumulation (``data_types.grad_accum_dtype``)
    unless the file sets it, and on the CPU accelerator ``overlap_comm`` is turned off
    (``training.pretrain.deepspeed_config``)."""
    bf16: bool = True
    micro_batch: int = 16
    """Samples per process per forward pass (official: 16)."""
    global_batch: int = 4096
    """Effective batch = micro_batch x accumulation x world size (official: 4096); the
    accumulation is derived so the schedule does not depend on the number of processes."""
    grad_clip: float | None = 1.0
    """Global-norm clipping (0 or null: off; the official code does not clip)."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    decay_pos_embed: bool = False
    """Apply weight decay to position tables and mask token (timm 0.4.12 did: official)."""
    normalisation: Normalisation = "dataset_stats"
    """``dataset_stats``: (x - mean) / std from the manifest; ``per_image_minmax``: per image
    and band to [0, 1] (the official pretraining choice, ``util/datasets.py`` L408-422)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range (official: 0.2-1.0, bicubic) followed by horizontal flip."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer."""
    shuffle_initial: int = 100
    """Samples collected before the shuffle buffer yields its first sample."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    log_every: int = 10
    """Steps between metric lines."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (also saved at the end of every stage)."""
    image_every: int = 1000
    """Steps between reconstruction PNGs (also at the end of every stage)."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk (older ones are deleted after a new one is complete)."""
    stop_at_step: int | None = None
    """Save a checkpoint and stop once the global step reaches this value (time-boxed jobs,
    tests); ``--resume`` continues from there."""
    allow_small_data: bool = False
    """Start although a stage sized in epochs (``epochs`` or ``warmup_epochs``) has fewer
    training samples than its global batch, i.e. less than one optimizer step per epoch
    (refused otherwise, exit 2: ``base_gpu.yaml`` on a sample-sized dataset would "train"
    its 200 epochs in a step or two). Stages sized in ``samples`` are never refused."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("config has no stages: add at least one entry under 'stages'")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {show_value(names)}")
        for stage in self.stages:
            # Validates the image size against the patch size with the model's own checks.
            self.model_for(stage)
            mb = stage.micro_batch or self.micro_batch
            gb = stage.global_batch or self.global_batch
            if mb < 1 or gb < 1:
                raise ConfigError(f"stage {show_value(stage.name, 80)}: micro_batch and global_batch must be >= 1")
            if gb % mb:
                raise ConfigError(f"stage {show_value(stage.name, 80)}: global_batch {gb} is not a multiple "
                                  f"of micro_batch {mb}")
        if not 0 <= self.weight_decay:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("log_every", "checkpoint_every", "image_every", "keep_checkpoints",
                     "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_initial < 0:
            raise ConfigError("num_workers and shuffle_initial must be >= 0")
        if self.dataset_version != "latest" and self.dataset_version < 1:
            raise ConfigError(f"dataset_version must be 'latest' or >= 1, got "
                              f"{self.dataset_version}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"stop_at_step must be >= 1, got {self.stop_at_step}")

    def model_for(self, stage: StageConfig) -> ModelConfig:
        """The model configuration of ``stage`` (the run's model at the stage's image size
        and number of dates)."""
        return dataclasses.replace(self.model, img_size=stage.img_size, num_dates=stage.dates)

    def micro_batch_for(self, stage: StageConfig) -> int:
        return stage.micro_batch or self.micro_batch

    def global_batch_for(self, stage: StageConfig) -> int:
        return stage.global_batch or self.global_batch

    @staticmethod
    def stage_datasets(stage: StageConfig) -> tuple[DatasetWeight, ...]:
        """The stage's data sets with their weights (one of weight 1 for ``dataset``)."""
        return stage.datasets or (DatasetWeight(stage.dataset or ""),)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def deepspeed_config_path(self) -> Path:
        """Resolve ``deepspeed_config``: an existing path, else a file in ``training/configs``."""
        path = find_config(self.deepspeed_config, CONFIG_DIR, ".json")
        if path.is_file():
            return path
        raise ConfigError(f"deepspeed_config {show_value(self.deepspeed_config, 200)} not found (neither a path "
                          f"nor a shipped config: {shipped_names(CONFIG_DIR, '.json')})")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON safe) that :func:`config_from_dict` reads back."""
        data = dataclasses.asdict(self)
        preset = data.pop("model_preset")
        model = data.pop("model")
        model.pop("img_size")
        model.pop("num_dates")  # per stage, as img_size
        data["model"] = {"preset": preset, **model}
        data["stages"] = [{k: (list(v) if k == "datasets" else v) for k, v in s.items()
                           if v is not None and not (k == "datasets" and not v)} for s in data["stages"]]
        for key in ("betas", "crop_scale", "crop_ratio", "tracking"):
            data[key] = list(data[key])
        return data


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _key(name: Any) -> str:
    """A config key as messages quote it: as written when short, capped otherwise."""
    return name if isinstance(name, str) and len(name) <= 80 else show_value(name, 80)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples, ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{_key(where)}' must be one of {list(args)}, got {show_value(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{_key(where)}' must be a list, got {show_value(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{_key(where)}' must have {len(args)} items, got {show_value(value)}")
        return tuple(_coerce(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{_key(where)}' must be {_type_name(tp)}, got {show_value(value)}")


def _build(cls: Any, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{_key(where)}' must be a mapping, got {show_value(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{_key(f'{prefix}{key}')}' (known: {', '.join(known)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"config section '{_key(where or 'top level')}': {exc}") from None


def _model_config(data: Any) -> tuple[str, ModelConfig]:
    # Imported here: the model module imports ModelConfig from this one.
    from training.models.spectral_mae import PRESETS

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'model' must be a mapping, got {show_value(data)}")
    data = dict(data)
    preset = data.pop("preset", "base")
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {show_value(preset)} (known: {', '.join(PRESETS)})")
    if "img_size" in data:
        raise ConfigError("config key 'model.img_size' is set per stage: use 'stages.N.img_size'")
    if "num_dates" in data:
        raise ConfigError("config key 'model.num_dates' is set per stage: use 'stages.N.dates'")
    base = dataclasses.asdict(PRESETS[preset]())
    base.update(data)
    return preset, _build(ModelConfig, base, "model")


def config_from_dict(data: Any) -> RunConfig:
    """Build a :class:`RunConfig` from plain data (a parsed YAML document)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a YAML mapping, got {type(data).__name__}")
    data = dict(data)
    preset, model = _model_config(data.pop("model", None))
    stages = data.pop("stages", None)
    if not isinstance(stages, list):
        raise ConfigError("config key 'stages' must be a list of stage mappings")
    data["stages"] = stages
    run = _build(RunConfig, {**data, "model": dataclasses.asdict(model)}, "")
    # Record the first stage's image size in the run's model (each stage replaces it).
    return dataclasses.replace(run, model_preset=preset,
                               model=run.model_for(run.stages[0]))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub.0.name=value`` overrides (values parsed as YAML) to a config mapping.

    A numeric path element indexes a list (``stages.1.samples=100``).
    """
    for item in overrides:
        shown = _key(item)
        if "=" not in item:
            raise ConfigError(f"override '{shown}' must look like key=value (e.g. stages.0.samples=64)")
        path, raw = item.split("=", 1)
        try:
            value = parse_config_yaml(raw)
        except ValueError as exc:
            raise ConfigError(f"override '{shown}': value is not valid YAML ({exc})") from None
        keys = path.strip().split(".")
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"override '{shown}': '{_key(key)}' is not an index of a "
                                      f"{len(node)}-item list")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
            else:
                raise ConfigError(f"override '{shown}': '{_key('.'.join(keys[:i]))}' is not a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (default ``training/configs/tiny_cpu.yaml``) and apply overrides.

    A bare name that is not a file here (``base_gpu``, ``tiny_cpu.yaml``) is looked up among
    the shipped configs, so an installed package needs no source tree.
    """
    path = find_config(path, CONFIG_DIR) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (shipped configs: "
                          f"{shipped_names(CONFIG_DIR)})")
    try:
        data = read_config_yaml(path)  # refuses aliases ("billion laughs"), deep nesting, huge files
    except ValueError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (written to ``<run_dir>/config.yaml`` and checkpoints)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
