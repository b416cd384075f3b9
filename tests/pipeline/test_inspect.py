"""`python -m pipeline.inspect`: stretch math, CLI contract, and the page as headless Chromium sees it.

The browser test drives Debian's `chromium` through the DevTools protocol over
`--remote-debugging-pipe` (JSON messages on file descriptors 3 and 4), so it needs no Python
package beyond the standard library: it records console messages, uncaught exceptions, log
entries and failed requests, counts broken images, reads the chip count and takes a
full-page screenshot. Chromium is installed by `scripts/install_chromium.sh`.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from pipeline import inspect as insp
from tests.helpers.synthetic_dataset import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "europe"
    write_synthetic_dataset(root, seed=0)
    return root


@pytest.fixture(scope="module")
def report(dataset: Path) -> Path:
    assert insp.main([str(dataset), "--per-split", "4"]) == 0
    return dataset / "report" / "index.html"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


# -- stretch ------------------------------------------------------------------------------


def test_stretch_maps_known_reflectance() -> None:
    refl = np.array([0.0, 0.05, 0.1, 0.2, 0.3])
    assert np.allclose(insp.stretch(refl, 0.0, 0.2), [0.0, 0.25, 0.5, 1.0, 1.0])
    assert np.allclose(insp.stretch(np.array([0.1]), 0.0, 0.2, gamma=2.0), [np.sqrt(0.5)])


def test_composite_uses_stored_percentiles_and_blackens_nodata() -> None:
    chip = np.full((12, 2, 2), 1000, dtype=np.uint16)  # reflectance 0.1 everywhere
    chip[3, 0, 0] = 0  # red band nodata at one pixel
    stats = {"percentiles": {"p2": [0] * 12, "p98": [2000] * 12}}
    idx = [3, 2, 1]
    lohi = insp.stretch_range(stats, idx, 1e-4)
    assert lohi == pytest.approx((0.0, 0.2))
    rgb = insp.composite(chip, idx, lohi=lohi)
    assert rgb.shape == (2, 2, 3)
    assert np.allclose(rgb[0, 0], 0.0)  # nodata -> black
    assert np.allclose(rgb[1, 1], 0.5)  # 0.1 on a 0..0.2 stretch
    # a time stack shows its first date
    stack = np.stack([chip, chip * 2])
    assert np.allclose(insp.composite(stack, idx, lohi=lohi)[1, 1], 0.5)


def test_composite_falls_back_to_chip_percentiles() -> None:
    chip = np.zeros((12, 10, 10), dtype=np.uint16)
    chip[:, :, :] = np.arange(1, 101, dtype=np.uint16).reshape(10, 10) * 100
    assert insp.stretch_range(None, [3, 2, 1], 1e-4) is None
    rgb = insp.composite(chip, [3, 2, 1])
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    assert 0.4 < float(np.median(rgb)) < 0.6


# -- CLI ----------------------------------------------------------------------------------


def test_png_writes_only_the_contact_sheet(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "sheet"
    assert insp.main([str(dataset), "--png", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png"]
    png = (out / "contact_sheet.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # same seed, same sheet
    again = tmp_path / "again.png"
    assert insp.main([str(dataset / "manifest.json"), "--png", "--out", str(again)]) == 0
    assert again.read_bytes() == png


def test_report_is_self_contained(report: Path, dataset: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert "http" not in html  # no CDN, font or link: works offline
    assert "<script" not in html and "url(" not in html
    assert '<span id="chip-count">40</span>' in html
    assert "Contains modified Copernicus Sentinel data" in html
    imgs = [p for p in report.parent.iterdir() if p.suffix == ".png"]
    assert {"contact_sheet.png", "footprints.png", "quality.png"} <= {p.name for p in imgs}
    for p in imgs:
        assert f'src="{p.name}"' in html
    assert "@media print" in html
    assert not [p for p in dataset.iterdir() if p.name.startswith(".report")]  # no temp dirs left


def test_report_replaces_previous_report(report: Path, dataset: Path) -> None:
    (report.parent / "stale.png").write_bytes(b"x")
    assert insp.main([str(dataset), "--per-split", "4", "--seed", "1"]) == 0
    assert not (report.parent / "stale.png").exists()
    assert report.is_file()


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "does not exist"),
        ("empty", "no manifest.json"),
        ("format", "is not one this tool reads (spectralgpt-shards/1, spectralgpt-shards/2)"),
        ("json", "not a readable JSON manifest"),
        ("shard", "is missing"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, setup: str, needle: str) -> None:
    d = tmp_path / "ds"
    if setup != "missing":
        d.mkdir()
    if setup == "format":
        (d / "manifest.json").write_text(json.dumps({"format": "other/9", "datasets": {}}))
    if setup == "json":
        (d / "manifest.json").write_text("{not json")
    if setup == "shard":
        write_synthetic_dataset(d, samples={"train": 2, "val": 1})
        (d / "s96_g10m" / "val-000000.tar").unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = _cli(str(d))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_out_that_is_not_a_report_is_refused(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert insp.main([str(dataset), "--out", str(tmp_path)]) == 2
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_time_stacks_and_bbox_config(tmp_path: Path) -> None:
    root = tmp_path / "ts"
    write_synthetic_dataset(root, datasets=(("s64_g10m_t3", 64, 3),), samples={"train": 3, "val": 2}, aoi=None)
    assert insp.main([str(root), "--out", str(tmp_path / "r")]) == 0
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert '<span id="chip-count">5</span>' in html
    assert "TCHW" in html


def test_version_subdirectory(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "v1", samples={"train": 2, "val": 1})
    with pytest.raises(insp.ReportError, match="versions v1"):
        insp.resolve_manifest(tmp_path)
    assert insp.resolve_manifest(tmp_path, "v1") == tmp_path / "v1" / "manifest.json"
    with pytest.raises(insp.ReportError, match="versions found: v1"):
        insp.resolve_manifest(tmp_path, "v2")


# -- the page in a real browser --------------------------------------------------------------


def _chromium() -> str | None:
    """Path of a Chromium binary, installing Debian's package if possible."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    script = REPO / "scripts" / "install_chromium.sh"
    try:
        subprocess.run(["bash", str(script)], check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("chromium")


class DevTools:
    """Minimal Chrome DevTools protocol client over `--remote-debugging-pipe` (fd 3 in, fd 4 out)."""

    FLAGS: ClassVar[list[str]] = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe",
    ]

    def __init__(self, exe: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # park the child's ends above 10 so dup2 onto 3 and 4 cannot clobber each other
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [exe, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=child_fds, pass_fds=(3, 4, hi_r, hi_w),
        )
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            m = self._read(timeout)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"chromium exited: {err[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _distinct_colours(png: bytes) -> int:
    """Number of distinct colours in a PNG (decoded with matplotlib's reader)."""
    from matplotlib.image import imread

    img = (imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(np.uint32)
    return len(np.unique(img[..., 0] << 16 | img[..., 1] << 8 | img[..., 2]))


def test_page_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not found and scripts/install_chromium.sh could not install it (needs root + apt)")
    expected = insp.total_chips(json.loads((report.parent.parent / "manifest.json").read_text()))
    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        dt = DevTools(exe, Path(profile))
        try:
            targets = dt.send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            sid = dt.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                dt.send(f"{domain}.enable", session=sid)
            dt.send("Emulation.setDeviceMetricsOverride",
                    {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sid)
            dt.events.clear()
            nav = dt.send("Page.navigate", {"url": report.resolve().as_uri()}, session=sid)
            assert "errorText" not in nav, nav
            dt.wait_event("Page.loadEventFired", timeout=30)
            check = dt.send("Runtime.evaluate", {"returnByValue": True, "awaitPromise": True, "expression": """
                (async () => {
                  const imgs = [...document.images];
                  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
                  return {
                    images: imgs.length,
                    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
                    chipCount: document.getElementById('chip-count')?.textContent,
                    text: document.body.innerText,
                    height: document.documentElement.scrollHeight,
                  };
                })()"""}, session=sid)["result"]["value"]
            shot = dt.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": min(check["height"], 12000), "scale": 1},
            }, session=sid, timeout=60)
            pdf = dt.send("Page.printToPDF", {"printBackground": False}, session=sid, timeout=60)
        finally:
            dt.close()
    png = base64.b64decode(shot["data"])
    (report.parent.parent / "report_screenshot.png").write_bytes(png)  # kept for a human look

    errors = [e for e in dt.events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e for e in dt.events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"]["type"] in ("error", "assert")]
    errors += [e for e in dt.events if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    errors += [e for e in dt.events if e.get("method") == "Network.loadingFailed"]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in dt.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(u.startswith("file://") for u in requests), requests  # nothing from the network

    assert check["images"] >= 5
    assert check["broken"] == []
    assert check["chipCount"] == str(expected) == "40"
    assert f"{expected} chips" in check["text"]
    assert "Contains modified Copernicus Sentinel data" in check["text"]

    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert _distinct_colours(png) > 100  # text, tables and chip images, not a blank page
    assert base64.b64decode(pdf["data"])[:5] == b"%PDF-"
