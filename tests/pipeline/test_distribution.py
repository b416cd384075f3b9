"""What an installed user meets first: the `spectralgpt` command, shipped configs found by name,
and datasets that record no folder of the machine that built them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.build_shards import main as build_main
from pipeline.catalogs import CATALOG_DIR
from pipeline.config import load_config
from pipeline.errors import ConfigError
from spectralgpt import __version__
from spectralgpt.cli import COMMANDS
from spectralgpt.cli import main as cli_main
from tests.pipeline.conftest import read_dataset


def test_catalog_data_comes_from_the_catalogs_package() -> None:
    import catalogs

    assert CATALOG_DIR == catalogs.root()
    assert (CATALOG_DIR / "sentinel2.yaml").is_file() and (CATALOG_DIR / "sample" / "catalog.json").is_file()


def test_every_command_has_a_main_that_takes_prog(capsys: pytest.CaptureFixture[str]) -> None:
    for name in COMMANDS:
        try:
            code = cli_main([name, "--help"])
        except SystemExit as exc:  # argparse's --help exits; some mains turn that into a return
            code = exc.code
        assert code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: spectralgpt {name}"), (name, out[:80])


def test_sizes_prints_the_preset_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["sizes"]) == 0
    out = capsys.readouterr().out
    # base at 128 px: 85.4 M encoder parameters (the official model's count, DESIGN.md)
    assert "base  128 px: encoder    85.4 M" in out


def test_unknown_command_and_version_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bulid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'bulid'" in err[0] and "build" in err[0]
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"spectralgpt {__version__}"
    assert cli_main([]) == 2 and "commands:" in capsys.readouterr().err


def test_console_script_is_installed_and_matches_python_m() -> None:
    exe = Path(sys.executable).with_name("spectralgpt")
    assert exe.is_file(), "pip install -e . installs the spectralgpt console script"
    a = subprocess.run([str(exe), "build", "--aoi", "no/such"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "pipeline.build_shards", "--aoi", "no/such"], capture_output=True, text=True)
    assert a.returncode == b.returncode == 2
    assert a.stderr.splitlines()[-1].split(": ", 1)[1] == b.stderr.splitlines()[-1].split(": ", 1)[1]


def test_shipped_configs_are_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.config import load_config as load_run_config

    monkeypatch.chdir(tmp_path)  # no source tree where the user stands
    assert load_config("europe_live").catalog == "earth-search"
    assert load_config("europe_live.yaml").catalog == "earth-search"
    run = load_run_config("base_gpu")
    assert run.name == "base_gpu" and run.deepspeed_config_path().is_file()
    with pytest.raises(ConfigError, match=r"'nope' not found \(shipped configs: europe, europe_live, timeseries\)"):
        load_config("nope")
    # a file where the user stands wins over a shipped config of the same name
    (tmp_path / "europe_live.yaml").write_text("catalog: cdse\n")
    assert load_config("europe_live.yaml").catalog == "cdse"


def test_manifest_and_samples_record_no_local_folders(tmp_path: Path) -> None:
    """A static catalog file is recorded relative to the dataset, the output not at all; a dataset
    moved together with its catalog still refreshes (nothing new, exit 0)."""
    here = tmp_path / "machine-a"
    shutil.copytree(CATALOG_DIR / "sample", here / "cat")
    out = here / "datasets" / "europe"
    assert build_main(["--catalog", str(here / "cat" / "catalog.json"), "--output", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert "output" not in man["config"]
    assert man["config"]["catalog"] == "../../cat/catalog.json"
    assert man["source"]["catalog"] == "static:spectralgpt-sample"  # its STAC id: the same from anywhere
    text = (out / "manifest.json").read_text()
    assert str(tmp_path) not in text
    samples = read_dataset(out)
    assert samples and all(s["json"]["source"]["catalog"] == "static:spectralgpt-sample" for s in samples.values())
    assert not any(str(tmp_path) in json.dumps(s["json"]) for s in samples.values())

    moved = tmp_path / "machine-b"
    shutil.move(str(here), str(moved))
    assert build_main(["--output", str(moved / "datasets" / "europe")], refresh=True) == 0
    again = json.loads((moved / "datasets" / "europe" / "manifest.json").read_text())
    assert again["latest_version"] == 1 and again["config_hash"] == man["config_hash"]
