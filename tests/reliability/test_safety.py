"""Hostile names, deletes, a full disk and listening sockets: the build never touches anything
outside `--output`, never loses the last good dataset, and never listens beyond loopback.

Each test plants the fault for real: catalog items written with hostile fields, a manifest
naming folders outside the dataset, a tmpfs that fills up (in a private mount namespace),
and the sockets of a running build read from the kernel (psutil).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pipeline.build_shards import main
from pipeline.names import is_safe_name, mgrs_tile
from tests.helpers.paths import REPO
from tests.pipeline.conftest import read_dataset

SAMPLE = REPO / "catalogs" / "sample"
ITEMS = sorted((SAMPLE / "sentinel-2-l2a").glob("*/*.json"))


def _catalog(tmp: Path, edit: dict[int, dict]) -> Path:  # type: ignore[type-arg]
    """A copy of the sample catalog with the properties/assets of items `i` changed by `edit[i]`."""
    cat = tmp / "catalog"
    shutil.copytree(SAMPLE, cat)
    for i, change in edit.items():
        p = cat / ITEMS[i].relative_to(SAMPLE)
        item = json.loads(p.read_text())
        for key, value in change.get("properties", {}).items():
            item["properties"][key] = value
        for band, fields in change.get("assets", {}).items():
            item["assets"][band].update(fields)
        p.write_text(json.dumps(item))
    return cat / "catalog.json"


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or '<dir>' / '<link>') of everything under `root`."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<link>" if p.is_symlink() else "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


HOSTILE_TILES = ["../../escape", "/tmp/abs-escape", "..\\\\win", "29UPU/../../x", "29UPU\n", "29UP\u0055\u200b",
                 "２９ＵＰＵ", "a" * 300, "29UPU\x00"]


def test_hostile_tile_names_never_become_paths(tmp_path: Path, report, caplog) -> None:  # type: ignore[no-untyped-def]
    """Items whose MGRS fields hold paths, separators, NUL, newlines, look-alikes or very long
    names are rejected with a counted reason; nothing outside --output changes."""
    edits = {i: {"properties": {"s2:mgrs_tile": t, "grid:code": f"MGRS-{t}"}} for i, t in enumerate(HOSTILE_TILES)}
    cat = _catalog(tmp_path, edits)
    outside = tmp_path / "around"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file.txt").write_text("mine")
    before = _tree(tmp_path)
    out = outside / "ds"
    rc = main(["--catalog", str(cat), "--output", str(out)])
    man = json.loads((out / "manifest.json").read_text())
    report("hostile MGRS tile names in items", f"{len(HOSTILE_TILES)} items: ../, /abs, \\\\, NUL, newline, look-alikes",
           f"exit {rc}, rejected {man['scenes']['rejected']}")
    assert rc == 0 and man["scenes"]["rejected"] == {"invalid MGRS tile name": len(HOSTILE_TILES)}
    after = _tree(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k) and not k.startswith("around/ds")}
    assert changed == set(), changed
    samples = read_dataset(out)
    assert samples
    for s in samples.values():
        assert mgrs_tile(s["json"]["tile"]) == s["json"]["tile"]
        assert "/" not in s["json"]["key"] and ".." not in s["json"]["key"]
    assert all(is_safe_name(p.name) for p in out.rglob("*") if p.name != ".lock")


def test_overwrite_never_deletes_what_an_old_manifest_names(tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    """A manifest with datasets named `../victim` or an absolute path: --overwrite leaves them alone."""
    out = tmp_path / "ds"
    assert main(["--aoi", "europe", "--output", str(out)]) == 0
    victims = [tmp_path / "victim", tmp_path / "abs-victim"]
    for v in victims:
        v.mkdir()
        (v / "train-v0001-0123abcd-29UPU_x-000000.tar").write_bytes(b"precious")  # even our own naming
    man = json.loads((out / "manifest.json").read_text())
    man["datasets"]["../victim"] = man["datasets"]["s96_g10m"]
    man["datasets"][str(victims[1])] = man["datasets"]["s96_g10m"]
    man["config_hash"] = "0" * 64  # "built with another config": --overwrite is what rebuilds it
    (out / "manifest.json").write_text(json.dumps(man))
    (tmp_path / "cfg.yaml").write_text("tiling: [96]\n")
    rc = main(["--aoi", "europe", "--config", str(tmp_path / "cfg.yaml"), "--output", str(out), "--overwrite"])
    kept = all((v / "train-v0001-0123abcd-29UPU_x-000000.tar").read_bytes() == b"precious" for v in victims)
    report("--overwrite over a manifest naming ../victim and /abs", "2 folders outside the dataset",
           f"exit {rc}, victims intact: {kept}")
    assert rc == 0 and kept
    assert set(json.loads((out / "manifest.json").read_text())["datasets"]) == {"s96_g10m"}


_FULL_DISK = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    from pipeline.build_shards import main
    root = Path(sys.argv[1])
    out = root / "ds"
    def tree():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}
    rc1 = main(["--aoi", "europe", "--output", str(out)])
    old = json.loads((out / "manifest.json").read_text())
    listed = {sh["path"] for d in old["datasets"].values() for sp in d["splits"].values() for sh in sp["shards"]}
    before = {k: v for k, v in tree().items() if k == "manifest.json" or k in listed}
    (root / "b.yaml").write_text("tiling: [96, 128, 64, 32, {size: 64, gsd: 20}]\\n")
    rc2 = main(["--aoi", "europe", "--config", str(root / "b.yaml"), "--output", str(out), "--overwrite"])
    after = tree()
    print(json.dumps({"rc1": rc1, "rc2": rc2, "intact": all(after.get(k) == v for k, v in before.items()),
                      "tmp": [k for k in after if ".tmp" in k],
                      "manifest_same": after.get("manifest.json") == before["manifest.json"]}))
""")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root (a private tmpfs)")
def test_disk_full_during_overwrite_keeps_the_old_dataset(tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    """A real full disk: a 14 MB tmpfs in a private mount namespace holds the sample dataset
    (11 MB with its cubes); an --overwrite with more datasets runs out of space. The exit is 6
    with one line, the old manifest and every shard it lists are unchanged byte for byte,
    and no temporary file is left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=14m tmpfs {mnt} && exec {sys.executable} {script} {mnt}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(p.stdout.strip().splitlines()[-1])
    errors = [ln for ln in p.stderr.splitlines() if " ERROR " in ln]
    report("disk full during --overwrite", "14 MB tmpfs: the new datasets do not fit",
           f"exit {result['rc2']}, old dataset intact: {result['intact']}, temporary files: {len(result['tmp'])}")
    assert result["rc1"] == 0 and result["rc2"] == 6, p.stderr[-2000:]
    assert result["intact"] and result["manifest_same"] and result["tmp"] == []
    assert len(errors) == 1 and "no space left on device" in errors[0] and "nothing was published" in errors[0]


def test_every_socket_of_a_build_listens_on_loopback(tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    """The build (its in-process Dask cluster) and its STAC server: every listening socket of the
    process tree, sampled while it runs, is bound to 127.0.0.1 (or ::1)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.build_shards", "--aoi", "europe", "--output",
                             str(tmp_path / "ds")], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[tuple[str, int]] = set()
    try:
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            with_children = [parent, *parent.children(recursive=True)]
            for p in with_children:
                try:
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            seen.add((c.laddr.ip, c.laddr.port))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.05)
    finally:
        proc.wait(timeout=120)
    report("listening sockets of a build", "sampled every 50 ms", f"{sorted(seen)}")
    assert proc.returncode == 0 and len(seen) >= 2  # at least the STAC server and the scheduler's HTTP routes
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in seen), seen


