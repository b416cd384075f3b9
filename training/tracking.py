"""Experiment tracking: the records of ``metrics.jsonl`` also go to TensorBoard, Weights &
Biases or MLflow, as the config's ``tracking`` asks (off by default).

``metrics.jsonl`` stays the record the run page, ``--resume`` and the tests read; trackers
get a copy of every line as it is written (rank 0 only):

* step records (those with ``loss``): every number as a scalar ``train/<key>`` at the
  global ``step`` (loss, both loss terms, lr, samples/s, tokens/s, step and data-wait
  time, gradient norm);
* ``stage_start`` records: the stage's numbers as scalars ``stage/<key>`` at its first step
  and, for TensorBoard, the whole record as text ``stage/<name>``;
* other events (bad data, config changes): as text ``event/<event>``.

TensorBoard writes event files under ``<run dir>/tensorboard`` (``tensorboard --logdir
runs``); the ``tensorboard`` package comes with the ``train`` extra. ``wandb`` and
``mlflow`` are imported only when asked for (``pip install wandb`` / ``mlflow``); they take
their project, server and credentials from their own environment variables
(``WANDB_PROJECT``, ``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``, ...): nothing here
sends anything anywhere unless the config names them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from training.errors import ConfigError

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite plain numbers of a record (bools and nested values left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def split_record(record: dict[str, Any]) -> tuple[str, int, dict[str, float]]:
    """``(kind, step, scalars)`` of a metrics record: kind ``train``, ``stage`` or ``event``;
    scalars keyed ``<kind>/<key>`` (the step itself is not a scalar)."""
    step = int(record.get("step") or 0)
    if "loss" in record and "event" not in record:
        kind = "train"
    elif record.get("event") == "stage_start":
        kind = "stage"
    else:
        kind = "event"
    scalars = {} if kind == "event" else {
        f"{kind}/{k}": v for k, v in _numbers(record).items() if k not in ("step", "stage_index")}
    return kind, step, scalars


class TensorBoard:
    """Event files in ``<run dir>/tensorboard`` through ``torch.utils.tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tracking: tensorboard needs the tensorboard package "
                              "(pip install 'spectralgpt-pipeline[train]')") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        kind, step, scalars = split_record(record)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if kind != "train":
            name = record.get("stage") if kind == "stage" else record.get("event")
            self.writer.add_text(f"{kind}/{name}", f"```\n{json.dumps(record, indent=1)}\n```", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (project, entity and mode from ``WANDB_*`` variables)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("tracking: wandb needs the wandb package (pip install wandb)") from None
        self.wandb = wandb
        self.run = wandb.init(name=name, dir=str(run_dir), config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        kind, step, scalars = split_record(record)
        if scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run (server from ``MLFLOW_TRACKING_URI``; default a local ``mlruns`` folder)."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("tracking: mlflow needs the mlflow package (pip install mlflow)") from None
        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_dict(config, "config.json")

    def log(self, record: dict[str, Any]) -> None:
        kind, step, scalars = split_record(record)
        if scalars:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackers:
    """The trackers a run's config names; :meth:`log` sends a record to each of them.

    A tracker that fails while logging (a network hiccup, a full disk) is reported once and
    dropped: tracking never stops training, and ``metrics.jsonl`` holds every record anyway.
    """

    def __init__(self, names: tuple[str, ...], run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.items: list[tuple[str, Tracker]] = []
        for name in names:
            if name == "tensorboard":
                self.items.append((name, TensorBoard(run_dir)))
            elif name == "wandb":
                self.items.append((name, WandB(run_dir, run_name, config)))
            elif name == "mlflow":
                self.items.append((name, MLflow(run_name, config)))
            else:  # the config checks names; this guards direct use
                raise ConfigError(f"tracking: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")

    def log(self, record: dict[str, Any]) -> None:
        for name, tracker in list(self.items):
            try:
                tracker.log(record)
            except Exception as exc:  # noqa: BLE001 (any failure of a third-party tracker)
                logger.warning("tracking: %s failed (%s); it is off for the rest of the run, "
                               "metrics.jsonl has every record", name, str(exc).splitlines()[0][:200])
                self.items.remove((name, tracker))

    def close(self) -> None:
        for _, tracker in self.items:
            try:
                tracker.close()
            except Exception:  # noqa: BLE001, S110 (closing is best effort)
                pass
        self.items = []
