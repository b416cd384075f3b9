"""Export a checkpoint to plain fp32 weights plus the model config.

Usage::

    python -m training.export runs/tiny_cpu                       # latest checkpoint
    python -m training.export runs/tiny_cpu/checkpoints/global_step200 --format pt
    python -m training.export runs/base_gpu --out weights/spectralgpt_base.safetensors

Writes ``<out>`` (``.safetensors`` by default, or a ``.pt`` holding only tensors and plain
data so ``torch.load(..., weights_only=True)`` reads it) and ``<out stem>.json`` with the
:class:`~training.config.ModelConfig`, the stage, the step, the source checkpoint, the
input normalisation and the stage's data (``stats``: per-band mean/std in DN, ``data``:
data set, split, dataset version), so ``python -m training.evaluate`` normalises as in
pretraining without the manifest. The same info is in the ``.safetensors`` metadata
(key ``spectralgpt``) and under ``config`` in the ``.pt``.
The state-dict keys are the official SpectralGPT ones (``SpectralGPT+.pth`` layout), so
the file also loads into the official ``models_mae_spectral.py`` model.

Works for ZeRO-1/2/3 checkpoints from any number of processes (DeepSpeed's
``zero_to_fp32`` consolidation; the fp32 master weights, not the bf16 copies).

Exit codes: 0 written (the path on stdout), 2 no or a refused checkpoint, 6 disk full (one
line with the location, the errno text, bytes written and needed; the temporary files
are removed and nothing appears under the output's name).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from training import checkpoint
from training.config import ModelConfig, RunConfig, config_from_dict
from training.data import read_stage_data
from training.errors import (
    CheckpointError,
    DiskFullError,
    TrainingError,
    disk_full_cause,
    no_space,
)
from training.models.spectral_mae import SpectralMAE

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "spectralgpt-mae-weights/1"


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
    if fmt not in ("safetensors", "pt"):
        raise ValueError(f"unknown format {fmt!r} (safetensors or pt)")
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


def main(argv: list[str] | None = None, prog: str = "python -m training.export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split(
        "\n\n")[0], epilog="exit codes: 0 written, 2 no or a refused checkpoint, 6 disk full")
    parser.add_argument("source", help="run dir, its checkpoints/ dir, or a global_stepN dir")
    parser.add_argument("--out", default=None, help="output file (default: <run>/export/...)")
    parser.add_argument("--format", choices=("safetensors", "pt"), default="safetensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        out = export(args.source, args.out, args.format)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
