"""Reliability suite: faults injected for real (HTTP server, corrupt files, kill -9), with a
table of what was injected and what happened, printed at the end of the run.

Run on its own: `python -m pytest tests/reliability`.
"""

from __future__ import annotations

from typing import Any

import pytest

_ROWS: list[tuple[str, str, str]] = []


@pytest.fixture
def report() -> Any:
    """`report(fault, injected, outcome)` adds a row to the end-of-run table."""

    def add(fault: str, injected: str, outcome: str) -> None:
        _ROWS.append((fault, injected, outcome))

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    w = [max(len(r[i]) for r in _ROWS + [("fault", "injected", "outcome")]) for i in range(3)]
    tr = terminalreporter
    tr.section("reliability: faults injected and outcomes")
    tr.write_line(f"{'fault':<{w[0]}}  {'injected':<{w[1]}}  outcome")
    tr.write_line(f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}")
    for f, i, o in _ROWS:
        tr.write_line(f"{f:<{w[0]}}  {i:<{w[1]}}  {o}")
