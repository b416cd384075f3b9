"""``python -m training {pretrain,export,evaluate,sizes} ...``: the trainer's commands.

The same commands as ``spectralgpt pretrain|export|evaluate|sizes`` (``spectralgpt.cli``).
"""

from __future__ import annotations

import sys


def sizes() -> int:
    """Print parameter and token counts of every preset (built on the meta device)."""
    import torch

    from training.models.spectral_mae import PRESETS, SpectralMAE

    for name, factory in PRESETS.items():
        for img in (96, 128):
            with torch.device("meta"):  # no memory needed, even for huge
                model = SpectralMAE(factory(img_size=img))
            print(f"{name:5s} {img:3d} px: encoder {model.encoder_parameters() / 1e6:7.1f} M, "
                  f"decoder {model.decoder_parameters() / 1e6:5.1f} M, "
                  f"{model.cfg.num_tokens} tokens ({model.cfg.num_visible} visible)")
    return 0


def sizes_main(argv: list[str] | None = None, prog: str = "python -m training sizes") -> int:
    """``sizes`` takes no options (``--help`` only)."""
    import argparse

    argparse.ArgumentParser(prog=prog, description=sizes.__doc__).parse_args(argv)
    return sizes()


def main(argv: list[str] | None = None) -> int:
    from spectralgpt.cli import COMMANDS, run

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = [name for name, (_, _, trainer) in COMMANDS.items() if trainer]
    if not argv or argv[0] not in commands:
        print(f"usage: python -m training {{{','.join(commands)}}} [options]  "
              f"(see: python -m training pretrain --help)", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:], prog=f"python -m training {argv[0]}")
