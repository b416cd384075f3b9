"""Hostile or careless inputs: configs, secrets in logs, catalog paths and links, dataset files.

Each test drives a real part: the CLIs (`pipeline.build_shards`, `pipeline.inspect`, in this
process or as `python -m` subprocesses whose stderr is read), the STAC server on loopback
over real copies of the embedded sample catalog, and datasets built from it. Subprocesses
that could explode on the old code run under a memory limit (RLIMIT_AS) and a timeout, so a
regression fails the test instead of the machine.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import inspect as insp
from pipeline.build_shards import main as build_main
from pipeline.signing import TokenSigner, strip_query
from pipeline.stac_server import StacServerError
from tests.helpers.loopback import free_port
from tests.helpers.paths import REPO
from tests.pipeline.conftest import shard_files

SAMPLE = REPO / "catalogs" / "sample"
BUILD_STARTS_SERVER = "serving static STAC catalog"  # logged when the loopback STAC server is up


def _memory_limit(mib: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: a runaway allocation fails there, not here
        resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20))

    return apply


def _run(args: list[str], *, timeout: float = 120, mib: int = 3072) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from the repository root, stderr captured, under a memory limit."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_memory_limit(mib))


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if " ERROR " in ln]


# -- 1. YAML alias bombs and unbounded values in messages -----------------------------------------


def _alias_bomb(levels: int = 9) -> str:
    """Flow YAML of `levels` nested anchors, each listing the previous one 9 times ("billion
    laughs": 9**9 = 387 million strings once expanded; a few hundred bytes as text)."""
    parts = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


BOMBS = {
    # a value the old code quoted whole in its error message (`sign={v!r}`)
    "pipeline": ("pipeline.config", "aoi: europe\nsign: {bomb}\n"),
    # a model section the old code quoted whole (`must be a mapping, got {data!r}`)
    "training": ("training.config", "name: bomb\nmodel: {bomb}\n"),
}


@pytest.mark.parametrize("which", sorted(BOMBS))
def test_yaml_alias_bomb_is_refused_fast_in_one_line(which: str, tmp_path: Path) -> None:
    module, text = BOMBS[which]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text.format(bomb=_alias_bomb()))
    assert cfg.stat().st_size < 1000
    probe = textwrap.dedent(f"""
        import json, sys, time
        from {module} import load_config
        t = time.perf_counter()
        try:
            load_config(sys.argv[1])
            out = {{"error": None}}
        except Exception as e:
            out = {{"error": str(e), "type": type(e).__name__}}
        out["seconds"] = time.perf_counter() - t
        print(json.dumps(out))
    """)
    r = _run(["-c", probe, str(cfg)], timeout=60, mib=2048)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["type"] == "ConfigError"
    assert "YAML aliases (*name) are not allowed in a config file" in out["error"]
    assert "\n" not in out["error"] and len(out["error"]) < 400
    assert out["seconds"] < 0.5, out


def test_alias_bomb_through_the_build_cli_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(f"aoi: europe\nsign: {_alias_bomb()}\n")
    out = tmp_path / "out"
    t = time.monotonic()
    r = _run(["-m", "pipeline.build_shards", "--config", str(cfg), "--output", str(out)], timeout=60, mib=2048)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr)
    assert "is not valid YAML: YAML aliases (*name) are not allowed in a config file" in line
    assert "(line 2, column" in line
    assert "Traceback" not in r.stderr and not out.exists()
    assert time.monotonic() - t < 30


@pytest.mark.parametrize("name", ["europe", "europe_live"])
def test_shipped_pipeline_configs_still_load(name: str) -> None:
    from pipeline.config import load_config

    cfg = load_config(name)
    assert cfg.tiling and cfg.aoi


@pytest.mark.parametrize("name", ["tiny_cpu", "base_gpu"])
def test_shipped_training_configs_still_load(name: str) -> None:
    from training.config import load_config

    run = load_config(name)
    assert run.stages and run.name == name


