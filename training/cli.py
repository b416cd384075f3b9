"""``python -m training {pretrain,export,sizes} ...``: one entry for the trainer's commands."""

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("pretrain", "export", "sizes")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m training {{{','.join(commands)}}} [options]  "
              f"(see: python -m training pretrain --help)", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "sizes":
        return sizes()
    if command == "pretrain":
        from training.pretrain import main as run
    else:
        from training.export import main as run
    return run(rest)