def test_items_outside_what_sentinel2_can_be_are_rejected(tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    """A consistent EPSG:3857 item, a 20 m grid labelled 10 m, dates before the mission and in
    the future, and a 10^6 px proj:shape: each rejected before any read, with its reason."""
    b02 = json.loads(ITEMS[4].read_text())["assets"]["B02"]
    t = b02["proj:transform"]
    edits = {
        0: {"properties": {"proj:epsg": 3857, "proj:code": "EPSG:3857"}},
        1: {"assets": {b: {"proj:transform": [20.0, 0.0, t[2], 0.0, -20.0, t[5]]} for b in ("B02", "B03", "B04", "B08")}},
        2: {"properties": {"datetime": "1800-01-01T00:00:00Z"}},
        3: {"properties": {"datetime": "3000-01-01T00:00:00Z"}},
        4: {"assets": {"B02": {"proj:shape": [1_000_000, 1_000_000]}}},
    }
    cat = _catalog(tmp_path, edits)
    t0 = time.monotonic()
    rc = main(["--catalog", str(cat), "--output", str(tmp_path / "ds")])
    seconds = time.monotonic() - t0
    rejected = json.loads((tmp_path / "ds" / "manifest.json").read_text())["scenes"]["rejected"]
    report("items no Sentinel-2 L2A can be", "EPSG:3857, 20 m as 10 m, 1800, 3000, 10^6 px shape",
           f"exit {rc} in {seconds:.1f} s, rejected {rejected}")
    assert rc == 0 and seconds < 60
    assert rejected == {
        "not a UTM CRS (EPSG:3857): Sentinel-2 L2A tiles are on UTM zones (EPSG:326xx/327xx)": 1,
        "10 m bands on a 20 x 20 m grid (not Sentinel-2's 10 m)": 1,
        f"datetime 1800-01-01 outside the mission's lifetime (2015-06-23 to {_tomorrow()})": 1,
        f"datetime 3000-01-01 outside the mission's lifetime (2015-06-23 to {_tomorrow()})": 1,
        "proj:shape of B02 1000000x1000000 out of bounds (1..30000 px per side)": 1,
    }


def _tomorrow() -> str:
    import datetime as dt

    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).strftime("%Y-%m-%d")


