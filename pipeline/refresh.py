"""`python -m pipeline.refresh`: add new or reprocessed scenes to a dataset as a new version.

Same options as `build_shards`. The catalog is searched with the dataset's settings; items
the dataset does not hold yet (a new id, or a known id with another processing baseline)
are built into new shards only, and `manifest.json` gains a version listing them. Nothing
new: nothing is written and the exit code is 0.

Exit codes (for schedulers): 0 updated or nothing new; 2 bad input, unreachable catalog or
incompatible dataset; 3 no scenes at all; 4 another build/refresh is running (use --wait to
queue instead); 5 some scenes could not be read (skipped and listed in the manifest: the
next refresh retries them); 6 no space left where the dataset is written (nothing published);
130 interrupted (the next run resumes); 1 a bug.
"""

from __future__ import annotations

import sys

from pipeline.build_shards import main as _main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return _main(argv, refresh=True, prog=prog)


if __name__ == "__main__":
    from spectralgpt.cli import exit_now

    exit_now(main())
