"""COGs read over real HTTP from a server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.build_shards import main
from tests.helpers.faulty_http import FaultPolicy, rewrite_hrefs_to_http, serve_files
from tests.helpers.paths import REPO
from tests.helpers.tokens import token_endpoint
from tests.pipeline.conftest import read_dataset, shard_files

IRELAND_PATCHES = 4  # the sample patches on tile 29UPU


def _config(tmp: Path, **extra: object) -> Path:
    cfg = {"aoi": "ireland", "tiling": [96], "retries": 4, "retry_backoff_s": 0.2, **extra}
    p = tmp / f"cfg-{len(list(tmp.glob('cfg-*')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def http_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FaultPolicy, Path]]:
    """The sample catalog with every COG served over HTTP; the policy is changed per test."""
    d = tmp_path_factory.mktemp("http")
    cat = d / "catalog"
    shutil.copytree(REPO / "catalogs" / "sample", cat)
    policy = FaultPolicy()
    with serve_files(cat, policy) as (url, _):
        rewrite_hrefs_to_http(cat, url)
        clean = d / "clean"
        assert main(["--catalog", str(cat / "catalog.json"), "--config", str(_config(d)), "--output", str(clean)]) == 0
        assert policy.requests > 0 and not policy.injected
        yield cat / "catalog.json", policy, clean


def _reset(policy: FaultPolicy, **kw: object) -> None:
    policy.rate, policy.injected, policy.requests, policy.always_fail, policy.token_check = 0.0, type(policy.injected)(), 0, set(), None
    for k, v in kw.items():
        setattr(policy, k, v)
    policy.__post_init__()


def test_twenty_percent_transient_faults_same_dataset(http_catalog, tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    cat, policy, clean = http_catalog
    _reset(policy, rate=0.2, seed=1)
    out = tmp_path / "faulty"
    rc = main(["--catalog", str(cat), "--config", str(_config(tmp_path)), "--output", str(out)])
    injected = sum(policy.injected.values())
    report("20% transient HTTP faults", f"{injected}/{policy.requests} requests ({dict(policy.injected)})",
           f"exit {rc}, identical dataset: {rc == 0 and shard_files(out) == shard_files(clean)}")
    assert injected >= 10 and set(policy.injected) >= {"http500", "http503", "reset", "truncated"}
    assert rc == 0
    a, b = read_dataset(clean), read_dataset(out)
    assert sorted(a) == sorted(b) and len(a) >= 3
    for k in a:
        np.testing.assert_array_equal(a[k]["npy"], b[k]["npy"])
        assert a[k]["json"] == b[k]["json"]
    assert shard_files(out) == shard_files(clean)


def test_scene_that_keeps_failing_is_skipped_and_recorded(http_catalog, tmp_path: Path, report, caplog) -> None:  # type: ignore[no-untyped-def]
    cat, policy, clean = http_catalog
    bad = "S2A_MSIL2A_20170617T113321_4_55"
    _reset(policy, always_fail={f"{bad}_B05.tif"})
    out = tmp_path / "skip"
    with caplog.at_level(logging.INFO):
        rc = main(["--catalog", str(cat), "--config", str(_config(tmp_path, retries=1)), "--output", str(out)])
    man = json.loads((out / "manifest.json").read_text())
    report("one scene's COG always HTTP 500", f"{policy.injected['always_fail']} requests",
           f"exit {rc}, manifest failed={[f['id'] for f in man['versions'][0]['failed']]}")
    assert rc == 5
    (failed,) = man["versions"][0]["failed"]
    assert failed["id"] == bad and "read failed after 2 attempts" in failed["reason"]
    assert man["scenes"]["failed"] == 1
    got = {s["json"]["scene_ids"][0] for s in read_dataset(out).values()}
    want = {s["json"]["scene_ids"][0] for s in read_dataset(clean).values()} - {bad}
    assert got == want
    assert "1 scene(s) could not be read" in caplog.text


def test_fail_fast_stops_at_first_failure(http_catalog, tmp_path: Path, report) -> None:  # type: ignore[no-untyped-def]
    cat, policy, _ = http_catalog
    _reset(policy, always_fail={"_B05.tif"})
    out = tmp_path / "ff"
    rc = main(["--catalog", str(cat), "--config", str(_config(tmp_path, retries=0)), "--output", str(out), "--fail-fast"])
    report("--fail-fast with a failing scene", "HTTP 500 on every B05", f"exit {rc}, manifest written: {(out / 'manifest.json').exists()}")
    assert rc == 5 and not (out / "manifest.json").exists()


@pytest.fixture
def token_server() -> Iterator[tuple[str, list[str]]]:
    with token_endpoint() as t:
        yield t


def test_expired_signature_is_renewed(http_catalog, token_server, tmp_path: Path, report, capfd, caplog) -> None:  # type: ignore[no-untyped-def]
    """The storage revokes a token after its 30th request (403) until one has been refused: the
    run re-signs and finishes. (Each process signing holds its own token: the client's
    pre-flight and the worker's reads do not share one.)"""
    cat, policy, clean = http_catalog
    token_url, issued = token_server
    seen: Counter[str] = Counter()

    def check(q: dict[str, list[str]]) -> bool:
        sig = (q.get("sig") or [""])[0]
        seen[sig] += 1
        if policy.forbidden == 0 and seen[sig] > 30:
            return False  # this token "expires" mid-run
        return sig.startswith("secret-")

    _reset(policy, token_check=check)
    caplog.set_level(logging.DEBUG)  # in-process, pytest's handler takes the records -v would print
    out = tmp_path / "signed"
    cfg = _config(tmp_path, sign="planetary_computer", token_url=token_url)
    rc = main(["-v", "--catalog", str(cat), "--config", str(cfg), "--output", str(out)])  # -v: every logger talks
    report("signature expires mid-run (HTTP 403)", f"{policy.forbidden} requests refused",
           f"exit {rc}, tokens issued {len(issued)}, identical dataset: {shard_files(out) == shard_files(clean)}")
    assert rc == 0 and policy.forbidden > 0 and len(issued) >= 2, (policy.requests, seen, issued)
    assert shard_files(out) == shard_files(clean)
    # tokens never reach logs (ours and third parties', at -v), the manifest, samples or the report
    from pipeline.inspect import main as inspect_main

    assert inspect_main([str(out)]) == 0
    logs = capfd.readouterr()
    text = logs.out + logs.err + caplog.text + (out / "manifest.json").read_text()
    third_party_debug = [r for r in caplog.records
                         if r.levelno == logging.DEBUG and not r.name.startswith(("pipeline", "tests"))]
    assert third_party_debug and "secret-" not in text
    for p in out.rglob("*.json"):
        assert "secret-" not in p.read_text()
    for p in (out / "report").rglob("*.html"):
        assert "secret-" not in p.read_text()
    assert all("secret-" not in json.dumps(s["json"]) for s in read_dataset(out).values())
