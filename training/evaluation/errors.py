"""Errors of the evaluation package (user-fixable; the CLI prints one line and exits 2)."""

from __future__ import annotations

from training.errors import TrainingError


class EvaluationError(TrainingError):
    """Base class: bad data directory, checkpoint or option for ``python -m training.evaluate``."""


class DatasetFormatError(EvaluationError):
    """The data directory does not have the layout of the requested format."""


class MissingBandsError(DatasetFormatError):
    """A sample lacks bands the model needs; the message names them."""
