"""`python -m training.run_page`: the page of a fake two-stage run, as headless Chromium sees it.

The fake run directory is written mostly by the trainer's own code, without DeepSpeed: the
config by `dump_config`, one metrics line per log interval by `engine._log`, the reconstruction
PNGs by `engine._save_images` on a real tiny model's forward pass, and the page itself by
`report.plot_loss_curve`, the call the trainer makes at the end of every stage. Only the
`stage_start` records (`pretrain._log_derived`, which needs a shard set) are written here.
The browser is driven with the DevTools client of `tests/pipeline/test_inspect.py`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.pipeline.test_inspect import DevTools, _chromium, _distinct_colours
from training import engine, report, run_page
from training.checkpoint import TrainerState
from training.config import dump_config, load_config
from training.models.spectral_mae import SpectralMAE

REPO = Path(__file__).resolve().parents[2]
BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
TOTAL_STEPS = 280  # tiny_cpu.yaml: 1600 samples / 8 + 640 samples / 8


def _image(img_size: int, seed: int) -> torch.Tensor:
    """`[1, 12, H, W]`: smooth per-band patterns plus noise, so the panels show structure."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(0, 6, img_size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    bands = torch.stack([torch.sin(xx * (1 + b / 6) + yy * (b % 3)) for b in range(len(BANDS))])
    return (bands + 0.3 * torch.randn(bands.shape, generator=gen))[None]


def _window(step: int, steps: int) -> dict[str, float]:
    """What `train_stage` sums over `steps` optimizer steps: falling losses, steady timings."""
    decay = math.exp(-step / 90)
    token, spectral = 0.45 + 0.8 * decay, 2.6 + 8 * decay
    return {"loss": (token + spectral) * steps, "loss_token": token * steps,
            "loss_spectral": spectral * steps, "steps": steps, "step_time": 0.3 * steps,
            "data_wait": 0.01 * steps}


