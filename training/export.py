"""Export a checkpoint to plain fp32 weights plus the model config, or its encoder to a
portable ONNX / ``torch.export`` file.

Usage::

    python -m training.export runs/tiny_cpu                       # latest checkpoint
    python -m training.export runs/tiny_cpu/checkpoints/global_step200 --format pt
    python -m training.export runs/base_gpu --out weights/spectralgpt_base.safetensors
    python -m training.export weights/spectralgpt_base.safetensors --format onnx \
        --output encoder/spectralgpt_base.onnx
    python -m training.export SpectralGPT+.pth --format exported-program --output enc.pt2 \
        --img-size 96

Weights (``--format safetensors`` or ``pt``, SOURCE a DeepSpeed run / ``checkpoints/`` /
``global_stepN`` folder): writes ``<out>`` (``.safetensors`` by default, or a ``.pt``
holding only tensors and plain data so ``torch.load(..., weights_only=True)`` reads it) and
``<out stem>.json`` with the :class:`~training.config.ModelConfig`, the stage, the step, the
source checkpoint, the input normalisation and the stage's data (``stats``: per-band
mean/std in DN, ``data``: data set, split, dataset version), so ``python -m
training.evaluate`` normalises as in pretraining without the manifest. The same info is in
the ``.safetensors`` metadata (key ``spectralgpt``) and under ``config`` in the ``.pt``.
The state-dict keys are the official SpectralGPT ones (``SpectralGPT+.pth`` layout), so
the file also loads into the official ``models_mae_spectral.py`` model.
Works for ZeRO-1/2/3 checkpoints from any number of processes (DeepSpeed's
``zero_to_fp32`` consolidation; the fp32 master weights, not the bf16 copies).

Portable encoder (``--format onnx`` or ``exported-program``, SOURCE anything
``training.evaluation.checkpoints.load_checkpoint`` reads: a DeepSpeed folder, an export of
this command, or an official SpectralGPT ``.pth``): the encoder without masking plus mean
pooling, ``Embedder(Encoder(mae), pool="mean")`` of ``training.evaluation.heads``:

* input ``image`` ``[B, 12, H, W]`` float32, the *normalised* reflectance in the model's
  band order B01..B12 without B10 (``training.evaluation.readers.model_bands()``), with
  ``H = W = --img-size`` (default: the checkpoint's ``img_size``) fixed and ``B`` dynamic;
* output ``embedding`` ``[B, D]`` float32: the mean of the final LayerNorm output over all
  ``G x L`` tokens (``D`` = the checkpoint's ``embed_dim``).

``onnx`` writes an ONNX file (``torch.onnx.export``, dynamo exporter; weights above
:data:`ONNX_INLINE_LIMIT` go to ``<out>.data`` beside it), ``exported-program`` a
``torch.export.save`` archive (``.pt2``; ``torch.export.load(path).module()`` runs it).
Right after writing, the file is run (onnxruntime on CPU, or the loaded program) on a
seeded random batch of 2 and compared with eager PyTorch: a max abs difference above
:data:`PARITY_ATOL` refuses the export. Beside it goes ``<out stem>.item.json``, a STAC
Item (STAC 1.1, MLM extension v1.4.0: ``mlm:input`` with the bands and the normalisation
``training.evaluation.checkpoints.resolve_normalisation(ckpt, "auto")`` picks,
``mlm:output``, the ``model`` asset with its ``file:checksum``) plus
``spectralgpt:checkpoint_sha256`` (:func:`checkpoint_sha256`) and the parity figure.

Every file is written under a temporary name in the output's folder and renamed into place
only when all of them are complete (and, for the portable formats, verified).

Exit codes: 0 written (the path on stdout), 2 no or a refused checkpoint, a bad option or
a missing exporter package (one line on stderr), 3 the exported file disagrees with
PyTorch (parity check; nothing is published), 6 disk full (one line with the location, the
errno text, bytes written and needed; the temporary files are removed and nothing appears
under the output's name).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from training import checkpoint
from training.config import ModelConfig, RunConfig, config_from_dict
from training.data import read_stage_data
from training.errors import (
    CheckpointError,
    ConfigError,
    DiskFullError,
    TrainingError,
    disk_full_cause,
    no_space,
)
from training.models.spectral_mae import SpectralMAE

if TYPE_CHECKING:
    from training.evaluation.checkpoints import Checkpoint, Normalisation

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "spectralgpt-mae-weights/1"
WEIGHT_FORMATS = ("safetensors", "pt")
PORTABLE_FORMATS = ("onnx", "exported-program")
PORTABLE_SUFFIX = {"onnx": ".onnx", "exported-program": ".pt2"}
#: Largest max abs difference between the exported file and eager PyTorch on the parity batch.
PARITY_ATOL = 1e-4
#: Weights above this many bytes go to ``<out>.data`` beside the ``.onnx`` (protobuf limits a
#: file to 2 GiB; the huge preset is ~2.5 GB in fp32). Below it the ``.onnx`` is self-contained.
ONNX_INLINE_LIMIT = 1_800_000_000
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
EO_SCHEMA = "https://stac-extensions.github.io/eo/v2.0.0/schema.json"


class ParityError(TrainingError):
    """The exported file's embeddings differ from eager PyTorch by more than :data:`PARITY_ATOL`
    (an exporter or runtime bug, not a user error); nothing is published."""

    exit_code = 3


def export(source: str | Path, out: str | Path | None = None, fmt: str = "safetensors") -> Path:
    """Export the checkpoint at ``source`` (run dir, checkpoints dir or tag dir); return ``out``.

    Raises:
        CheckpointError: no complete checkpoint at ``source``.
        DiskFullError: no space for the export; nothing is left under ``out``'s name.
    """
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    ckpt_dir, tag = checkpoint.resolve(Path(source))
    state = checkpoint.read_state(ckpt_dir, tag)
    run = config_from_dict(state.config)
    stage = run.stages[state.stage_index]
    model_cfg = run.model_for(stage)
    weights = checkpoint.fp32_state_dict_from_checkpoint(ckpt_dir, tag)
    # Strict load proves the file is a complete model of this config before we write it.
    SpectralMAE(model_cfg).load_state_dict(weights, strict=True)

    if out is None:
        suffix = ".safetensors" if fmt == "safetensors" else ".pt"
        name = f"spectral_mae_{run.model_preset}_{stage.name}_{tag}{suffix}"
        out = ckpt_dir.parent / "export" / name
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if no_space(exc) is None:
            raise
        raise DiskFullError.at("the export folder", out.parent, exc) from None
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT, "model": asdict(model_cfg), "preset": run.model_preset,
        "stage": stage.name, "global_step": state.global_step,
        "samples_seen": state.samples_seen,
        # relative to the exported file: no user's folder layout in a file meant to be shared
        "source": Path(os.path.relpath((ckpt_dir / tag).resolve(), out.parent.resolve())).as_posix(),
        "bands_order": "B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12",
        "normalisation": run.normalisation,
    }
    data = state.data or _data_from_manifest(run, stage.name)
    if data:
        info["stats"] = {"mean": data["mean"], "std": data["std"]}
        info["data"] = {k: data[k] for k in ("dataset", "split", "version") if k in data}
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown format {fmt!r} (safetensors or pt; onnx and "
                         f"exported-program go through export_encoder)")
    _write_export(out, weights, info, fmt)
    logger.info("exported %s (%s, step %d, %d tensors) -> %s", ckpt_dir / tag, stage.name,
                state.global_step, len(weights), out)
    return out


def _write_export(out: Path, weights: dict[str, torch.Tensor], info: dict[str, Any],
                  fmt: str) -> None:
    """Write the weights and their JSON to temporary names, then rename both into place.

    Both files are complete before either appears under its name, so a full disk leaves
    neither a half-written file nor weights without their JSON; the temporary files are
    removed on any failure.

    Raises:
        DiskFullError: no space in ``out``'s folder (bytes written and needed in the message).
    """
    meta = out.with_suffix(".json")
    tmp, meta_tmp = out.with_name(f".{out.name}.tmp"), meta.with_name(f".{meta.name}.tmp")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(weights, str(tmp), metadata={"spectralgpt": json.dumps(info)})
        else:
            torch.save({"model": weights, "config": info}, tmp)
        with open(meta_tmp, "w") as fh:
            fh.write(json.dumps(info, indent=1))
        for path in (tmp, meta_tmp):  # a full disk may only show when data is flushed
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(meta_tmp, meta)
        os.replace(tmp, out)
    except Exception as exc:  # torch and safetensors report a full disk in their own types
        # (safetensors removes its own partial file: then nothing is left to count)
        written = sum(p.stat().st_size for p in (tmp, meta_tmp) if p.is_file()) or None
        full = disk_full_cause(exc, out.parent)  # probed before the files below are removed
        for path in (tmp, meta_tmp):
            with contextlib.suppress(OSError):
                path.unlink()
        if full is None:
            raise
        needed = sum(t.numel() * t.element_size() for t in weights.values())
        raise DiskFullError.at("the export", out, full, written=written, needed=needed,
                               after="free space or pass --out elsewhere") from None


def _data_from_manifest(run: RunConfig, stage_name: str) -> dict[str, Any]:
    """The stage's data statistics from the run's manifest, for checkpoints that predate
    ``TrainerState.data``; empty (with a warning) when the manifest cannot be read."""
    stage = next(s for s in run.stages if s.name == stage_name)
    try:
        return read_stage_data(run.manifest, [(d.name, d.weight) for d in run.stage_datasets(stage)],
                               stage.split, run.model_for(stage), version=run.dataset_version).describe()
    except TrainingError as exc:
        logger.warning("the export has no data statistics (the checkpoint predates them and "
                       "the manifest is unreadable: %s); evaluation will need --manifest", exc)
        return {}


def load_exported(path: str | Path) -> SpectralMAE:
    """Rebuild the model from an exported file (``.safetensors`` or ``.pt``) and its JSON.

    ``.pt`` files are read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file holds anything but tensors and plain data.
    """
    path = Path(path)
    info = json.loads(path.with_suffix(".json").read_text())
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(path))
    else:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
        except Exception as exc:  # unpickling errors come in many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"'{path}' does not load with torch.load(weights_only=True) "
                                  f"({reason})") from None
    model = SpectralMAE(ModelConfig(**info["model"]))
    model.load_state_dict(weights, strict=True)
    return model


# --------------------------------------------------------------------------- portable encoder


class PooledEncoder(nn.Module):
    """``image`` ``[B, 12, H, W]`` (normalised reflectance) -> ``embedding`` ``[B, D]``.

    :class:`~training.evaluation.heads.Embedder` with the single tensor input the exporters
    trace: its optional ``dates`` argument (time stacks only) would otherwise become a
    ``None`` input of the graph.
    """

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, image: Tensor) -> Tensor:
        return self.embedder(image)


def build_pooled_encoder(ckpt: Checkpoint, img_size: int) -> PooledEncoder:
    """The checkpoint's encoder with mean pooling at ``img_size`` px, fp32, in eval mode."""
    from training.evaluation.checkpoints import build_mae
    from training.evaluation.heads import Embedder, Encoder

    mae = build_mae(ckpt, img_size).float()
    return PooledEncoder(Embedder(Encoder(mae), pool="mean")).eval()


