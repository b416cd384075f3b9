"""The installed product: the sdist and the wheel built, the wheel installed into fresh virtual
environments, and every tool run from an empty folder outside the checkout, offline.

Everything else in the suite runs from the editable install inside the checkout, where files
that the wheel lacks are still found; these tests are the ones that notice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.pipeline.test_resume import _assert_same_dataset

pytestmark = pytest.mark.slow

VERSION_FILE = REPO / "spectralgpt" / "__init__.py"


def _version() -> str:
    ns: dict[str, str] = {}
    exec(next(ln for ln in VERSION_FILE.read_text().splitlines() if ln.startswith("__version__")), ns)
    return ns["__version__"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _venv(path: Path, *install: str) -> dict[str, str]:
    """A fresh virtual environment with `install` (pip arguments); the env to run commands in."""
    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *install], cwd=path.parent, timeout=1200)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{path / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(path), PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from the sdist (so the sdist is complete)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample dataset as the checkout builds it (`make run`'s first half)."""
    out = tmp_path_factory.mktemp("checkout") / "europe"
    _run([sys.executable, "-m", "pipeline.build_shards", "--aoi", "europe", "--output", str(out)], cwd=REPO)
    return out


def _no_local_paths(root: Path, *forbidden: Path) -> None:
    """No text file (or safetensors header) under `root` names a folder of this machine."""
    needles = {str(p) for f in forbidden for p in (f, f.resolve())}
    for path in root.rglob("*"):
        if not path.is_file() or path.suffix not in (".json", ".jsonl", ".yaml", ".html", ".md", ".safetensors", ".csv"):
            continue
        text = path.read_bytes()[: 1 << 20].decode("utf-8", errors="replace")
        for needle in needles:
            assert needle not in text, f"{path.relative_to(root)} records the local path {needle}"


def test_wheel_and_sdist_carry_the_run_time_files(dist: dict[str, Path]) -> None:
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    for required in ("catalogs/sentinel2.yaml", "catalogs/sources.yaml", "catalogs/aois/europe.geojson",
                     "catalogs/sample/catalog.json", "training/configs/tiny_cpu.yaml",
                     "training/configs/ds_zero2.json", "training/evaluation/bigearthnet_labels.yaml",
                     "training/configs/eval/eurosat_finetune.yaml", "training/evaluation/segmunich_labels.yaml",
                     "pipeline/configs/europe_live.yaml", "spectralgpt/cli.py"):
        assert required in names, f"the wheel lacks {required}"
    sample_cogs = [n for n in names if n.startswith("catalogs/sample/") and n.endswith(".tif")]
    assert len(sample_cogs) == 11 * 12  # 11 patches x 12 bands
    assert not [n for n in names if n.split("/")[0] in ("tests", "tools", "benchmarks")], "dev-only code in the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "spectralgpt = spectralgpt.cli:main" in zipfile.ZipFile(dist["wheel"]).read(entry_points).decode()
    members = tarfile.open(dist["sdist"]).getnames()
    top = members[0].split("/")[0]
    for required in ("CHANGELOG.md", "requirements/dev.lock", "requirements/pipeline.lock", "pyproject.toml"):
        assert f"{top}/{required}" in members, f"the sdist lacks {required}"
    assert dist["wheel"].name.startswith(f"spectralgpt_pipeline-{_version()}-")


