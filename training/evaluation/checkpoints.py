"""Load an encoder to evaluate, and the input normalisation that goes with it.

Accepted ``--checkpoint`` values:

* an export of ``python -m training.export``: ``.safetensors`` (config in its metadata and
  in the ``.json`` beside it) or ``.pt`` (``{"model": weights, "config": info}``);
* a DeepSpeed run directory, its ``checkpoints/`` folder or a ``global_stepN`` folder
  (consolidated to fp32 as the exporter does);
* the official ``SpectralGPT.pth`` / ``SpectralGPT+.pth`` (``{"model": state_dict, ...}`` or
  a bare state dict with the official key layout, ``module.`` prefixes allowed). The
  architecture is read from the tensor shapes; the head counts, which shapes do not carry,
  come from the preset with the same width and depth;
* an official fine-tuned classifier (``main_finetune.py`` with ``models_vit_tensor``: a
  ``head.weight`` and no ``decoder_embed.weight``), same wrappers: ``kind``
  ``official_classifier``, its architecture in ``Checkpoint.classifier``
  (:class:`~training.evaluation.official.ClassifierSpec`), the model is
  :class:`~training.evaluation.official.OfficialClassifier` (``python -m training.predict``).
  It has no MAE decoder and (as run) a joint position table, so :func:`build_mae` refuses it.
  Official dense models (SegMunich / OSCD, UPerNet heads) are refused in one line.

Files are read with ``torch.load(weights_only=True)``; ``argparse.Namespace`` (the ``args``
entry MAE-style checkpoints carry) is the one extra type allowed.

Normalisation (``auto``): the pretraining run's own choice. ``dataset_stats`` uses the
per-band mean/std of the pretraining data set (export info ``stats`` if present, else the
manifest named in the run config); ``per_image_minmax`` is the official SpectralGPT
choice and the fallback for official weights or when the statistics cannot be found. The
results record which one was used and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from training.config import ModelConfig, config_from_dict
from training.errors import TrainingError
from training.evaluation.errors import EvaluationError
from training.evaluation.official import ClassifierSpec, classifier_spec, count_layers, official_layout
from training.evaluation.readers import model_bands
from training.models.spectral_mae import PRESETS, SpectralMAE, load_official_state_dict

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "spectralgpt-mae-weights/1"  # training/export.py EXPORT_FORMAT
NormMode = Literal["auto", "dataset_stats", "per_image_minmax"]


@dataclass
class Checkpoint:
    """Weights with the official key layout, the architecture and where they came from."""

    state: dict[str, Tensor]
    config: ModelConfig
    kind: str
    """``exported``, ``deepspeed``, ``official`` (pretrained MAE) or ``official_classifier``
    (fine-tuned ``models_vit_tensor`` classifier: ``config`` holds its encoder's sizes only)."""
    path: Path
    run_config: dict[str, Any] | None = None
    """The pretraining ``RunConfig.to_dict()`` when known (exports, DeepSpeed dirs)."""
    info: dict[str, Any] = field(default_factory=dict)
    classifier: ClassifierSpec | None = None
    """The architecture of an ``official_classifier``; None for every other kind."""

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "model": asdict(self.config),
                **{k: v for k, v in self.info.items() if k in ("preset", "stage", "global_step")}}


@dataclass(frozen=True)
class Normalisation:
    mode: Literal["dataset_stats", "per_image_minmax"]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "source": self.source,
                **({"mean": list(self.mean or ()), "std": list(self.std or ())}
                   if self.mode == "dataset_stats" else {})}


# --------------------------------------------------------------------------- reading files


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise EvaluationError(f"cannot read checkpoint '{path}' as weights "
                              f"(torch.load weights_only): {str(exc).splitlines()[0]}") from None


