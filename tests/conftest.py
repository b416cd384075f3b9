"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Undo what a command run in-process did to the root logger.

    A CLI's ``main`` configures logging for its process (``logging.basicConfig``, the
    trainer with ``force=True``): in a test that leaves a ``StreamHandler`` bound to that
    test's capture stream, which pytest closes afterwards, so every later record anywhere
    (a server thread's request log included) prints a "Logging error" traceback into the
    stderr a later test checks. Handlers of exactly that type added during the test are
    removed and the root level is put back (pytest's own handlers are subclasses: kept).
    """
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)
