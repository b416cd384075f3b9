"""``spectralgpt COMMAND [options]``: one console command for every tool of the project.

Each command is the same function as its ``python -m`` form (which keeps working):

    spectralgpt build     = python -m pipeline.build_shards
    spectralgpt refresh   = python -m pipeline.refresh
    spectralgpt inspect   = python -m pipeline.inspect
    spectralgpt pretrain  = python -m training.pretrain   (one process; several: deepspeed --module training.pretrain)
    spectralgpt export    = python -m training.export
    spectralgpt evaluate  = python -m training.evaluate
    spectralgpt embed     = python -m training.embed         (search: spectralgpt embed search OUT ...)
    spectralgpt predict   = python -m training.predict
    spectralgpt sizes     = python -m training sizes
"""

from __future__ import annotations

import contextlib
import importlib
import sys

from spectralgpt import __version__

#: command -> ("module" or "module:function" whose ``(argv, prog=...)`` runs it, one line of
#: help, whether it needs the trainer's extra dependencies)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "build": ("pipeline.build_shards", "search Sentinel-2 L2A through STAC and write cubes and WebDataset shards", False),
    "refresh": ("pipeline.refresh", "add new or reprocessed scenes to a dataset as a new version", False),
    "inspect": ("pipeline.inspect", "write a static HTML report of a dataset", False),
    "pretrain": ("training.pretrain:command_main", "progressive SpectralGPT pretraining with DeepSpeed", True),
    "export": ("training.export", "export a checkpoint to plain weights", True),
    "evaluate": ("training.evaluate", "linear probe, k-NN, fine-tuning, segmentation, change detection", True),
    "embed": ("training.embed", "embed every sample of a dataset to GeoParquet; 'embed search' finds neighbours", True),
    "predict": ("training.predict", "classify images (.npy or GeoTIFF) with a fine-tuned classifier", True),
    "sizes": ("training.cli:sizes_main", "parameter and token counts of the model presets", True),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: spectralgpt COMMAND [options]   (spectralgpt {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "spectralgpt COMMAND --help describes each command's options."]
    return "\n".join(lines)


def run(command: str, argv: list[str], prog: str) -> int:
    """Import the command's module and run its ``main``; the trainer's absence is one line."""
    target, _, needs_trainer = COMMANDS[command]
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if needs_trainer and exc.name and exc.name.split(".")[0] in ("torch", "deepspeed", "safetensors", "pyarrow", "faiss", "onnx", "onnxruntime"):
            print(f"error: {prog} needs the trainer's dependencies ({exc.name} is missing): "
                  "pip install 'spectralgpt-pipeline[train]'", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, function or "main")(argv, prog=prog))


def exit_now(code: int) -> None:
    """End a finished pipeline command at once: its outputs are durable already (fsynced,
    renamed, uploaded), and the interpreter's own teardown (zarr's event loop, GDAL, Numba,
    freeing the last buffers) took ~0.5 s per build here. Logs and stdio are flushed first."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"spectralgpt {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"error: unknown command {command[:40]!r}: use one of {', '.join(COMMANDS)} "
              "(spectralgpt --help)", file=sys.stderr)
        return 2
    code = run(command, argv[1:], prog=f"spectralgpt {command}")
    if argv is None and command in ("build", "refresh"):
        exit_now(code)  # the console command itself, not a caller that goes on afterwards
    return code


if __name__ == "__main__":
    sys.exit(main())