@pytest.mark.parametrize(
    "text,needle",
    [
        (f"aoi: europe\nsign: {'x' * 200_000}\n", "sign='xxxx"),
        ("aoi: europe\nresampling: {20m: " + "y" * 200_000 + "}\n", "resampling.20m='yyyy"),
        ("aoi: europe\nbbox: [" + ",".join(["1"] * 100_000) + "]\n", "needs 4 numbers W,S,E,N"),
        ("aoi: europe\nmax_cloud: " + "z" * 200_000 + "\n", "invalid config: could not convert string to float"),
        ("aoi: europe\n" + "".join(f"key_{i}_{'k' * 100}: 1\n" for i in range(2000)), "(and 1990 more)"),
        ("aoi: " + "[" * 500 + "]" * 500 + "\n", "nested deeper than 32 levels"),
        ("aoi: europe\nmax_items: " + "9" * 5000 + "\n", "Exceeds the limit"),
        ("aoi: europe\nstart: 2018-13-45\n", "month must be in 1..12"),
        ("aoi: europe\ntiling: 96\n", "tiling: expected a list of sizes or mappings, got 96"),
    ],
    ids=["long-sign", "long-resampling", "long-bbox", "long-float", "many-keys", "deep", "huge-int", "bad-date",
         "tiling-scalar"],
)
def test_pipeline_config_errors_are_one_short_line(text: str, needle: str, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and len(msg) < 1000, msg[:2000]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("name=[" + ",".join(["1"] * 100_000) + "]", "config key 'name' must be str, got [1, 1, 1, 1, 1, 1, ...]"),
        ("stages.0.name=" + "s" * 200_000 + "x: [", "value is not valid YAML"),
        ("normalisation=" + "n" * 200_000, "must be one of ['dataset_stats', 'per_image_minmax'], got 'nnn"),
        ("model.preset=" + "p" * 200_000, "unknown model preset 'ppp"),
    ],
    ids=["long-list", "bad-yaml", "long-literal", "long-preset"],
)
def test_training_config_errors_are_one_short_line(override: str, needle: str) -> None:
    from training.config import load_config
    from training.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and len(msg) < 1000, msg[:2000]


