"""Mutation testing of the core modules with mutmut, one module at a time (`make mutants`).

Each module is mutated in its own copy of the tracked files (mutmut writes `mutants/` and its
config is per directory), against the tests that cover it, so a module's run takes minutes, not
the whole suite per mutant. Results (killed, timeout, survived, ...) are printed and written to
`tests/MUTATION.md`'s generated table; the survivors are listed under it for review (each needs a
test, or a reason it is equivalent, in MUTATION.md's notes).

    python scripts/mutants.py                   # every module below (long: see MUTATION.md)
    python scripts/mutants.py pipeline/names.py training/optim.py

mutmut is pinned here, not in the lock: a developer tool, installed on demand by `make mutants`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = "mutmut==3.8.1"  # 3.x: per-function trampolines, test selection by coverage

#: module -> the tests that exercise it (issue 21's list of core logic)
MODULES: dict[str, list[str]] = {
    "pipeline/names.py": ["tests/pipeline/test_names.py"],
    "training/optim.py": ["tests/training/test_schedule.py", "tests/training/test_optim_groups.py"],
    "pipeline/harmonise.py": ["tests/pipeline/test_harmonise.py"],
    "pipeline/tiling.py": ["tests/pipeline/test_tiling.py"],
    "pipeline/shards.py": ["tests/pipeline/test_shards.py"],
    "pipeline/search.py": ["tests/pipeline/test_providers.py", "tests/pipeline/test_search_paging.py"],
    "training/models/spectral_mae.py": ["tests/training/test_spectral_mae.py", "tests/training/test_time_series.py"],
    "training/data.py": ["tests/training/test_trainer_data.py"],
}

STATUSES = ("killed", "timeout", "survived", "no tests", "skipped", "suspicious", "segfault")
TABLE_START, TABLE_END = "<!-- mutants:start -->", "<!-- mutants:end -->"


def run_module(module: str, tests: list[str], timeout_s: float) -> tuple[Counter[str], list[str], float]:
    """Mutate `module` in a scratch copy of the tracked files; return status counts, the
    surviving mutants' names and the seconds taken."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for rel in files:
            src = ROOT / rel
            if src.is_file():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, work / rel)
        packages = sorted({rel.split("/")[0] for rel in files if "/" in rel and rel.endswith(".py")})
        (work / "setup.cfg").write_text(
            "[mutmut]\n"
            f"source_paths = {module}\n"
            "pytest_add_cli_args_test_selection = " + "\n    ".join(tests) + "\n"
            "pytest_add_cli_args = -q\n    -p\n    no:cacheprovider\n    -m\n    not slow\n"
            "also_copy = " + "\n    ".join(packages) + "\n"
            # a generous constant: a mutant whose tests take a few seconds more than the clean
            # run (a subprocess, a first import) is not a hang
            f"timeout_constant = {timeout_s}\n")
        env = {**os.environ, "PYTHONPATH": str(work), "DS_ACCELERATOR": "cpu"}
        subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=work, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True, check=False).stdout
    counts: Counter[str] = Counter()
    survivors = []
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            counts[m.group(2).strip()] += 1
            if m.group(2).strip() == "survived":
                survivors.append(m.group(1))
    return counts, survivors, time.monotonic() - t0


def _score(c: Counter[str]) -> float:
    """Killed share: killed and timed-out mutants over all that ran (no tests counts as alive)."""
    total = sum(c.values()) - c["skipped"]
    return (c["killed"] + c["timeout"]) / total if total else float("nan")


def write_table(results: dict[str, tuple[Counter[str], list[str], float]]) -> None:
    """Update `tests/MUTATION.md`'s generated block: the modules run now replace their rows,
    the others keep theirs (with the date they were measured)."""
    path = ROOT / "tests" / "MUTATION.md"
    text = path.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    old = text[start:end] if start >= 0 and end >= 0 else ""
    rows_by_module = {m.group(1): line for line in old.splitlines()
                      if (m := re.match(r"\| `([^`]+)` \|", line))}
    survivors_by_module = {m.group(1): line for line in old.splitlines()
                           if (m := re.match(r"Survivors in `([^`]+)`", line))}
    today = time.strftime("%Y-%m-%d")
    for module, (c, survivors, secs) in results.items():
        rows_by_module[module] = (f"| `{module}` | {sum(c.values())} | {c['killed']} | {c['timeout']} | "
                                  f"{c['survived']} | {c['no tests']} | {_score(c):.0%} | {secs / 60:.1f} | {today} |")
        survivors_by_module.pop(module, None)
        if survivors:
            survivors_by_module[module] = f"Survivors in `{module}`: " + ", ".join(f"`{s}`" for s in survivors)
    rows = ["| module | mutants | killed | timeout | survived | no tests | score | minutes | run |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [rows_by_module[m] for m in MODULES if m in rows_by_module]
    for m in MODULES:
        if m in survivors_by_module:
            rows += ["", survivors_by_module[m]]
    block = "\n".join([TABLE_START, *rows, TABLE_END])
    if start >= 0 and end >= 0:
        text = text[:start] + block + text[end + len(TABLE_END):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    ap.add_argument("--timeout", type=float, default=20.0, help="mutmut's timeout_constant in seconds (default 20)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"error: not a configured module: {', '.join(unknown)} (configured: {', '.join(MODULES)})",
              file=sys.stderr)
        return 2
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print(f"error: mutmut is not installed: pip install '{MUTMUT}' (make mutants does)", file=sys.stderr)
        return 2
    results = {}
    for module in args.modules or list(MODULES):
        counts, survivors, secs = run_module(module, MODULES[module], args.timeout)
        results[module] = (counts, survivors, secs)
        print(f"{module}: {dict(counts)} score {_score(counts):.0%} in {secs / 60:.1f} min", flush=True)
    write_table(results)
    return 0 if all(_score(c) >= 0.85 for c, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
