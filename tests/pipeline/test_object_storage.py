"""--output s3://... against an S3 API on 127.0.0.1: cubes, shards and manifests land there and
nothing is staged on the client's disk; a refresh from another machine continues the dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.build_shards import main
from pipeline.refresh import main as refresh_main
from tests.helpers.s3 import moto_s3
from tests.pipeline.test_refresh import LATER, _catalog


def test_build_and_refresh_on_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re

    import fsspec

    monkeypatch.setenv("SPECTRALGPT_STATE", str(tmp_path / "state"))
    caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server's request log
    with moto_s3() as endpoint:
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
        cat = _catalog(tmp_path, LATER)
        url = "s3://eo-datasets/s2/europe"
        assert main(["--catalog", str(cat), "--output", url]) == 0
        man = json.loads(fs.cat(f"{url}/manifest.json"))
        shards = [sh for d in man["datasets"].values() for sp in d["splits"].values() for sh in sp["shards"]]
        assert shards
        for sh in shards:
            assert fs.size(f"{url}/{sh['path']}") == sh["bytes"]
        assert fs.exists(f"{url}/cube/v0001")
        assert not fs.exists(f"{url}/_work")
        # the manifest is uploaded last: in the S3 server's own request log, the request that
        # completes it (a PUT, or the POST ending a multipart upload) comes after every other
        # object's of the dataset
        completed = [m.group(2) for m in (re.search(r'"(PUT|POST) /eo-datasets/s2/europe/(\S+?)(\?\S*)? HTTP', r.getMessage())
                                          for r in caplog.records if r.name == "werkzeug")
                     if m and "partNumber=" not in (m.group(3) or "") and not (m.group(1) == "POST" and m.group(3) == "?uploads")]
        assert len(set(completed)) > 10 and completed[-1] == "manifest.json", completed[-5:]
        assert completed.count("manifest.json") == 1
        # the client keeps only the dataset's lock file on this machine, no data
        kept = [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
        assert [p.name for p in kept] == [".lock"] and kept[0].stat().st_size < 32
        # a new machine: the refresh starts from the published version
        shutil.rmtree(tmp_path / "state")
        assert refresh_main(["--catalog", str(_catalog(tmp_path, ())), "--output", url]) == 0
        man2 = json.loads(fs.cat(f"{url}/manifest.json"))
        assert man2["latest_version"] == 2 and sorted(man2["versions"][1]["items"]) == sorted(LATER)
        for d in man2["datasets"].values():
            for sp in d["splits"].values():
                for sh in sp["shards"]:
                    assert fs.size(f"{url}/{sh['path']}") == sh["bytes"]


def test_missing_bucket_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with moto_s3():
        assert main(["--aoi", "ireland", "--output", "s3://no-such-bucket/x"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "no-such-bucket" in errors[0] and "Traceback" not in caplog.text