def test_training_yaml_errors_are_one_line(tmp_path: Path) -> None:
    from training.config import load_config
    from training.errors import ConfigError

    cfg = tmp_path / "t.yaml"
    cfg.write_text("name: x\nstages: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "is not valid YAML" in str(e.value) and "(line 3, column 1)" in str(e.value) and "\n" not in str(e.value)


# -- 2. secrets never reach a log ---------------------------------------------------------------

SIGNED = ("https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/T29UPU/B04.tif"
          "?st=2024-04-19T10%3A00%3A00Z&se=2024-04-20T11%3A00%3A00Z&sp=rl&sv=2021-06-08&sr=c"
          "&skoid=c85c15d6&sktid=72f988bf&skt=2024-04-19&ske=2024-04-26&sks=b&skv=2021-06-08&sig=PCSASSIGNATURE%3D")
PRESIGNED = ("https://bob:hunter2@s3.example.com/bucket/k.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLEKEY%2F20240419%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=AMZSIGNATURE")
SECRETS = ("PCSASSIGNATURE", "hunter2", "AKIAEXAMPLEKEY", "AMZSIGNATURE", "BARETOKENSIG", "GDALSIG", "s3cret",
           "APITOKEN")

# Runs a real CLI `main` (`pipeline.build_shards` or `pipeline.inspect`, -v, an input error:
# it configures logging, installs the redaction and exits 2), then logs what third-party code
# logs in a real run:
# a Dask task error, a GDAL HTTP error, a urllib3 retry, a warning, a traceback quoting a
# signed /vsicurl/ path, a bare SAS token. `distributed` is imported before main (then it has
# its own stderr handler, which the root's filter would not see) or after it.
THIRD_PARTY = textwrap.dedent("""
    import logging, sys, warnings
    cli, order, out = sys.argv[1], sys.argv[2], sys.argv[3]
    SIGNED, PRESIGNED = sys.argv[4], sys.argv[5]
    if order == "before":
        import distributed
    if cli == "build":
        from pipeline.build_shards import main
        rc = main(["-v", "--bbox", "10,50,5,55", "--output", out])  # W > E: refused with the config
    else:
        from pipeline.inspect import main
        rc = main(["-v", out])
    if order == "after":
        import distributed  # finds the root handler configured: logs through it
    else:  # distributed's own stderr handler, on a logger that does not propagate to the root
        assert logging.getLogger("distributed").handlers and not logging.getLogger("distributed").propagate
    logging.getLogger("distributed.worker").error("Compute Failed: RasterioIOError(%r)", SIGNED)
    logging.getLogger("rasterio._env").warning("CPLE_HttpResponse in %s: HTTP response code: 403", SIGNED)
    logging.getLogger("urllib3.connectionpool").warning("Retrying (total=2) after broken connection: %s", PRESIGNED)
    warnings.warn("cannot open " + SIGNED)
    try:
        raise OSError("'/vsicurl/https://h.example/x.tif?se=2024&sig=GDALSIG' not recognized as a supported file format")
    except OSError:
        logging.getLogger("pipeline.units").exception("unit 29UPU failed")
    logging.getLogger("pipeline.signing").debug("token st=2024-04-19&se=2024-04-20&sig=BARETOKENSIG")
    print("rc", rc)
""")


@pytest.mark.parametrize("cli,order", [("build", "before"), ("build", "after"), ("inspect", "after")])
def test_signed_urls_and_tokens_are_masked_in_third_party_logs_at_verbose(cli: str, order: str, tmp_path: Path) -> None:
    r = _run(["-c", THIRD_PARTY, cli, order, str(tmp_path / "o"), SIGNED, PRESIGNED], timeout=120)
    assert r.returncode == 0 and "rc 2" in r.stdout, r.stderr[-3000:]
    err = r.stderr
    for marker in ("Compute Failed", "CPLE_HttpResponse", "Retrying (total=2)", "cannot open", "unit 29UPU failed",
                   "not recognized as a supported file format", "token "):
        assert marker in err, (marker, err[-3000:])
    for secret in SECRETS:
        assert secret not in err, (secret, err[-3000:])
    # what stays says which file: the path, the host, not the signature
    assert "sentinel2-l2/T29UPU/B04.tif?<redacted>" in err
    assert "https://***@s3.example.com/bucket/k.tif?<redacted>" in err
    assert "py.warnings" in err  # warnings are shown through logging, hence redacted


def test_catalog_url_credentials_and_token_are_masked_in_the_error_line(tmp_path: Path) -> None:
    url = f"http://alice:s3cret@127.0.0.1:{free_port()}/stac/v1?token=APITOKEN&sig=GDALSIG"
    out = tmp_path / "o"
    r = _run(["-m", "pipeline.build_shards", "-v", "--catalog", url, "--output", str(out)], timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = _error_lines(r.stderr)
    assert "cannot open STAC API" in line and "http://***@127.0.0.1:" in line and "/stac/v1?<redacted>" in line
    for secret in SECRETS:
        assert secret not in r.stderr, (secret, r.stderr[-3000:])
    assert not out.exists()


def test_token_endpoint_error_names_the_host_only() -> None:
    signer = TokenSigner(f"http://alice:s3cret@127.0.0.1:{free_port()}/api/sas/v1/token/c?subscription-key=APITOKEN",
                         timeout=5)
    with pytest.raises(Exception) as e:
        signer.sign("https://example.blob.core.windows.net/c/B04.tif")
    text = str(e.value)
    assert text.startswith("token request to 127.0.0.1:") and "s3cret" not in text and "APITOKEN" not in text
    assert strip_query("https://u:p@h.example:8443/a.tif?sig=x") == "https://h.example:8443/a.tif"


# -- 3. static catalog paths with spaces and non-ASCII characters ---------------------------------


def test_static_catalog_in_a_folder_with_a_space_and_accent_builds(tmp_path: Path) -> None:
    plain, odd = tmp_path / "plain" / "catalog", tmp_path / "my catalog é"
    shutil.copytree(SAMPLE, plain)
    shutil.copytree(SAMPLE, odd)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"aoi": "ireland", "tiling": [96]}))
    a, b = tmp_path / "a", tmp_path / "b"
    assert build_main(["--catalog", str(plain / "catalog.json"), "--config", str(cfg), "--output", str(a)]) == 0
    assert build_main(["--catalog", str(odd / "catalog.json"), "--config", str(cfg), "--output", str(b)]) == 0
    assert shard_files(b) == shard_files(a) and len(shard_files(a)) >= 2
    man = json.loads((b / "manifest.json").read_text())
    assert man["scenes"]["used"] == 4 and man["config"]["catalog"].endswith("my catalog é/catalog.json")