def _stage_start(run: Any, index: int, model: SpectralMAE, step: int) -> dict[str, Any]:
    """The first metrics record of a stage, with the keys `pretrain._log_derived` writes."""
    stage = run.stages[index]
    gb, mb = run.global_batch_for(stage), run.micro_batch_for(stage)
    steps = math.ceil(stage.samples / gb)
    enc, dec = model.encoder_parameters(), model.decoder_parameters()
    return {
        "event": "stage_start", "stage": stage.name, "stage_index": index,
        "dataset": f"{stage.dataset}/{stage.split}", "shards": 2, "dataset_samples": 9,
        "img_size": stage.img_size, "world_size": 2, "device": "cpu", "micro_batch": mb,
        "accumulation": gb // (2 * mb), "effective_batch": gb, "blr": stage.blr,
        "lr": stage.blr * gb / 256, "steps": steps,
        "warmup_steps": math.ceil(stage.warmup_samples / gb), "samples": steps * gb,
        "tokens_per_sample": model.cfg.num_tokens, "visible_per_sample": model.cfg.num_visible,
        "tokens_per_step": model.cfg.num_tokens * gb,
        "encoder_tokens_per_step": model.cfg.num_visible * gb, "params_encoder": enc,
        "params_decoder": dec, "params_total": enc + dec, "zero_stage": 2, "bf16": run.bf16,
        "normalisation": run.normalisation, "step": step, "resumed_at_stage_step": None,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-stage tiny run: config, metrics, images, checkpoint state and log."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_page"
    run = load_config(None, ["name=tiny_page", f"output_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(run))
    metrics = report.MetricsWriter(run_dir / "metrics.jsonl")
    step = samples = 0
    for index, stage in enumerate(run.stages):
        torch.manual_seed(index)
        model = SpectralMAE(run.model_for(stage)).eval()
        start = _stage_start(run, index, model, step)
        metrics.write(start)
        steps, peak_lr = start["steps"], start["lr"]
        ctx = SimpleNamespace(
            global_batch=start["effective_batch"], stage=stage, run=run, rank=0, run_dir=run_dir,
            schedule=SimpleNamespace(total_steps=steps), run_steps_left=TOTAL_STEPS - step,
            device=torch.device("cpu"), model_cfg=model.cfg, bands=BANDS)
        for done in range(run.log_every, steps + 1, run.log_every):
            step += run.log_every
            samples += run.log_every * ctx.global_batch
            norm = 2 + math.exp(-step / 60)
            ctx.engine = SimpleNamespace(module=model, get_global_grad_norm=lambda n=norm: n)
            state = SimpleNamespace(global_step=step, step_in_stage=done, samples_seen=samples)
            engine._log(ctx, metrics, _window(step, run.log_every), state,
                        peak_lr * (1 - done / steps), model.cfg.num_tokens,
                        time.perf_counter(), 0)
            if done % run.image_every == 0 or done == steps:
                engine._save_images(ctx, _image(stage.img_size, step), step)
    ckpt = run_dir / "checkpoints" / f"global_step{step}"
    ckpt.mkdir(parents=True)
    state = TrainerState(1, run.stages[1].name, 80, 80, step, samples, 2, {}, run.to_dict())
    (ckpt / "trainer_state.json").write_text(json.dumps(asdict(state)))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    (run_dir / "train.log").write_text("2026-01-01 00:00:00,000 INFO stage 1 'stage1_96px'\n"
                                       "2026-01-01 00:05:00,000 INFO done: 280 steps\n")
    # the trainer's call at the end of each stage
    assert report.plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    return run_dir


def test_trainer_writes_per_group_figures(run_dir: Path) -> None:
    rgb = sorted(p.name for p in (run_dir / "images").glob("*.png"))  # one per reconstruction
    assert rgb == [f"stage1_96px_step{s:07d}.png" for s in (50, 100, 150, 200)] + [
        f"stage2_128px_step{s:07d}.png" for s in (250, 280)]
    for name in rgb:
        groups = report.groups_path(run_dir / "images" / name)
        assert groups.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = [[BANDS[i] for i in g] for g in report.spectral_groups(len(BANDS))]
    assert groups == [["B01", "B02", "B03"], ["B04", "B05", "B06"], ["B07", "B08", "B8A"],
                      ["B09", "B11", "B12"]]


def test_page_is_self_contained_and_complete(run_dir: Path) -> None:
    page = run_dir / "report" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert "http" not in html and "<script" not in html and "url(" not in html
    assert f'<span id="step-count">{TOTAL_STEPS}</span> optimizer steps' in html
    for needle in ("token MSE", "spectral-group-sum MSE", "samples / s", "tokens / s",
                   "global_step280", "200 / 200", "80 / 80", "G4: B09 B11 B12", "@media print"):
        assert needle in html, needle
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert pngs == ["loss.png", "lr.png", "recon_groups_stage1_96px_step0000200.png",
                    "recon_groups_stage2_128px_step0000280.png",
                    "recon_stage1_96px_step0000200.png", "recon_stage2_128px_step0000280.png",
                    "throughput.png"]
    for name in pngs:
        assert f'src="{name}"' in html
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report")]  # no temp dirs


def test_a_run_that_logged_one_step_plots_without_collapsing(tmp_path: Path) -> None:
    """A short run logs a single point at step 2 while its stage starts at 0: the stage label
    left of the plotted range once made constrained layout collapse the axes (a warning with
    the library's path in train.log and on the page, and an empty plot)."""
    import warnings

    record = {"step": 2, "stage": "stage1_96px", "stage_step": 2, "loss": 14.6,
              "loss_token": 1.32, "loss_spectral": 13.28}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = report.loss_figure([record])
        fig.canvas.draw()
    box = fig.axes[0].get_position()
    assert box.width > 0.5 and box.height > 0.5  # the axes keep most of the figure


def test_log_lines_name_no_folder_of_this_machine(run_dir: Path, tmp_path: Path) -> None:
    """A warning in train.log names its source file: on the page it reads relative to the
    installed packages, not as this machine's folders."""
    import shutil
    import sysconfig

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    lib = sysconfig.get_paths()["purelib"]
    with (copy / "train.log").open("a") as f:
        f.write(f"12:00:00 WARNING {lib}/matplotlib/figure.py:1: UserWarning: x\n"
                f"12:00:01 WARNING {REPO}/pipeline/report_html.py:232: UserWarning: y\n"
                f"12:00:02 INFO checkpoint {copy}/checkpoints/global_step4\n")
    tail = "\n".join(run_page.load_run(copy).log_tail[-3:])
    assert lib not in tail and str(REPO) not in tail and str(tmp_path) not in tail
    assert "matplotlib/figure.py:1" in tail and "pipeline/report_html.py:232" in tail
    assert "checkpoints/global_step4" in tail


def test_resumed_lines_are_superseded() -> None:
    lines: list[dict[str, Any]] = [{"event": "stage_start", "stage": "s", "step": 0}]
    lines += [{"step": s, "stage": "s", "stage_step": s, "loss": 1.0} for s in (10, 20, 30)]
    lines += [{"event": "stage_start", "stage": "s", "step": 20, "resumed_at_stage_step": 20}]
    lines += [{"step": 30, "stage": "s", "stage_step": 30, "loss": 0.5}]
    kept = report.step_records(lines)
    assert [(r["step"], r["loss"]) for r in kept] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    assert report.stage_spans(kept) == [("s", 0, 30)]


def test_page_failure_never_stops_training(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture,
                                           tmp_path: Path) -> None:
    def broken(run_dir: Path, out: Path | None = None) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(run_page, "write_run_page", broken)
    with caplog.at_level(logging.WARNING, logger="training.report"):
        assert report.plot_loss_curve(run_dir / "metrics.jsonl", tmp_path / "loss_curve.png")
    assert "could not write the run page" in caplog.text and "disk full" in caplog.text
    assert (tmp_path / "loss_curve.png").is_file()


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_bad_input_one_line_exit_2(tmp_path: Path, setup: str) -> None:
    target = tmp_path / "run"
    if setup == "empty":
        target.mkdir()
    r = subprocess.run([sys.executable, "-m", "training.run_page", str(target)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    assert ("metrics.jsonl" if setup == "empty" else "does not exist") in lines[0]
    assert sorted(tmp_path.rglob("*")) == ([target] if setup == "empty" else [])


def test_cli_regenerates_page(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "page"
    assert run_page.main([str(run_dir), "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "throughput.png").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert run_page.main([str(run_dir), "--out", str(tmp_path / "mine")]) == 2  # not a page
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


# -- the page in a real browser --------------------------------------------------------------

CHECK_JS = """
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || !i.naturalWidth).map(i => i.getAttribute('src')),
    stepCount: document.getElementById('step-count')?.textContent,
    text: document.body.innerText,
    height: document.documentElement.scrollHeight,
    wide: document.documentElement.scrollWidth > window.innerWidth,
  };
})()"""


def _open(page: Path, profile: Path) -> tuple[dict[str, Any], bytes, bytes, list[dict[str, Any]]]:
    """Load `page` at 1280 x 900: the DOM check, a full-page screenshot, a PDF, the events."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not found and scripts/install_chromium.sh could not install it "
                    "(needs root + apt)")
    dt = DevTools(exe, profile)
    try:
        targets = dt.send("Target.getTargets")["targetInfos"]
        target = next(t for t in targets if t["type"] == "page")
        sid = dt.send("Target.attachToTarget",
                      {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.send(f"{domain}.enable", session=sid)
        dt.send("Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=sid)
        dt.events.clear()
        nav = dt.send("Page.navigate", {"url": page.resolve().as_uri()}, session=sid)
        assert "errorText" not in nav, nav
        dt.wait_event("Page.loadEventFired", timeout=30)
        check = dt.send("Runtime.evaluate", {"returnByValue": True, "awaitPromise": True,
                                             "expression": CHECK_JS}, session=sid)
        check = check["result"]["value"]
        clip = {"x": 0, "y": 0, "width": 1280, "height": min(check["height"], 12000), "scale": 1}
        shot = dt.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                  "clip": clip}, session=sid, timeout=60)
        pdf = dt.send("Page.printToPDF", {"printBackground": False}, session=sid, timeout=60)
    finally:
        dt.close()
    return check, base64.b64decode(shot["data"]), base64.b64decode(pdf["data"]), dt.events


def test_page_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = run_dir / "report" / "index.html"
    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        check, png, pdf, events = _open(page, Path(profile))
    (run_dir / "report_screenshot.png").write_bytes(png)  # kept for a human look

    def of(method: str) -> list[dict[str, Any]]:
        return [e for e in events if e.get("method") == method]

    errors = of("Runtime.exceptionThrown") + of("Network.loadingFailed")
    errors += [e for e in of("Runtime.consoleAPICalled")
               if e["params"]["type"] in ("error", "assert")]
    errors += [e for e in of("Log.entryAdded") if e["params"]["entry"]["level"] == "error"]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in of("Network.requestWillBeSent")]
    assert requests and all(u.startswith("file://") for u in requests), requests  # no network

    assert check["images"] == 7 and check["broken"] == []
    assert check["stepCount"] == str(TOTAL_STEPS)
    assert f"{TOTAL_STEPS} optimizer steps" in check["text"] and "finished" in check["text"]
    assert not check["wide"]  # no horizontal scrolling on a laptop-sized window
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert _distinct_colours(png) > 100  # plots and images, not a blank page
    assert pdf[:5] == b"%PDF-"