def test_installed_wheel_runs_every_tool_offline_from_an_empty_folder(
        dist: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    env = _venv(tmp_path / "venv", "-c", str(REPO / "requirements" / "dev.lock"), f"{dist['wheel']}[train]")
    work = tmp_path / "empty"
    work.mkdir()
    python = str(tmp_path / "venv" / "bin" / "python")

    # the code runs from site-packages, not from the checkout
    where = _run([python, "-c", "import catalogs, pipeline, training, spectralgpt; "
                  "print(pipeline.__file__, catalogs.root(), training.__file__)"], work, env).stdout
    assert str(REPO) not in where and str(tmp_path / "venv") in where
    assert _run(["spectralgpt", "--version"], work, env).stdout.strip() == f"spectralgpt {_version()}"

    # the main job, both ways; the same dataset as the checkout's make run
    build = _run(["spectralgpt", "build", "--aoi", "europe"], work, env)
    assert "embedded sample catalog" in build.stderr
    _run([python, "-m", "pipeline.build_shards", "--aoi", "europe", "--output", "module"], work, env)
    for built in (work / "datasets" / "europe", work / "module"):
        _assert_same_dataset(reference, built)
    assert _run(["spectralgpt", "build", "--aoi", "europe"], work, env).stderr.count("up to date") == 1

    # the dataset report, both ways
    _run(["spectralgpt", "inspect", "datasets/europe"], work, env)
    assert (work / "datasets" / "europe" / "report" / "index.html").is_file()
    _run([python, "-m", "pipeline.inspect", "module", "--png", "--out", "sheet.png"], work, env)
    assert (work / "sheet.png").stat().st_size > 10_000

    # a short tiny pretraining through both stages (the shipped default config, found in the package)
    short = ["--set", "stages.0.samples=16", "--set", "stages.1.samples=16",
             "--set", "stages.0.warmup_samples=8", "--set", "stages.1.warmup_samples=8"]
    _run(["spectralgpt", "pretrain", *short], work, env, timeout=900)
    state = json.loads((work / "runs" / "tiny_cpu" / "checkpoints" / "global_step4" / "trainer_state.json").read_text())
    assert state["stage_name"] == "stage2_128px" and state["global_step"] == 4
    assert "usage:" in _run([python, "-m", "training", "pretrain", "--help"], work, env).stdout

    # export, both ways; evaluation's help, both ways
    exported = Path(work / _run(["spectralgpt", "export", "runs/tiny_cpu"], work, env).stdout.strip().splitlines()[-1])
    assert exported.is_file() and exported.suffix == ".safetensors"
    _run([python, "-m", "training.export", "runs/tiny_cpu", "--out", "weights.pt", "--format", "pt"], work, env)
    assert (work / "weights.pt").is_file()
    info = json.loads(exported.with_suffix(".json").read_text())
    assert info["source"] == "../checkpoints/global_step4"  # relative to the exported file
    for cmd in (["spectralgpt", "evaluate", "--help"], [python, "-m", "training.evaluate", "--help"]):
        assert "--task" in _run(cmd, work, env).stdout

    # embeddings of the sample from the DeepSpeed run, both ways; search finds the key itself first
    _run(["spectralgpt", "embed", "--checkpoint", "runs/tiny_cpu", "--manifest", "datasets/europe/manifest.json",
          "--dataset", "s128_g10m", "--output", "emb"], work, env)
    done = json.loads((work / "emb" / "_embeddings.json").read_text())
    assert done["rows"] == {s: v["num_samples"] for s, v in json.loads(
        (work / "datasets" / "europe" / "manifest.json").read_text())["datasets"]["s128_g10m"]["splits"].items()}
    key = _run([python, "-c", "import pyarrow.dataset as d; print(d.dataset('emb').to_table(columns=['key'])"
                ".column('key')[0])"], work, env).stdout.strip()
    near = _run([python, "-m", "training.embed", "search", "emb", "--key", key, "-k", "3"], work, env).stdout
    assert near.splitlines()[0].split("\t")[0] == key and len(near.splitlines()) == 3
    meta = _run([python, "-c", "import pyarrow.parquet as pq, glob; print(pq.read_metadata(sorted(glob.glob("
                 "'emb/**/*.parquet', recursive=True))[0]).metadata[b'spectralgpt'].decode())"], work, env).stdout
    assert str(work) not in meta and str(tmp_path) not in meta
    # the encoder as ONNX, checked against eager PyTorch by the command itself
    _run(["spectralgpt", "export", "runs/tiny_cpu", "--format", "onnx", "--output", "encoder.onnx"], work, env)
    assert (work / "encoder.onnx").stat().st_size > 100_000 and (work / "encoder.item.json").is_file()

    # shareable outputs name no folder of this machine
    _no_local_paths(work, work, tmp_path, REPO)


def test_wheel_with_dependencies_at_their_lower_bounds_builds_the_same_dataset(
        dist: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    """The declared lower bounds are real: the core dependencies pinned at them (from PyPI)
    build the sample dataset byte for byte like the checkout's locked environment."""
    lowest = tmp_path / "lowest.txt"
    lowest.write_text(_run([sys.executable, str(REPO / "scripts" / "lock.py"), "--lowest"], REPO).stdout)
    env = _venv(tmp_path / "venv", "-c", str(lowest), str(dist["wheel"]))
    pins = dict(ln.split("==") for ln in lowest.read_text().splitlines() if "==" in ln)
    installed = json.loads(_run(["pip", "list", "--format", "json"], tmp_path, env).stdout)
    versions = {d["name"].lower(): d["version"] for d in installed}
    for name in ("numpy", "xarray", "dask", "zarr", "rasterio"):
        assert versions[name].split("+")[0] in (pins[name], f"{pins[name]}.0"), (name, versions[name], pins[name])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(r.startswith("numpy>=") for r in requires)
    work = tmp_path / "empty"
    work.mkdir()
    _run(["spectralgpt", "build", "--aoi", "europe"], work, env)
    _assert_same_dataset(reference, work / "datasets" / "europe")