# -- 4. link loops in static catalogs -------------------------------------------------------------


def _loop_catalog(tmp_path: Path, kind: str) -> Path:
    cat = tmp_path / f"loop-{kind}"
    shutil.copytree(SAMPLE, cat)
    if kind == "self-child":  # the root lists itself as a child
        doc = json.loads((cat / "catalog.json").read_text())
        doc["links"].append({"rel": "child", "href": "./catalog.json", "type": "application/json"})
        (cat / "catalog.json").write_text(json.dumps(doc))
    else:  # the collection links back to the root: as a child, or as an item
        p = cat / "sentinel-2-l2a" / "collection.json"
        doc = json.loads(p.read_text())
        rel = "child" if kind == "child" else "item"
        doc["links"].append({"rel": rel, "href": "../catalog.json", "type": "application/json"})
        p.write_text(json.dumps(doc))
    return cat / "catalog.json"


@pytest.mark.parametrize("kind", ["self-child", "child", "item"])
def test_link_loop_is_refused_before_serving(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cat = _loop_catalog(tmp_path, kind)
    out = tmp_path / "out"
    t = time.monotonic()
    with caplog.at_level(logging.INFO):
        rc = build_main(["--catalog", str(cat), "--aoi", "ireland", "--output", str(out)])
    assert rc == 2 and time.monotonic() - t < 30
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    rel = "item" if kind == "item" else "child"
    where = "catalog.json" if kind == "self-child" else "sentinel-2-l2a/collection.json"
    assert f"has a link loop: the '{rel}' link of {where} points back to catalog.json" in errors[0]
    assert "RecursionError" not in caplog.text and BUILD_STARTS_SERVER not in caplog.text
    assert not out.exists()


def test_link_loop_through_the_server_cli_is_one_line(tmp_path: Path) -> None:
    cat = _loop_catalog(tmp_path, "child")
    # a subprocess: a server that does not refuse the catalog serves until the timeout
    r = _run(["-m", "pipeline.stac_server", str(cat), "--port", "0"], timeout=60)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: static STAC catalog ") and "has a link loop: the 'child' link of" in line


def test_a_collection_reached_twice_is_not_a_loop(tmp_path: Path) -> None:
    cat = tmp_path / "diamond"
    shutil.copytree(SAMPLE, cat)
    (cat / "again").mkdir()
    (cat / "again" / "catalog.json").write_text(json.dumps({
        "type": "Catalog", "stac_version": "1.1.0", "id": "again", "description": "a second parent",
        "links": [{"rel": "child", "href": "../sentinel-2-l2a/collection.json"}]}))
    doc = json.loads((cat / "catalog.json").read_text())
    doc["links"].append({"rel": "child", "href": "./again/catalog.json"})
    (cat / "catalog.json").write_text(json.dumps(doc))
    from pipeline.stac_server import _check_links  # the walk itself, without starting a server

    _check_links(cat / "catalog.json")  # no error
    with pytest.raises(StacServerError, match="has a link loop"):
        _check_links(_loop_catalog(tmp_path, "child"))


# -- 5. one line instead of a traceback -----------------------------------------------------------


def _rewrite_first_sample(dataset: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Apply `edit` to the JSON of the first sample of the first train shard (rewritten in place)."""
    man = json.loads((dataset / "manifest.json").read_text())
    first = next(iter(man["datasets"].values()))["splits"]["train"]["shards"][0]["path"]
    shard = dataset / first
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]
    done = False
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            if name.endswith(".json") and not done:
                meta = json.loads(data)
                edit(meta)
                data, done = json.dumps(meta).encode(), True
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return shard


def _copy(sample_dataset: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(sample_dataset, d, ignore=shutil.ignore_patterns("report"))
    return d


def test_inspect_sample_with_a_string_cloud_fraction_is_one_line(sample_dataset: Path, tmp_path: Path) -> None:
    d = _copy(sample_dataset, tmp_path)
    _rewrite_first_sample(d, lambda m: m["quality"].__setitem__("cloud", "abc"))
    r = _run(["-m", "pipeline.inspect", str(d)], timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "quality.cloud is 'abc' (str), expected a number in [0, 1] or null" in lines[0]
    assert not (d / "report").exists()


SAMPLE_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "bbox-strings": (lambda m: m.__setitem__("bbox_lonlat", ["w", "s", "e", "n"]), "bbox_lonlat is ['w', 's', 'e', 'n']"),
    "datetimes-int": (lambda m: m.__setitem__("datetimes", 5), "datetimes is 5 (int), expected a list of ISO dates"),
    "quality-list": (lambda m: m.__setitem__("quality", [1, 2]), "quality is [1, 2] (list), expected an object"),
    "nodata-bool": (lambda m: m["quality"].__setitem__("nodata", True), "quality.nodata is True (bool)"),
}
MANIFEST_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "value-scale": (lambda m: m.__setitem__("value_scale", "1e-4"), "value_scale is '1e-4' (str), expected a number in (0, 1]"),
    "num-samples": (lambda m: m["datasets"]["s96_g10m"]["splits"]["train"].__setitem__("num_samples", "7"),
                    "datasets.s96_g10m.splits.train.num_samples is '7' (str)"),
    "shards-int": (lambda m: m["datasets"]["s96_g10m"]["splits"]["val"].__setitem__("shards", 5),
                   "datasets.s96_g10m.splits.val.shards is 5 (int), expected a list"),
    "stats-short": (lambda m: m["datasets"]["s128_g10m"]["stats"].__setitem__("mean", [1.0, 2.0]),
                    "datasets.s128_g10m.stats.mean is [1.0, 2.0] (list), expected a list of 12 numbers in [0, 65535]"),
    "time-steps": (lambda m: m["datasets"]["s96_g10m"].__setitem__("time_steps", "one"), "time_steps is 'one' (str)"),
    "rejected": (lambda m: m["scenes"].__setitem__("rejected", {"too cloudy": "3"}), "scenes.rejected is"),
    "bands": (lambda m: m.__setitem__("bands", ["B01"]), "bands lack B02, B03, B04, B08"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_EDITS) + sorted(MANIFEST_EDITS))
def test_inspect_wrong_types_are_one_line(case: str, sample_dataset: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    d = _copy(sample_dataset, tmp_path)
    if case in SAMPLE_EDITS:
        edit, needle = SAMPLE_EDITS[case]
        _rewrite_first_sample(d, edit)
    else:
        edit, needle = MANIFEST_EDITS[case]
        man = json.loads((d / "manifest.json").read_text())
        edit(man)
        (d / "manifest.json").write_text(json.dumps(man))
    with caplog.at_level(logging.ERROR):
        assert insp.main([str(d)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and needle in errors[0] and "\n" not in errors[0], errors
    assert not (d / "report").exists()


@pytest.mark.parametrize("value", ["-3", "0"])
def test_build_negative_or_zero_workers_is_one_line(value: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO):
        assert build_main(["--aoi", "ireland", "--workers", value, "--output", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"--workers {value}: must be a whole number >= 1 (or absent: all cores)"]
    assert BUILD_STARTS_SERVER not in caplog.text and not out.exists()


def test_workers_from_a_config_file_are_checked_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("aoi: ireland\nworkers: -3\n")
    with caplog.at_level(logging.ERROR):
        assert build_main(["--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    assert "--workers -3: must be a whole number >= 1" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("address", ["foo://bar", "tcp://", "tcp://host:99999", "localhost", "tcp://a b:8786"])
def test_bad_scheduler_address_is_refused_before_anything(address: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO):
        assert build_main(["--aoi", "ireland", "--scheduler", address, "--output", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"--scheduler {address!r}: "), errors
    assert "not a Dask scheduler address" in errors[0] or "is not in 1-65535" in errors[0]
    # refused with the config: before the catalog is served, before any lock or _work/
    assert BUILD_STARTS_SERVER not in caplog.text
    assert not out.exists() and not list(tmp_path.rglob(".lock")) and not list(tmp_path.rglob("_work"))


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "tls://sched.example.com:8786", "127.0.0.1:8786",
                                     "tcp://[::1]:8786", "inproc://10.0.0.5/1234/1", "ucx://10.0.0.5:13337"])
def test_good_scheduler_addresses_pass_the_config(address: str) -> None:
    from pipeline.config import load_config

    assert load_config(None, {"scheduler": address}).scheduler == address


# -- 6. every value on the report page is escaped ---------------------------------------------------

XSS = "<script>alert(1)</script>"


def test_report_escapes_tampered_manifest_and_sample_values(sample_dataset: Path, tmp_path: Path) -> None:
    d = _copy(sample_dataset, tmp_path)

    def sample(meta: dict[str, Any]) -> None:
        meta["tile"] = XSS
        meta["datetimes"] = [XSS]

    _rewrite_first_sample(d, sample)
    man = json.loads((d / "manifest.json").read_text())
    man["created"] = man["config_hash"] = man["software_version"] = XSS
    man["source"] = {"catalog": XSS, "collection": XSS}
    man["config"]["start"] = XSS
    man["summary"]["seconds"] = XSS
    man["scenes"]["found"] = man["scenes"]["used"] = XSS
    man["scenes"]["rejected"] = {XSS: 2}
    for item in man["items"]:
        item.update({"id": XSS, "datetime": XSS, "tile": XSS, "processing_baseline": XSS, "rule": XSS, "used": XSS})
    ds = man["datasets"]["s96_g10m"]
    ds["layout"] = XSS
    ds["dropped"] = {XSS: 1}
    ds["stats"]["units"] = XSS
    ds["stats"]["percentiles"][f"p{XSS}"] = ds["stats"]["percentiles"]["p50"]
    man["datasets"] = {XSS: ds, **{k: v for k, v in man["datasets"].items() if k != "s96_g10m"}}
    (d / "manifest.json").write_text(json.dumps(man))
    assert insp.main([str(d), "--per-split", "2"]) == 0
    page = (d / "report" / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 10
    assert '<span id="chip-count">' in page


@pytest.mark.parametrize("key", ["num_samples", "bytes"])
def test_report_refuses_markup_where_a_number_is_computed(key: str, sample_dataset: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    d = _copy(sample_dataset, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    split = man["datasets"]["s96_g10m"]["splits"]["train"]
    (split if key == "num_samples" else split["shards"][0])[key] = XSS
    (d / "manifest.json").write_text(json.dumps(man))
    with caplog.at_level(logging.ERROR):
        assert insp.main([str(d)]) == 2
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"{key} is '<script>alert(1)</script>' (str), expected a whole number >= 0" in msg
    assert not (d / "report").exists()
