"""Exception hierarchy of the pipeline.

Every `PipelineError` is a user-facing problem: the CLI prints its message as one line
and exits non-zero, without a traceback. Messages say which argument or file to change.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad argument, unreachable catalog, ...)."""

    exit_code = 2


class ConfigError(PipelineError):
    """Invalid configuration value, unknown key, malformed bbox or dates."""


class CatalogError(PipelineError):
    """Unknown, unreachable or non-STAC catalog."""


class NoScenesFound(PipelineError):
    """The search matched no usable Sentinel-2 L2A scene."""

    exit_code = 3


class OutputError(PipelineError):
    """The output location is not writable or holds an incompatible dataset."""


class DiskFull(PipelineError):
    """No space left where the build writes (ENOSPC): nothing is published, temporary files
    are removed, finished units are kept; free space and run again to resume."""

    exit_code = 6


def disk_full_in(error: BaseException | None) -> OSError | None:
    """The ENOSPC error behind `error` (itself, or what caused it), if any."""
    import errno

    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


class ScenesFailed(PipelineError):
    """The run finished but some scenes could not be read (or --fail-fast stopped it)."""

    exit_code = 5


class SceneError(Exception):
    """One scene could not be used; the run records the reason and goes on."""

    def __init__(self, scene_id: str, reason: str) -> None:
        super().__init__(f"{scene_id}: {reason}")
        self.scene_id = scene_id
        self.reason = reason
