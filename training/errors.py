"""Exceptions of the trainer.

Every user-facing failure is a :class:`TrainingError`; the CLI turns it into one line on
stderr and a non-zero exit code. Messages say which file or config key to change.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class for errors the user can fix (config, data, a diverging run)."""


class ConfigError(TrainingError, ValueError):
    """The YAML config or a ``--set`` override is invalid (unknown key, bad value)."""


class DataError(TrainingError):
    """The manifest or the shards do not match the contract or the model."""


class CheckpointError(TrainingError):
    """A checkpoint to resume from or export is missing or inconsistent."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the run stops at once (fail fast, mae engine_pretrain)."""