def checkpoint_sha256(ckpt: Checkpoint) -> str:
    """The hex sha256 that identifies the weights of ``ckpt`` (a loaded
    :class:`~training.evaluation.checkpoints.Checkpoint`).

    * a file (export ``.safetensors`` / ``.pt``, official ``.pth``): sha256 of the file's bytes,
      so ``sha256sum FILE`` gives the same value;
    * a DeepSpeed ``global_stepN`` folder (its shards depend on the number of processes and
      hold optimizer state): sha256 of the consolidated fp32 weights ``ckpt.state``, keys in
      sorted order, each as ``key`` UTF-8, a NUL byte, ``"<dtype>:<d0>x<d1>x..."`` (e.g.
      ``float32:768x1x3x8x8``, empty for a scalar) UTF-8, a NUL byte, then the tensor's
      C-contiguous bytes in native (little-endian) order. The same weights give the same
      value whatever the world size or ZeRO stage of the run.
    """
    h = hashlib.sha256()
    path = Path(ckpt.path)
    if path.is_file():
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    for key in sorted(ckpt.state):
        t = ckpt.state[key].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(key.encode() + b"\0" + f"{dtype}:{'x'.join(map(str, t.shape))}".encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _require(fmt: str) -> None:
    """Refuse early (exit 2, one line) when a package the format needs is missing."""
    needed = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "exported-program": ()}[fmt]
    missing = [m for m in needed if _missing(m)]
    if missing:
        raise TrainingError(f"--format {fmt} needs the Python package(s) {', '.join(missing)} "
                            f"(pip install {' '.join(missing)})")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def export_encoder(source: str | Path, out: str | Path | None = None, fmt: str = "onnx",
                   img_size: int | None = None) -> Path:
    """Export the pooled encoder of ``source`` (module doc) as ``fmt``; return ``out``.

    ``out`` defaults to ``<ckpt stem>_encoder.onnx|.pt2`` beside a checkpoint file, or
    ``<run>/export/spectral_mae_<preset>_<stage>_<tag>_encoder.onnx|.pt2`` for a DeepSpeed
    checkpoint. Writes ``out`` (plus ``<out>.data`` for ONNX weights above
    :data:`ONNX_INLINE_LIMIT`) and ``<out stem>.item.json`` (the STAC MLM Item).

    Raises:
        TrainingError: no or a refused checkpoint, a bad ``img_size``, a missing package.
        ParityError: the written file disagrees with eager PyTorch (> :data:`PARITY_ATOL`).
        DiskFullError: no space; nothing is left under ``out``'s name.
    """
    if fmt not in PORTABLE_FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({' or '.join(PORTABLE_FORMATS)})")
    _require(fmt)
    from training.evaluation.checkpoints import load_checkpoint, resolve_normalisation

    if not Path(source).exists():  # load_checkpoint's message names --checkpoint
        raise CheckpointError(f"checkpoint '{source}' not found")
    ckpt = load_checkpoint(source)
    size = ckpt.config.img_size if img_size is None else img_size
    patch = ckpt.config.patch_size
    if size <= 0 or size % patch:
        raise ConfigError(f"--img-size {size} is not a positive multiple of the patch size "
                          f"{patch}")
    module = build_pooled_encoder(ckpt, size)
    norm = resolve_normalisation(ckpt, "auto")
    out = Path(out) if out is not None else _default_encoder_out(ckpt, fmt)
    if out.is_dir():
        raise ConfigError(f"--output '{out}' is a folder: give the file to write, e.g. {out / ('encoder' + PORTABLE_SUFFIX[fmt])}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        if no_space(exc) is None:
            raise ConfigError(f"cannot write --output '{out}': {exc.strerror or exc}") from None
        raise DiskFullError.at("the export folder", out.parent, exc) from None
    # Written into a private folder under the final names (ONNX records the name of its
    # external data file inside the model), then renamed into place.
    artefact, item_path = work / out.name, work / f"{out.stem}.item.json"
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        started = time.perf_counter()
        if fmt == "onnx":
            _write_onnx(module, size, artefact, external=param_bytes > ONNX_INLINE_LIMIT)
        else:
            _write_exported_program(module, size, artefact)
        seconds = time.perf_counter() - started
        diff = check_parity(module, artefact, fmt, size)
        logger.info("parity %s vs eager PyTorch: max abs diff %.3g on a seeded batch of 2 at "
                    "%d px (limit %g); export took %.1f s", fmt, diff, size, PARITY_ATOL,
                    seconds)
        item = mlm_item(ckpt, module, norm, fmt, out, size, artefact=artefact,
                        parity=diff, seconds=seconds)
        with open(item_path, "w") as fh:
            fh.write(json.dumps(item, indent=1))
        for path in work.iterdir():  # a full disk may only show when data is flushed
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        # The model file last: whoever sees it finds its external data and Item in place.
        for path in sorted(work.iterdir()):
            if path != artefact:
                os.replace(path, out.parent / path.name)
        os.replace(artefact, out)
    except ParityError:
        raise
    except Exception as exc:  # the exporters report a full disk in their own types
        written = sum(p.stat().st_size for p in work.iterdir() if p.is_file()) or None
        full = disk_full_cause(exc, out.parent)  # probed before the files below are removed
        shutil.rmtree(work, ignore_errors=True)
        if full is None:
            raise
        raise DiskFullError.at("the export", out, full, written=written, needed=param_bytes,
                               after="free space or pass --output elsewhere") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("exported the %s encoder of %s (%s, %d parameters, embedding %d) -> %s",
                fmt, ckpt.path, ckpt.kind, item["properties"]["mlm:total_parameters"],
                ckpt.config.embed_dim, out)
    return out


def _default_encoder_out(ckpt: Checkpoint, fmt: str) -> Path:
    suffix = PORTABLE_SUFFIX[fmt]
    path = Path(ckpt.path)
    if path.is_file():
        return path.with_name(f"{path.stem}_encoder{suffix}")
    info = ckpt.info
    name = f"spectral_mae_{info.get('preset')}_{info.get('stage')}_{path.name}_encoder{suffix}"
    return path.parent.parent / "export" / name  # <run>/checkpoints/global_stepN -> <run>/export


def _example(img_size: int, batch: int = 2, seed: int = 0) -> Tensor:
    """A seeded ``[batch, 12, img_size, img_size]`` float32 batch (normalised-reflectance scale)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 12, img_size, img_size, generator=g)


def _write_onnx(module: PooledEncoder, img_size: int, path: Path, *, external: bool) -> None:
    """``torch.onnx.export`` with the dynamo exporter (the default since torch 2.9; the encoder
    traces without graph breaks, so the deprecated TorchScript exporter, ``dynamo=False``, is
    not needed) and a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13's own pytree code trips its LeafSpec deprecation during decomposition
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        torch.onnx.export(module, (_example(img_size),), str(path), dynamo=True,
                          input_names=["image"], output_names=["embedding"],
                          dynamic_shapes={"image": {0: batch}}, external_data=external,
                          verbose=False)  # verbose=None prints progress on stdout


def _write_exported_program(module: PooledEncoder, img_size: int, path: Path) -> None:
    """``torch.export.export`` with a dynamic batch axis, saved with ``torch.export.save``."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module, (_example(img_size),),
                                      dynamic_shapes={"image": {0: batch}})
    torch.export.save(program, str(path))


def _eager_embedding(module: nn.Module, x: Tensor) -> Tensor:
    """The reference: eager PyTorch, ``[B, 12, H, W] -> [B, D]``."""
    with torch.no_grad():
        return module(x)


def run_exported(path: str | Path, fmt: str, x: Tensor) -> Tensor:
    """Run an exported encoder file on ``x`` ``[B, 12, H, W]``; the embedding ``[B, D]``
    (onnxruntime with the CPU provider for ``onnx``, the loaded program otherwise)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(["embedding"], {"image": x.numpy()})
        return torch.from_numpy(y)
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return program(x)


def check_parity(module: nn.Module, path: Path, fmt: str, img_size: int) -> float:
    """Max abs difference between the exported file and eager PyTorch on a seeded batch of 2.

    Raises:
        ParityError: the difference exceeds :data:`PARITY_ATOL`, or the shapes differ.
    """
    x = _example(img_size, batch=2, seed=1)  # not the tracing batch
    ref = _eager_embedding(module, x)
    got = run_exported(path, fmt, x)
    if got.shape != ref.shape:
        raise ParityError(f"the {fmt} export gives shape {list(got.shape)}, eager PyTorch "
                          f"{list(ref.shape)}; nothing was published")
    diff = float((got.float() - ref.float()).abs().max())
    if not diff <= PARITY_ATOL:  # also catches NaN
        raise ParityError(f"the {fmt} export differs from eager PyTorch by {diff:.3g} (max abs "
                          f"on a seeded batch of 2, limit {PARITY_ATOL:g}); nothing was published")
    return diff


def _semver(version: str) -> str:
    """``2.13.0+cpu`` as is; ``2.14.0.dev20250101+cpu`` -> ``2.14.0`` (MLM wants SemVer)."""
    if re.fullmatch(r"\d+\.\d+\.\d+(\+[0-9A-Za-z.-]+)?", version):
        return version
    m = re.match(r"\d+\.\d+\.\d+", version)
    return m[0] if m else "0.0.0"


def _preset_name(ckpt: Checkpoint) -> str:
    from training.models.spectral_mae import PRESETS

    if ckpt.info.get("preset"):
        return str(ckpt.info["preset"])
    cfg = ckpt.config
    for name, make in PRESETS.items():
        ref = make()
        if (ref.embed_dim, ref.depth) == (cfg.embed_dim, cfg.depth):
            return name
    return f"d{cfg.embed_dim}x{cfg.depth}"


def mlm_item(ckpt: Checkpoint, module: nn.Module, norm: Normalisation, fmt: str, out: Path,
             img_size: int, *, artefact: Path | None = None, parity: float | None = None,
             seconds: float | None = None) -> dict[str, Any]:
    """The STAC Item (1.1.0, MLM v1.4.0, file v2.1.0, eo v2.0.0) describing the exported file.

    Not spatial: ``geometry`` is ``null`` and there is no ``bbox``; ``datetime`` is the export
    time. ``mlm:tasks`` is ``similarity-search``: MLM v1.4.0's task enum has no
    feature-extraction / embedding entry and that is what the embeddings serve. The model
    input is documented by ``value_scaling`` (z-score per band in DN, dataset statistics) or
    by ``pre_processing_function`` (per-image min-max, which no value-scaling type expresses).
    ``artefact`` is the file to checksum (default ``out``).
    """
    from pipeline.catalogs import sensor

    table = sensor()
    bands = [b.name for b in table.bands]
    cfg = ckpt.config
    preset = _preset_name(ckpt)
    artefact = artefact or out
    digest = hashlib.sha256()
    with open(artefact, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    dn = (f"Sentinel-2 L2A surface reflectance as DN (reflectance = DN x {table.scale:g}, "
          f"BOA offset removed), {table.nodata} = nodata")
    if norm.mode == "dataset_stats":
        scaling: list[dict[str, Any]] | None = [
            {"type": "z-score", "mean": float(m), "stddev": float(s)}
            for m, s in zip(norm.mean or (), norm.std or ())]
        pre = None
        how = ("per band (DN - mean) / std with the pretraining data set's statistics in DN "
               "(value_scaling, one entry per band); nodata pixels (0 DN) set to 0")
    else:
        scaling = None
        pre = {"format": "python", "expression": "training.evaluation.checkpoints:normalise"}
        how = ("per image and band min-max over the valid pixels to [0, 1] (eps 1e-10); "
               "nodata pixels (0 DN) set to 0")
    onnx_framework = fmt == "onnx"
    if onnx_framework:
        import onnx

        framework, version = "ONNX", onnx.__version__
        media, artifact_type = "application/octet-stream; application=onnx", "onnx"
    else:
        framework, version = "PyTorch", torch.__version__
        media, artifact_type = "application/octet-stream; framework=pytorch", "torch.export.save"
    d = cfg.embed_dim
    properties: dict[str, Any] = {
        "datetime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": (f"SpectralGPT {preset} encoder (no masking) with mean pooling over "
                        f"all tokens: normalised Sentinel-2 L2A chip [B, 12, {img_size}, "
                        f"{img_size}] -> embedding [B, {d}]."),
        "mlm:name": f"SpectralGPT-{preset}-encoder-mean",
        "mlm:architecture": "Vision Transformer (SpectralGPT 3D-token masked autoencoder encoder)",
        "mlm:tasks": ["similarity-search"],
        "mlm:framework": framework,
        "mlm:framework_version": _semver(version),
        "mlm:total_parameters": int(sum(p.numel() for p in module.parameters())),
        "mlm:pretrained": ckpt.info.get("global_step") != 0,  # 0: a random init, not trained
        "mlm:accelerator": "amd64",
        "mlm:accelerator_constrained": False,
        "mlm:input": [{
            "name": "image",
            "bands": bands,
            "input": {"shape": [-1, len(bands), img_size, img_size],
                      "dim_order": ["batch", "bands", "height", "width"],
                      "data_type": "float32"},
            "description": (f"{dn}, {img_size} x {img_size} px at 10 m, bands in this order; "
                            f"normalised: {how}."),
            "value_scaling": scaling,
            "resize_type": None,
            "pre_processing_function": pre,
        }],
        "mlm:output": [{
            "name": "embedding",
            "tasks": ["similarity-search"],
            "result": {"shape": [-1, d], "dim_order": ["batch", "embedding"],
                       "data_type": "float32"},
            "description": (f"Mean over all {cfg.num_groups} spectral groups x "
                            f"{(img_size // cfg.patch_size) ** 2} positions of the encoder's "
                            f"final LayerNorm output."),
        }],
        "mlm:hyperparameters": {"img_size": img_size, "patch_size": cfg.patch_size,
                                "band_patch_size": cfg.band_patch_size, "embed_dim": d,
                                "depth": cfg.depth, "num_heads": cfg.num_heads, "pool": "mean"},
        "bands": [{"name": b.name, "description": dn, "nodata": table.nodata,
                   "data_type": "uint16", "eo:common_name": b.common_name,
                   "eo:center_wavelength": b.center_wavelength} for b in table.bands],
        "spectralgpt:checkpoint_sha256": checkpoint_sha256(ckpt),
        "spectralgpt:checkpoint": {"name": Path(ckpt.path).name, "kind": ckpt.kind,
                                   **{k: v for k, v in ckpt.info.items()
                                      if k in ("preset", "stage", "global_step")}},
        "spectralgpt:normalisation": {**norm.describe(), "unit": "DN", "dn_scale": table.scale},
    }
    stage = ckpt.info.get("stage")
    pretrained_on = (ckpt.info.get("data") or {}).get("dataset") or next(
        (st.get("dataset") for st in (ckpt.run_config or {}).get("stages", [])
         if st.get("name") == stage), None)
    if not properties["mlm:pretrained"]:
        properties["mlm:pretrained_source"] = None  # MLM: explicit null when not pretrained
    elif pretrained_on:
        properties["mlm:pretrained_source"] = pretrained_on
    if parity is not None:
        properties["spectralgpt:parity"] = {
            "max_abs_diff": parity, "limit": PARITY_ATOL, "batch": 2,
            "runtime": (f"onnxruntime {_version('onnxruntime')} CPUExecutionProvider"
                        if onnx_framework else f"torch {torch.__version__} torch.export.load"),
            "export_seconds": round(seconds, 2) if seconds is not None else None}
    asset: dict[str, Any] = {
        "href": out.name, "type": media, "title": f"SpectralGPT {preset} pooled encoder",
        "roles": ["mlm:model"], "mlm:artifact_type": artifact_type,
        "file:size": artefact.stat().st_size,
        "file:checksum": "1220" + digest.hexdigest(),  # multihash: 0x12 sha2-256, 0x20 bytes
    }
    assets = {"model": asset}
    external = artefact.with_name(f"{artefact.name}.data")
    if external.is_file():
        assets["model_data"] = {"href": external.name, "type": "application/octet-stream",
                                "title": "external weights of the ONNX model (same folder)",
                                "roles": ["data"], "file:size": external.stat().st_size}
    return {
        "type": "Feature", "stac_version": "1.1.0",
        "stac_extensions": [MLM_SCHEMA, FILE_SCHEMA, EO_SCHEMA],
        "id": out.stem, "geometry": None, "properties": properties, "links": [],
        "assets": assets,
    }


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None, prog: str = "python -m training.export") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 written, 2 no or a refused checkpoint or a bad option, 3 the "
               "exported encoder disagrees with PyTorch, 6 disk full")
    parser.add_argument("source", help="run dir, its checkpoints/ dir, or a global_stepN dir; "
                        "for onnx/exported-program also an exported .safetensors/.pt or an "
                        "official SpectralGPT .pth")
    parser.add_argument("--out", "--output", dest="out", default=None,
                        help="output file (default: <run>/export/... or beside the checkpoint)")
    parser.add_argument("--format", choices=WEIGHT_FORMATS + PORTABLE_FORMATS,
                        default="safetensors",
                        help="weights (safetensors, pt) or the pooled encoder (onnx, "
                        "exported-program)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="onnx/exported-program: input side in px (default: the "
                        "checkpoint's img_size)")
    args = parser.parse_args(argv)
    if args.img_size is not None and args.format not in PORTABLE_FORMATS:
        parser.error("--img-size applies to --format onnx or exported-program only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # The ONNX exporter warns about torchvision ops it cannot register: irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):  # one INFO line per graph rewrite
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # stdout carries the output path only: DeepSpeed's consolidation prints its progress
        with contextlib.redirect_stdout(sys.stderr):
            if args.format in PORTABLE_FORMATS:
                out = export_encoder(args.source, args.out, args.format, args.img_size)
            else:
                out = export(args.source, args.out, args.format)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
