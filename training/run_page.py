"""``python -m training.run_page RUN_DIR``: a static HTML page to judge a pretraining run by eye.

Examples::

    python -m training.run_page runs/tiny_cpu                  # -> runs/tiny_cpu/report/index.html
    python -m training.run_page runs/base_gpu --out /tmp/base-page

The trainer writes the same page at the end of every stage (rank 0, through
:func:`training.report.plot_loss_curve`). It reads only what the run directory already
holds (see ``training/PRETRAIN.md``, "Outputs"):

- ``metrics.jsonl``: ``stage_start`` records (the derived numbers of each stage) and one
  record per log interval (loss terms, LR, throughput, step time, data wait);
- ``config.yaml``, ``checkpoints/latest`` + ``trainer_state.json``, ``export/``, ``train.log``;
- ``images/<stage>_step<N>.png`` and ``images/groups/<stage>_step<N>.png`` from
  :func:`training.report.save_reconstruction`.

The page (``index.html`` plus PNGs, built with :mod:`pipeline.report_html`: no scripts, no
network references, print rules for A4) shows a run summary with the stage table, the loss
curves (total and both terms) with stage boundaries marked, the learning rate and gradient
norm, throughput (samples/s, tokens/s) with step time and data wait, the latest
reconstruction of each stage (true colour and per spectral group), and the end of the log.

Every value read from the run directory is escaped where it enters the HTML, numbers
included (a ``metrics.jsonl`` is a file like any other: a tampered one may hold
``{"loss": "<script>..."}``); loss records whose values are not numbers are skipped and
counted on the page, like lines that are not JSON.

Exit codes: 0 written, 2 bad input (no run directory or no ``metrics.jsonl``, output in the
way), 6 disk full (one line with the location and the errno text; the previous page stays);
nothing is written then. 1 means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.report_html import (
    COPERNICUS_CREDIT,
    PALETTE,
    Cell,
    Page,
    Png,
    atomic_dir,
    esc,
    figure_html,
    fmt_num,
    key_values,
    new_figure,
    png_info,
    save_png,
    table,
)
from training import report
from training.errors import DiskFullError, TrainingError, no_space

logger = logging.getLogger(__name__)

#: Reconstruction PNGs written by the trainer: ``<stage>_step<global step>.png``.
IMAGE_NAME = re.compile(r"^(?P<stage>.+)_step(?P<step>\d+)\.png$")
#: Widest figure on the page in CSS pixels (the main column is 1240 px minus padding).
MAX_WIDTH = 1100
LOG_TAIL = 25
#: Band order of the shards (the pipeline -> trainer contract, as in ``training/export.py``).
SHARD_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


#: Keys of a loss record the page plots or computes with. A record where one of them is
#: not a number (a tampered or damaged ``metrics.jsonl``) is skipped and counted.
NUMBER_KEYS = ("stage_step", "samples", "loss", "loss_token", "loss_spectral", "lr",
               "samples_per_s", "tokens_per_s", "step_time_s", "data_wait_s")
#: Keys a loss record may leave out; when present they must be numbers too.
OPTIONAL_NUMBER_KEYS = ("grad_norm", "max_mem_gib", "time", "model_tflops", "mfu")
#: Integer keys of a ``stage_start`` record and of ``trainer_state.json`` the page computes
#: with; any other value there is dropped (shown as missing).
START_INT_KEYS = ("steps", "resumed_at_stage_step", "stage_index", "warmup_steps",
                  "micro_batch", "accumulation", "effective_batch", "world_size",
                  "params_encoder", "params_decoder", "params_total")
STATE_INT_KEYS = ("stage_index", "step_in_stage", "stage_steps", "global_step",
                  "samples_seen", "world_size")


class RunPageError(TrainingError):
    """The run directory cannot be reported on (missing, or no ``metrics.jsonl``)."""


@dataclass(frozen=True)
class Reconstruction:
    """One reconstruction PNG of the trainer and its per-group companion (None if absent)."""

    stage: str
    step: int
    rgb: Path
    groups: Path | None


@dataclass
class Run:
    """Everything the page shows, read from a run directory."""

    run_dir: Path
    records: list[dict[str, Any]]
    """Loss records, one per log interval, superseded ones removed (:func:`report.step_records`)."""
    starts: dict[str, dict[str, Any]]
    """Stage name -> its latest ``stage_start`` record, in run order."""
    resumes: int
    bad_lines: int
    """Lines of ``metrics.jsonl`` that are not JSON (a line being written, or damage)."""
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    """``trainer_state.json`` of ``checkpoints/latest`` plus ``tag``; None without one."""
    images: list[Reconstruction] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    log_warnings: int = 0
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    """``config_change`` records: a resume that changed the data or optimisation config."""

    @property
    def name(self) -> str:
        """The run's name from its config, else the directory's name."""
        return str(self.config.get("name") or self.run_dir.resolve().name)

    @property
    def stage_names(self) -> list[str]:
        """Stages of the config (or, without one, those that started), in run order."""
        stages = self.config.get("stages")
        names = [s.get("name") for s in stages if isinstance(s, dict)] \
            if isinstance(stages, list) else []
        return [str(n) for n in names if n] or list(self.starts)

    @property
    def model(self) -> dict[str, Any]:
        """The config's ``model`` section ({} when absent or not a mapping)."""
        model = self.config.get("model")
        return model if isinstance(model, dict) else {}


