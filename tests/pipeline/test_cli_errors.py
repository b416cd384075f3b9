"""Bad input: one clear line, a non-zero exit, nothing written."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.build_shards import main
from tests.helpers.loopback import free_port
from tests.helpers.paths import REPO


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--aoi", "atlantis"], 2, "unknown AOI 'atlantis'"),
        (["--aoi", "../etc/passwd"], 2, "invalid AOI name"),
        (["--bbox", "10,50,5,55"], 2, "W < E"),
        (["--bbox", "-200,50,5,55"], 2, "[-180, 180]"),
        (["--start", "2018-05-01", "--end", "2017-01-01"], 2, "after --end"),
        (["--start", "yesterday"], 2, "ISO date"),
        (["--catalog", "nowhere"], 2, "unknown catalog 'nowhere'"),
        (["--start", "2030-01-01"], 3, "no usable Sentinel-2 L2A scenes"),
    ],
)
def test_user_errors(args: list[str], code: int, needle: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        rc = main([*args, "--output", str(out)])
    assert rc == code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and needle in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert not out.exists()


def test_unreachable_catalog(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    with caplog.at_level(logging.ERROR):
        assert main(["--catalog", url, "--output", str(tmp_path / "o")]) == 2
    assert "cannot open STAC API" in caplog.records[-1].getMessage()
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: the read-only mount below
            return _unwritable_output_as_root(ro)
        with caplog.at_level(logging.ERROR):
            assert main(["--output", str(ro / "ds")]) == 2
        assert "not writable" in caplog.records[-1].getMessage()
    finally:
        ro.chmod(0o700)


def _unwritable_output_as_root(ro: Path) -> None:
    """As root (CI): the folder is a read-only bind mount in a private mount namespace, which
    root cannot write either; the build is refused in one line before writing anything."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a folder root cannot write")
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"exec {sys.executable} -m pipeline.build_shards --output {ro / 'ds'}")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if "ERROR" in ln or ln.startswith("error")]
    assert len(lines) == 1 and "not writable" in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (ro / "ds").exists()


def test_output_is_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with caplog.at_level(logging.ERROR):
        assert main(["--output", str(f / "ds")]) == 2
    assert "is a file" in caplog.records[-1].getMessage()


def test_unknown_config_key_via_subprocess_has_no_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("aoi: ireland\nchip_sizes: [96]\n")
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.build_shards", "--config", str(cfg), "--output", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert len(lines) == 1 and "unknown config key(s) chip_sizes" in lines[0]
    assert not (tmp_path / "o").exists()


def test_dry_run_writes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "dry"
    with caplog.at_level(logging.INFO):
        assert main(["--aoi", "ireland", "--dry-run", "--output", str(out)]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("scene S2") == 4  # the four patches on tile 29UPU
    assert "dataset s96_g10m: would cut up to 4 chips" in text
    assert not out.exists()