def test_when_every_scene_fails_nothing_is_left_and_permanent_errors_are_not_retried(
        tmp_path: Path, report, caplog) -> None:  # type: ignore[no-untyped-def]
    """COGs that do not exist and COGs that are not TIFFs: not retried (no backoff), reported as
    permanent; with every scene failing, exit 5 and the output folder this run made is gone."""
    cat = _catalog(tmp_path, {})
    for i, item in enumerate(ITEMS):
        folder = cat.parent / item.relative_to(SAMPLE).parent
        for tif in folder.glob("*_B05.tif"):
            tif.unlink() if i % 2 else tif.write_bytes(b"this is not a TIFF at all" * 100)
    out = tmp_path / "ds"
    (tmp_path / "cfg.yaml").write_text("retries: 3\nretry_backoff_s: 5\n")  # a retry would cost >= 5 s
    t0 = time.monotonic()
    rc = main(["--catalog", str(cat), "--config", str(tmp_path / "cfg.yaml"), "--output", str(out)])
    seconds = time.monotonic() - t0
    retried = [r for r in caplog.records if "retrying in" in r.getMessage()]
    report("every COG missing or not a TIFF", "11 scenes, retries: 3 from 5 s",
           f"exit {rc} in {seconds:.1f} s, retries {len(retried)}, output left: {out.exists()}")
    assert rc == 5 and not retried and seconds < 60
    assert not out.exists()
    reasons = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(reasons) == 11 and all("permanent, not retried" in m for m in reasons)


def test_output_checks_refuse_root_home_and_foreign_folders(tmp_path: Path, report, caplog) -> None:  # type: ignore[no-untyped-def]
    """`/`, the home folder, a link to `/`, and a non-empty folder that holds no dataset of ours
    are refused in one line before anything is written (a foreign `_work/` is never deleted);
    `force` writes into the foreign folder when the user means it."""
    (tmp_path / "to-root").symlink_to("/")
    foreign = tmp_path / "photos"
    (foreign / "_work").mkdir(parents=True)
    (foreign / "_work" / "mine.txt").write_text("not the pipeline's")
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    outcomes = {}
    for out in ("/", str(Path.home()), str(tmp_path / "to-root"), str(foreign)):
        caplog.clear()
        rc = main(["--aoi", "europe", "--output", out])
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        outcomes[out] = (rc, errors)
        assert rc == 2 and len(errors) == 1, (out, errors)
    assert "give a folder for the dataset, not / or the home folder" in outcomes["/"][1][0]
    assert "not / or the home folder" in outcomes[str(tmp_path / "to-root")][1][0]
    assert "holds no dataset of ours" in outcomes[str(foreign)][1][0] and "--force" in outcomes[str(foreign)][1][0]
    assert (foreign / "_work" / "mine.txt").read_text() == "not the pipeline's"
    (tmp_path / "force.yaml").write_text("force: true\n")
    caplog.clear()  # force or not, a `_work/` the pipeline did not make is never deleted
    assert main(["--aoi", "europe", "--config", str(tmp_path / "force.yaml"), "--output", str(foreign)]) == 2
    assert "was not made by a build" in caplog.records[-1].getMessage()
    assert (foreign / "_work" / "mine.txt").read_text() == "not the pipeline's"
    shutil.move(str(foreign / "_work"), str(tmp_path / "moved-away"))
    assert main(["--aoi", "europe", "--config", str(tmp_path / "force.yaml"), "--output", str(foreign)]) == 0
    assert (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8" and (foreign / "manifest.json").is_file()
    report("--output /, ~, a link to /, a foreign folder", "4 outputs", "exit 2 each, one line; force: writes, keeps the files")


def test_the_test_servers_listen_on_loopback_only(tmp_path: Path) -> None:
    """The S3 API (moto), the COG file server and the SAS token endpoint the tests start."""
    from tests.helpers.faulty_http import serve_files
    from tests.helpers.s3 import moto_s3
    from tests.helpers.tokens import token_endpoint

    me = psutil.Process()
    before = {(c.laddr.ip, c.laddr.port) for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    with moto_s3(), serve_files(tmp_path), token_endpoint() as _:
        now = {(c.laddr.ip, c.laddr.port) for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    started = now - before
    assert len(started) >= 3 and all(ip == "127.0.0.1" for ip, _ in started), started