# --------------------------------------------------------------------------- reading


def load_run(run_dir: Path) -> Run:
    """Read a run directory. Raises RunPageError when it has no ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunPageError(f"run directory {run_dir} does not exist (expected runs/<name>)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RunPageError(f"no metrics.jsonl in {run_dir}: not a run directory, or the run has "
                           f"not logged yet (the trainer writes it at the start of each stage)")
    raw, bad = [], 0
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            raw.append(rec)
        else:
            bad += 1
    # Values reach the HTML and the plots: records whose values are not of the kind the
    # trainer writes (a tampered or damaged file) are skipped and counted, not shown.
    kept = [rec for rec in raw if _plausible(rec)]
    bad += len(raw) - len(kept)
    starts: dict[str, dict[str, Any]] = {}
    resumes = 0
    changes = []
    for rec in kept:
        if rec.get("event") == "stage_start":
            starts[rec["stage"]] = rec
            resumes += rec.get("resumed_at_stage_step") is not None
        elif rec.get("event") == "config_change":
            changes.append(rec)
    run = Run(run_dir, report.step_records(kept), starts, resumes, bad, config_changes=changes)
    run.config = _read_yaml(run_dir / "config.yaml")
    run.checkpoint = _latest_checkpoint(run_dir / "checkpoints")
    run.images = _reconstructions(run_dir / "images")
    if (run_dir / "export").is_dir():
        run.exports = sorted(p for p in (run_dir / "export").iterdir()
                             if p.is_file() and p.suffix in (".safetensors", ".pt"))
    log_path = run_dir / "train.log"
    if log_path.is_file():
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        # the page is shared: paths inside the run read relative to it, and the code's own
        # files (a warning names its source line) relative to where the packages are
        # installed, not as this machine's folders
        prefixes = sorted({f"{run_dir}/", f"{run_dir.resolve()}/", *_code_prefixes()}, key=len, reverse=True)
        run.log_tail = [_strip_prefixes(ln, prefixes) for ln in lines[-LOG_TAIL:]]
        run.log_warnings = sum(" WARNING " in ln or " ERROR " in ln for ln in lines)
    return run


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plausible(rec: dict[str, Any]) -> bool:
    """Whether a ``metrics.jsonl`` record has the value types the trainer writes.

    Loss records need a stage name and numbers under :data:`NUMBER_KEYS` (and
    :data:`OPTIONAL_NUMBER_KEYS` when present); ``stage_start`` records a stage name, with
    their integer keys dropped when they are not integers; ``config_change`` records a
    list of key names. Other events are kept as they are (the page does not show them).
    """
    event = rec.get("event")
    if event == "stage_start":
        if not isinstance(rec.get("stage"), str):
            return False
        for key in START_INT_KEYS:
            if key in rec and rec[key] is not None and not _is_int(rec[key]):
                del rec[key]
        return True
    if event == "config_change":
        keys = rec.get("keys")
        return isinstance(keys, list) and all(isinstance(k, str) for k in keys)
    if "loss" not in rec:
        return True
    return (event is None and isinstance(rec.get("stage"), str)
            and all(_is_number(rec.get(k)) for k in NUMBER_KEYS)
            and all(rec.get(k) is None or _is_number(rec[k]) for k in OPTIONAL_NUMBER_KEYS))


def _code_prefixes() -> set[str]:
    """Folders holding installed code: site-packages and this project's source root."""
    import sysconfig

    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")} | {str(Path(__file__).resolve().parents[1])}
    return {f"{r}/" for r in roots} | {f"{Path(r).resolve()}/" for r in roots}


