"""``python -m training {pretrain,export} ...``: one entry for the trainer's commands."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("pretrain", "export")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m training {{{','.join(commands)}}} [options]  "
              f"(see: python -m training pretrain --help)", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        from training.pretrain import main as run
    else:
        from training.export import main as run
    return run(rest)