def infer_config(state: dict[str, Tensor], preset: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of an official-layout state dict, from its tensor shapes."""
    try:
        w = state["patch_embed.proj.weight"]  # [D, 1, u, p, p]
        spatial = state["pos_embed_spatial"].shape[1]
        groups = state["pos_embed_temporal"].shape[1]
        dec = state["decoder_embed.weight"].shape[0]
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise EvaluationError(f"checkpoint lacks {exc} : not the SpectralGPT key layout") from None
    d, u, p = w.shape[0], w.shape[2], w.shape[3]
    depth, dec_depth = count_layers(state, "blocks"), count_layers(state, "decoder_blocks")
    grid = math.isqrt(spatial)
    candidates = [preset] if preset else list(PRESETS)
    for name in candidates:
        if name not in PRESETS:
            raise EvaluationError(f"unknown --preset '{name}' (known: {', '.join(PRESETS)})")
        ref = PRESETS[name]()
        if ref.embed_dim == d and ref.depth == depth or preset:
            return replace(ref, img_size=grid * p, patch_size=p, band_patch_size=u,
                           num_bands=groups * u, embed_dim=d, depth=depth,
                           decoder_embed_dim=dec, decoder_depth=dec_depth,
                           mlp_ratio=hidden / d)
    raise EvaluationError(f"no preset has width {d} and depth {depth}: pass --preset to say "
                          f"which head counts to use")


def load_checkpoint(path: str | Path, preset: str | None = None, *,
                    num_heads: int | None = None) -> Checkpoint:
    """Read any supported checkpoint (module doc) without building the model yet.

    ``num_heads`` overrides the head count of an official fine-tuned classifier (otherwise
    from ``preset`` or the preset of the same width and depth).

    Raises:
        EvaluationError: the path is missing or is none of the supported kinds (one line
            naming the layout for official dense models).
    """
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"--checkpoint '{p}' not found")
    if p.is_dir():
        return _load_deepspeed(p)
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(p))
        except Exception as exc:
            raise EvaluationError(f"cannot read '{p}' as safetensors: {exc}") from None
        info = json.loads(meta["spectralgpt"]) if "spectralgpt" in meta else None
        if info is None and p.with_suffix(".json").is_file():
            info = json.loads(p.with_suffix(".json").read_text())
        return _from_state(p, state, info, preset, num_heads)
    obj = _torch_load(p)
    if not isinstance(obj, dict):
        raise EvaluationError(f"'{p}' holds a {type(obj).__name__}, not a state dict")
    info = obj.get("config") if isinstance(obj.get("config"), dict) else None
    state = obj.get("model", obj)
    if not isinstance(state, dict):
        raise EvaluationError(f"'{p}': the 'model' entry is not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    return _from_state(p, state, info, preset, num_heads)


def _from_state(p: Path, state: dict[str, Tensor], info: dict[str, Any] | None,
                preset: str | None, num_heads: int | None = None) -> Checkpoint:
    if info is not None and info.get("format") == EXPORT_FORMAT:
        run_config = _source_run_config(info)
        return Checkpoint(state, ModelConfig(**info["model"]), "exported", p, run_config, info)
    try:
        layout = official_layout(state)
        if layout == "dense":
            raise EvaluationError("official dense (UPerNet) checkpoints are not supported yet "
                                  "(SegMunich / OSCD: cls_seg, decoder.PPMHead keys)")
        if layout == "classifier":
            spec = classifier_spec(state, preset=preset, num_heads=num_heads)
            config = _classifier_config(spec)
            return Checkpoint(state, config, "official_classifier", p, None,
                              {"num_classes": spec.num_classes}, classifier=spec)
    except EvaluationError as exc:
        raise EvaluationError(f"--checkpoint '{p}': {exc}") from None
    return Checkpoint(state, infer_config(state, preset), "official", p, None, {})


def _classifier_config(spec: ClassifierSpec) -> ModelConfig:
    """The encoder sizes of a classifier as a :class:`ModelConfig` (decoder fields: defaults)."""
    try:
        return ModelConfig(img_size=spec.img_size, num_bands=spec.num_bands,
                           patch_size=spec.patch_size, band_patch_size=spec.band_patch_size,
                           embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                           mlp_ratio=spec.mlp_ratio, date_encoding="none")
    except TrainingError as exc:  # ConfigError: sizes no ModelConfig takes
        raise EvaluationError(f"classifier sizes {spec}: {exc}") from None


def _source_run_config(info: dict[str, Any]) -> dict[str, Any] | None:
    """The pretraining config of an export, from its source checkpoint's trainer state."""
    source = info.get("source")
    state_file = Path(source) / "trainer_state.json" if source else None
    if state_file is not None and state_file.is_file():
        config = json.loads(state_file.read_text()).get("config")
        return config if isinstance(config, dict) else None
    return None


def _load_deepspeed(p: Path) -> Checkpoint:
    from training import checkpoint

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        ckpt_dir, tag = checkpoint.resolve(p)
        state = checkpoint.read_state(ckpt_dir, tag)
        run = config_from_dict(state.config)
        stage = run.stages[state.stage_index]
        weights = checkpoint.fp32_state_dict_from_checkpoint(ckpt_dir, tag)
    except TrainingError as exc:
        raise EvaluationError(f"--checkpoint '{p}': {exc}") from None
    info = {"preset": run.model_preset, "stage": stage.name, "global_step": state.global_step,
            "normalisation": run.normalisation}
    return Checkpoint(weights, run.model_for(stage), "deepspeed", ckpt_dir / tag,
                      state.config, info)


# --------------------------------------------------------------------------- the model


def build_mae(ckpt: Checkpoint, img_size: int) -> SpectralMAE:
    """The checkpoint's model at ``img_size``; spatial position tables are bicubically
    interpolated when the size differs (kept, unlike the official fine-tuning code)."""
    if ckpt.kind == "official_classifier":
        raise EvaluationError(f"--checkpoint '{ckpt.path}' is an official fine-tuned classifier "
                              "(no MAE decoder, joint position table): run it with "
                              "python -m training.predict")
    cfg = replace(ckpt.config, img_size=img_size)
    if cfg.num_bands != len(model_bands()):
        raise EvaluationError(f"the checkpoint takes {cfg.num_bands} bands; the readers give "
                              f"{len(model_bands())}")
    model = SpectralMAE(cfg)
    try:
        load_official_state_dict(model, ckpt.state, spatial_pos="interpolate")
    except ValueError as exc:
        raise EvaluationError(f"--checkpoint '{ckpt.path}': {exc}") from None
    return model


# --------------------------------------------------------------------------- normalisation


def _manifest_stats(manifest: Path, dataset: str | None) -> tuple[list[float], list[float]]:
    data = json.loads(manifest.read_text())
    datasets = data.get("datasets") or {}
    if dataset is None or dataset not in datasets:
        dataset = next(iter(datasets), None)
    if dataset is None:
        raise EvaluationError(f"manifest '{manifest}' lists no data set")
    bands = list(data.get("bands") or [])
    if bands != list(model_bands()):
        raise EvaluationError(f"manifest '{manifest}' bands {bands} are not the model order")
    stats = datasets[dataset].get("stats") or {}
    if "mean" not in stats or "std" not in stats:
        raise EvaluationError(f"manifest '{manifest}' data set '{dataset}' has no stats")
    # The trainer floors std at 1 DN (training/data.py read_shard_set).
    return [float(m) for m in stats["mean"]], [max(float(s), 1.0) for s in stats["std"]]


def resolve_normalisation(ckpt: Checkpoint, mode: NormMode = "auto",
                          manifest: str | Path | None = None) -> Normalisation:
    """Pick the input normalisation for ``ckpt`` (module doc).

    Raises:
        EvaluationError: ``dataset_stats`` was asked for and no statistics can be found.
    """
    trained = ckpt.info.get("normalisation") or (ckpt.run_config or {}).get("normalisation")
    if mode == "per_image_minmax" or (mode == "auto" and trained in (None, "per_image_minmax")):
        why = ("requested" if mode != "auto" else "official SpectralGPT choice (no pretraining "
               "statistics in the checkpoint)" if trained is None else "used in pretraining")
        return Normalisation("per_image_minmax", source=why)
    stats = ckpt.info.get("stats")
    if isinstance(stats, dict) and "mean" in stats and "std" in stats:
        return Normalisation("dataset_stats", tuple(stats["mean"]),
                             tuple(max(float(s), 1.0) for s in stats["std"]), "checkpoint info")
    candidates: list[Path] = []
    if manifest is not None:
        candidates.append(Path(manifest))
    run = ckpt.run_config or {}
    if run.get("manifest"):
        candidates.append(Path(run["manifest"]))  # as the run recorded it: relative to where it ran
    stage = ckpt.info.get("stage")
    dataset = next((s.get("dataset") for s in run.get("stages", []) if s.get("name") == stage),
                   None)
    for path in candidates:
        if path.is_file():
            mean, std = _manifest_stats(path, dataset)
            return Normalisation("dataset_stats", tuple(mean), tuple(std),
                                 f"manifest {path.name} ({dataset})")  # no local folder layout in results
    if mode == "dataset_stats":
        raise EvaluationError("--normalisation dataset_stats: no statistics in the checkpoint "
                              "and no manifest found; pass --manifest PATH")
    logger.warning("pretraining used dataset statistics but none were found: falling back "
                   "to per-image min-max (pass --manifest to fix)")
    return Normalisation("per_image_minmax",
                         source="fallback: pretraining statistics not found (pass --manifest)")


def normalise(x: Tensor, norm: Normalisation) -> Tensor:
    """Normalise DN images ``[..., 12, H, W]`` as in pretraining; 0 DN = nodata -> 0.

    Same arithmetic as ``training.data.normalise`` (per-image min-max over valid pixels with
    eps 1e-10, or (x - mean) / std).
    """
    from training.data import normalise as train_normalise

    valid = x != 0
    if norm.mode == "dataset_stats":
        mean = torch.tensor(norm.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(norm.std, dtype=x.dtype, device=x.device)
    else:
        mean = std = torch.zeros(x.shape[-3], dtype=x.dtype, device=x.device)
    return train_normalise(x, valid, norm.mode, mean, std)  # per image and band over [..., C, H, W]