def _strip_prefixes(line: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        line = line.replace(prefix, "")
    return line


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _latest_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    try:
        tag = (ckpt_dir / "latest").read_text().strip()
        state = json.loads((ckpt_dir / tag / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict):
        return None
    state.pop("config", None)
    state.pop("data_position", None)
    for key in STATE_INT_KEYS:  # the page computes with these: integers or nothing
        if key in state and not _is_int(state[key]):
            del state[key]
    if not isinstance(state.get("stage_name"), (str, type(None))):
        del state["stage_name"]
    return {"tag": tag, **state}


def _reconstructions(image_dir: Path) -> list[Reconstruction]:
    """The trainer's reconstruction PNGs, oldest first (by global step)."""
    found = []
    for p in image_dir.glob("*.png") if image_dir.is_dir() else ():
        m = IMAGE_NAME.match(p.name)
        if m is None:
            continue
        groups = report.groups_path(p)
        found.append(Reconstruction(m["stage"], int(m["step"]), p,
                                    groups if groups.is_file() else None))
    return sorted(found, key=lambda r: (r.step, r.stage))


# --------------------------------------------------------------------------- plots


def _spans(run: Run) -> list[tuple[str, int, int]]:
    return report.stage_spans(run.records)


def plot_loss(run: Run, path: Path) -> Png:
    """Total loss and both terms (:func:`training.report.loss_figure`, page width)."""
    return save_png(report.loss_figure(run.records, width_in=11, height_in=4.6), path)


def plot_lr(run: Run, path: Path) -> Png:
    """LR (linear) and, when logged, gradient norm (log) against the global step."""
    steps = [r["step"] for r in run.records]
    norms = [(r["step"], r["grad_norm"]) for r in run.records if r.get("grad_norm") is not None]
    fig = new_figure(11, 5.2 if norms else 3.0)
    axes = fig.subplots(2 if norms else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, [r["lr"] for r in run.records], color=PALETTE[0], lw=1.4)
    axes[0].set_ylabel("learning rate")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if norms:
        axes[1].plot(*zip(*norms, strict=True), color=PALETTE[5], lw=1.2)
        axes[1].set_ylabel("gradient norm\n(before clipping)")
        axes[1].set_yscale("log")
    for i, ax in enumerate(axes):
        report.mark_stages(ax, _spans(run), label=i == 0)
        ax.grid(alpha=0.3, lw=0.5)
    axes[-1].set_xlabel("optimizer step (whole run)")
    return save_png(fig, path)


def plot_throughput(run: Run, path: Path) -> Png:
    """Samples/s, tokens/s, and step time with the part spent waiting for data."""
    steps = [r["step"] for r in run.records]
    fig = new_figure(11, 7.0)
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(steps, [r["samples_per_s"] for r in run.records], color=PALETTE[0], lw=1.4)
    axes[0].set_ylabel("samples / s")
    axes[1].plot(steps, [r["tokens_per_s"] for r in run.records], color=PALETTE[2], lw=1.4)
    axes[1].set_ylabel("tokens / s")
    step_time = [r["step_time_s"] for r in run.records]
    wait = [r["data_wait_s"] for r in run.records]
    axes[2].fill_between(steps, 0, wait, color=PALETTE[1], alpha=0.6, lw=0,
                         label="waiting for data")
    axes[2].plot(steps, step_time, color="#000000", lw=1.4, label="step time")
    axes[2].set_ylabel("seconds per step")
    axes[2].legend(fontsize=8, loc="upper right", framealpha=0.9)
    for i, ax in enumerate(axes):
        report.mark_stages(ax, _spans(run), label=i == 0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, lw=0.5)
    axes[-1].set_xlabel("optimizer step (whole run)")
    return save_png(fig, path)


# --------------------------------------------------------------------------- page

DOT = " \u00b7 "
TIMES = "\u00d7"


def _by_stage(run: Run) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in run.records:
        out.setdefault(r["stage"], []).append(r)
    return out


def _median(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _num(value: Any) -> str:
    """A value for an HTML f-string: formatted like the tables, then escaped (numbers too:
    a value read from a file is whatever the file holds)."""
    return esc(fmt_num(value))


def _millions(n: Any) -> str | None:
    return f"{n / 1e6:.2f} M ({fmt_num(int(n))})" if isinstance(n, int) else None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    h, rem = divmod(s, 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def _done(run: Run, stage: str) -> int:
    """Optimizer steps done in ``stage``: the logged ones, or the checkpoint's if further."""
    logged = max((r["stage_step"] for r in run.records if r["stage"] == stage), default=0)
    ck = run.checkpoint or {}
    saved = ck.get("step_in_stage", 0) if ck.get("stage_name") == stage else 0
    resumed = run.starts.get(stage, {}).get("resumed_at_stage_step") or 0
    return max(logged, saved, resumed)


def _status(run: Run) -> str:
    """``finished``, ``stage k of n`` or ``started`` (a page cannot tell running from stopped)."""
    names = run.stage_names
    last = names[-1] if names else None
    planned = run.starts[last].get("steps") if last in run.starts else None
    if _is_int(planned) and _done(run, last) >= planned:
        return "finished"
    ck = run.checkpoint or {}
    current = run.records[-1]["stage"] if run.records else ck.get("stage_name")
    return f"stage {names.index(current) + 1} of {len(names)}" if current in names else "started"


def _headline(run: Run) -> str:
    ck = run.checkpoint or {}
    last = run.records[-1] if run.records else {}
    step = max(last.get("step", 0), ck.get("global_step") or 0)
    out = (f'<strong><span id="step-count">{esc(step)}</span> optimizer steps</strong>'
           f"{DOT}{esc(_status(run))}")
    planned = [run.starts[n].get("steps") for n in run.stage_names if n in run.starts]
    if len(planned) == len(run.stage_names) and all(_is_int(p) for p in planned):
        out += f"{DOT}{_num(sum(planned))} planned"  # type: ignore[arg-type]
    if last:
        out += (f"{DOT}{_num(last['samples'])} samples seen{DOT}loss "
                f"<strong>{_num(last['loss'])}</strong> (token {_num(last['loss_token'])}, "
                f"spectral {_num(last['loss_spectral'])})")
    return out


def _run_facts(run: Run) -> list[tuple[str, Any]]:
    """Config highlights for the summary's key-value list (None values are left out)."""
    m = run.model
    s = next(reversed(run.starts.values())) if run.starts else {}
    ck = run.checkpoint
    times = [r["time"] for r in run.records if isinstance(r.get("time"), (int, float))]
    params = [(k, _millions(s.get(f"params_{k}"))) for k in ("total", "encoder", "decoder")]
    return [
        ("run directory", Cell(f"<code>{esc(run.run_dir.resolve().name)}</code>")),
        ("model", m and (
            f"{m.get('preset', '?')} preset: embed {m.get('embed_dim')}, depth {m.get('depth')}, "
            f"decoder {m.get('decoder_embed_dim')} {TIMES} {m.get('decoder_depth')}, tokens "
            f"{m.get('patch_size')} px {TIMES} {m.get('band_patch_size')} bands, mask ratio "
            f"{m.get('mask_ratio')}")),
        ("parameters", DOT.join(f"{k} {v}" for k, v in params if v) or None),
        ("loss", f"{m.get('token_loss_weight', 1)} {TIMES} token MSE + "
                 f"{m.get('spectral_loss_weight', 1)} {TIMES} spectral-group-sum MSE"
                 + (" (normalised pixels)" if m.get("norm_pix_loss") else "")),
        ("processes", s and f"{s.get('world_size')} on {s.get('device')}"),
        ("precision, ZeRO", s and f"{'bf16' if s.get('bf16') else 'fp32'}, "
                                  f"ZeRO-{s.get('zero_stage')}"),
        ("normalisation", run.config.get("normalisation") or s.get("normalisation")),
        ("seed", run.config.get("seed")),
        ("latest checkpoint", Cell(
            f"<code>{esc(ck['tag'])}</code>{DOT}stage {esc(ck.get('stage_name'))}, step "
            f"{esc(ck.get('step_in_stage'))}/{esc(ck.get('stage_steps'))}{DOT}"
            f"{esc(fmt_num(ck.get('samples_seen')))} samples{DOT}"
            f"{esc(ck.get('world_size'))} processes") if ck else "none yet"),
        ("exported weights", ", ".join(p.name for p in run.exports) or None),
        ("logged", times and f"{_when(min(times))} to {_when(max(times))} "
                             f"({_duration(max(times) - min(times))})"),
        ("resumed", f"{run.resumes} time(s)" if run.resumes else None),
        ("config changed on resume", "; ".join(
            f"step {c.get('step')}: {', '.join(c['keys'])}" for c in run.config_changes)
         or None),
    ]


def _input_shape(start: dict[str, Any]) -> str:
    """``96 px · 20 m · T 3``: what a stage trains on (size, GSD when recorded, dates)."""
    parts = [f"{fmt_num(start.get('img_size'))} px"]
    if _is_number(start.get("gsd")):
        parts.append(f"{start['gsd']:g} m")
    parts.append(f"T {fmt_num(start.get('dates', 1))}")
    return DOT.join(parts)


def _summary(run: Run, page: Page) -> None:
    page.headline = _headline(run)
    rows: list[list[Any]] = []
    by_stage = _by_stage(run)
    for name in run.stage_names:
        s = run.starts.get(name)
        if s is None:
            rows.append([name, *([None] * 8), Cell('<span class="muted">not started</span>')])
            continue
        recs = by_stage.get(name, [])
        batch = (f"{s.get('micro_batch')} {TIMES} {s.get('accumulation')} {TIMES} "
                 f"{s.get('world_size')} = {s.get('effective_batch')}")
        rows.append([name, s.get("dataset"), Cell(esc(_input_shape(s)), True), Cell(esc(batch), True),
                     s.get("blr"), s.get("lr"), s.get("warmup_steps"),
                     Cell(f"{_num(_done(run, name))} / {_num(s.get('steps'))}", True),
                     s.get("tokens_per_step"), recs[-1]["loss"] if recs else None])
    blocks = [key_values((k, v) for k, v in _run_facts(run) if v not in (None, "", {}, []))]
    if run.bad_lines:
        blocks.append(f'<p class="warn">{esc(run.bad_lines)} line(s) of metrics.jsonl are not '
                      "JSON records of the trainer's kind and were skipped (a line being "
                      "written, or a damaged or edited file).</p>")
    if not run.records:
        blocks.append('<p class="warn">No loss logged yet: the first record appears after '
                      f"log_every = {esc(run.config.get('log_every', '?'))} steps.</p>")
    blocks.append(table(
        ["stage", "dataset", "input", "batch", "blr", "peak LR", "warm-up", "steps",
         "tokens / step", "last loss"], rows,
        caption=f"stages: input = chip side, ground distance and dates per sample (T); "
                f"batch = micro-batch {TIMES} accumulation {TIMES} processes = effective "
                f"batch; peak LR = blr {TIMES} effective batch / 256; warm-up and steps in "
                "optimizer steps (done / planned)",
        numeric=(3, 4, 5, 6, 7, 8, 9), table_id="stages"))
    config = run.run_dir / "config.yaml"
    if config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        blocks.append('<details><summary>resolved config (config.yaml)</summary>'
                      f'<div class="scroll"><pre>{esc(text)}</pre></div></details>')
    page.section("summary", "Run summary", *blocks)


def _loss_section(run: Run, page: Page, png: Png | None) -> None:
    if png is None:
        page.section("loss", "Loss", '<p class="note">No loss logged yet.</p>')
        return
    rows = []
    for stage, recs in _by_stage(run).items():
        row: list[Any] = [stage, f"{recs[0]['step']}\u2013{recs[-1]['step']}"]
        for key, _, _ in report.LOSS_TERMS:
            vals = [r[key] for r in recs]
            row += [vals[0], vals[-1], min(vals)]
        rows.append(row)
    head = [f"{n} {w}" for n in ("total", "token", "spectral") for w in ("first", "last", "min")]
    caption = ("Mean over each log interval. Token MSE: pixels of the masked 3D tokens (the MAE "
               "term). Spectral-group-sum MSE: the sums over the spectral groups of prediction "
               "and target at every position (the spectral-to-spectral term). Total = their "
               "weighted sum. Dashed lines and shading mark the stages; a new stage starts a "
               "fresh optimizer and LR warm-up, and sees larger images.")
    page.section(
        "loss", "Loss",
        figure_html(png, alt="total loss, token MSE and spectral-group-sum MSE against the step",
                    max_css_width=MAX_WIDTH, caption=caption),
        table(["stage", "steps", *head], rows, numeric=tuple(range(2, 11)),
              caption="per stage: first and last logged interval, lowest interval mean",
              table_id="loss-per-stage"),
    )


def _lr_section(page: Page, png: Png | None) -> None:
    if png is None:
        return
    caption = ("LR at the last step of each log interval: linear warm-up, then cosine decay to "
               "min_lr, restarted per stage. Gradient norm as DeepSpeed reports it, before "
               "clipping at grad_clip.")
    page.section("lr", "Learning rate", figure_html(
        png, alt="learning rate and gradient norm against the step", max_css_width=MAX_WIDTH,
        caption=caption))


def _throughput_section(run: Run, page: Page, png: Png | None) -> None:
    if png is None:
        page.section("throughput", "Throughput", '<p class="note">No steps logged yet.</p>')
        return
    rows = []
    for stage, recs in _by_stage(run).items():
        step_t = _median([r["step_time_s"] for r in recs])
        wait = _median([r["data_wait_s"] for r in recs])
        tokens = _median([r["tokens_per_s"] for r in recs])
        mfu = _median([r.get("mfu") for r in recs])
        rows.append([stage, _median([r["samples_per_s"] for r in recs]),
                     None if tokens is None else round(tokens), step_t, wait,
                     f"{wait / step_t:.0%}" if wait is not None and step_t else None,
                     _median([r.get("model_tflops") for r in recs]),
                     None if mfu is None else f"{mfu:.1%}",
                     max((r["max_mem_gib"] for r in recs if r.get("max_mem_gib") is not None),
                         default=None)])
    head = ["stage", "samples / s", "tokens / s", "step time s", "data wait s", "wait share",
            "model TFLOP/s per device", "MFU", "max GPU memory GiB"]
    # Columns no stage has a value for are left out: GPU memory on CPU runs, the model
    # TFLOP/s in runs logged before they were recorded, the MFU where the peak is unknown.
    keep = [i for i in range(len(head)) if i < 6 or any(row[i] is not None for row in rows)]
    head, rows = [head[i] for i in keep], [[row[i] for i in keep] for row in rows]
    caption = ("Per log interval, all processes together. Tokens per second count every 3D token "
               "of a sample (visible and masked). Model TFLOP/s: the matrix products of forward "
               "and backward for the masking trained (training/flops.py), per device; MFU: that "
               "over the device's dense bf16 peak, shown only where the peak is known. The "
               "orange area is the part of a step spent waiting for the next batch: when it "
               "approaches the step time, the data loader, not the model, limits the run.")
    page.section(
        "throughput", "Throughput",
        figure_html(png, alt="samples per second, tokens per second, step time and data wait",
                    max_css_width=MAX_WIDTH, caption=caption),
        table(head, rows, caption="median per stage", numeric=tuple(range(1, len(head))),
              table_id="throughput-per-stage"),
        page_break=True,
    )


RGB_CAPTION = ("True colour (B04, B03, B02), one 2-98 % stretch per channel from the input for "
               "all three panels. Grey: hidden values; B04 belongs to another spectral group than "
               "B03 and B02, so it is hidden apart.")
GROUPS_CAPTION = ("Each spectral group (the bands of one token) as a colour image: red = its last "
                  "band, green = the middle one, blue = the first; one 2-98 % stretch per group "
                  "from the input. Each group has its own mask; MSE over its hidden pixels.")


def _images_section(run: Run, page: Page, pngs: dict[Path, Png]) -> None:
    latest = {rec.stage: rec for rec in run.images}
    if not latest:
        page.section("reconstructions", "Reconstructions",
                     '<p class="note">No reconstruction images yet (written every image_every '
                     "steps and at the end of each stage).</p>", page_break=True)
        return
    blocks = [f'<p class="note">The latest image of each stage, newest first; '
              f"{esc(len(run.images))} written in all (in images/). Input and masked input "
              "are the sample the model saw; the reconstruction shows the prediction at the "
              "masked tokens with the visible pixels pasted back.</p>"]
    model = run.model
    band_patch = model.get("band_patch_size", 3)
    if model.get("num_bands", len(SHARD_BANDS)) == len(SHARD_BANDS) and _is_int(band_patch) \
            and band_patch > 0:
        groups = report.spectral_groups(len(SHARD_BANDS), band_patch)
        names = DOT.join(f"G{g + 1}: {' '.join(SHARD_BANDS[i] for i in idx)}"
                         for g, idx in enumerate(groups))
        blocks.append(f'<p class="note">Spectral groups (the bands of one token): '
                      f'{esc(names)}.</p>')
    for rec in sorted(latest.values(), key=lambda r: -r.step):
        where = f"{rec.stage} step {rec.step}"
        blocks.append(f"<h3>{esc(rec.stage)}, step {esc(rec.step)}</h3>")
        blocks.append(figure_html(pngs[rec.rgb], caption=RGB_CAPTION,
                                  alt=f"input, masked input and reconstruction in true colour, "
                                      f"{where}"))
        if rec.groups is None:
            blocks.append('<p class="note">No per-group figure for this image (written by a '
                          "trainer version without it).</p>")
            continue
        blocks.append(figure_html(pngs[rec.groups], caption=GROUPS_CAPTION,
                                  alt=f"input, masked input and reconstruction per spectral "
                                      f"group, {where}"))
    page.section("reconstructions", "Reconstructions", *blocks, page_break=True)


def _log_section(run: Run, page: Page) -> None:
    if not run.log_tail:
        return
    note = (f'<p class="warn">{esc(run.log_warnings)} warning or error line(s) in '
            "train.log.</p>" if run.log_warnings
            else '<p class="note">No warnings or errors in train.log.</p>')
    tail = esc("\n".join(run.log_tail))
    page.section("log", "Log", note,
                 f"<details><summary>last {esc(len(run.log_tail))} lines of train.log</summary>"
                 f'<div class="scroll"><pre>{tail}</pre></div></details>')


def render_page(run: Run, pngs: dict[str, Png | None], images: dict[Path, Png]) -> str:
    """The page's HTML, referring to PNGs already written into the report directory.

    Args:
        run: what :func:`load_run` read.
        pngs: the plots by name (``loss``, ``lr``, ``throughput``; None without records).
        images: the copied reconstruction PNGs, by their path in the run directory.
    """
    written = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    page = Page(f"Pretraining run: {run.name}",
                subtitle=f"SpectralGPT masked autoencoder{DOT}{run.run_dir.resolve().name}",
                credits=[f"{COPERNICUS_CREDIT} (reconstruction images), processed by ESA.",
                         f"Written by python -m training.run_page at {written} from "
                         f"{run.run_dir.resolve().name}; static page, no scripts, no network resources."])
    _summary(run, page)
    _loss_section(run, page, pngs["loss"])
    _lr_section(page, pngs["lr"])
    _throughput_section(run, page, pngs["throughput"])
    _images_section(run, page, images)
    _log_section(run, page)
    return page.render()


def write_run_page(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``<run_dir>/report/index.html`` (or ``out/index.html``) and its PNGs; return it.

    The page replaces a previous one atomically (:func:`pipeline.report_html.atomic_dir`).
    The latest reconstruction of each stage is copied next to it, so the directory stands
    alone (zip it, mail it, serve it).

    Raises:
        RunPageError: no run directory or no ``metrics.jsonl``.
        FileExistsError: ``out`` exists and is not a previous page.
        DiskFullError: no space for the page (its temporary folder is removed, a previous
            page stays as it was).
    """
    run = load_run(Path(run_dir))
    out = Path(out) if out is not None else run.run_dir / "report"
    try:
        return _write_page(run, out)
    except OSError as exc:
        cause = no_space(exc)
        if cause is None:
            raise
        raise DiskFullError.at("the run page", out, cause) from None


def _write_page(run: Run, out: Path) -> Path:
    with atomic_dir(out) as tmp:
        pngs: dict[str, Png | None] = {"loss": None, "lr": None, "throughput": None}
        if run.records:
            pngs = {"loss": plot_loss(run, tmp / "loss.png"), "lr": plot_lr(run, tmp / "lr.png"),
                    "throughput": plot_throughput(run, tmp / "throughput.png")}
        images: dict[Path, Png] = {}
        for rec in {rec.stage: rec for rec in run.images}.values():
            for src, prefix in ((rec.rgb, "recon_"), (rec.groups, "recon_groups_")):
                if src is not None:
                    shutil.copyfile(src, tmp / f"{prefix}{src.name}")
                    images[src] = png_info(tmp / f"{prefix}{src.name}")
        (tmp / "index.html").write_text(render_page(run, pngs, images), encoding="utf-8")
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (0 written, 2 bad input, 6 disk full)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.run_page",
        description="Write the static HTML page of a pretraining run (index.html + PNGs): "
                    "summary, loss terms, LR, throughput, latest reconstructions.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, runs/<name>")
    parser.add_argument("--out", help="page directory (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_run_page(Path(args.run_dir), Path(args.out) if args.out else None)
    except TrainingError as exc:  # RunPageError, DiskFullError
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the page: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
