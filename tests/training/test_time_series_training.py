"""Time stacks and several resolutions through the trainer, on a dataset the pipeline built.

The dataset: 13 synthetic scenes (`tools.synth`, 768 px), of which tile 35MNM is seen on 3
dates (2024-06-12, -17, -22), tiled by `pipeline.build_shards` with the shipped
`timeseries` config into `s96_g10m`, `s96_g20m` and `s96_g10m_t3` (about 5 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import load_config
from training.data import (
    NODATA,
    DataPosition,
    ShardStream,
    iterate,
    make_loader,
    normalise,
    random_resized_crop,
    read_shard_set,
    tar_samples,
    track,
)
from training.errors import DataError

CONFIG = "tiny_timeseries_cpu"
TILE_BBOX = "--bbox=26.99,-7.31,27.07,-7.23"  # tile 35MNM, the one seen on 3 dates


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.build_shards import main as build
    from tools.synth import generate_scenes

    root = tmp_path_factory.mktemp("timeseries")
    catalog = generate_scenes(root / "scenes", 13, 768, 0)
    out = root / "ds"
    assert build(["--catalog", str(catalog), TILE_BBOX, "--max-cloud", "100", "--config", "timeseries",
                  "--output", str(out)]) == 0
    return out / "manifest.json"


def _run(manifest: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(CONFIG, [f"manifest={manifest}", *extra])


def test_the_pipeline_wrote_every_kind_the_config_trains_on(manifest: Path) -> None:
    m = json.loads(manifest.read_text())["datasets"]
    assert (m["s96_g10m_t3"]["layout"], m["s96_g10m_t3"]["shape"]) == ("TCHW", [3, 12, 96, 96])
    assert m["s96_g20m"]["shape"] == [12, 96, 96] and m["s96_g10m"]["layout"] == "CHW"


def test_a_stack_dataset_needs_a_stage_set_for_its_dates(manifest: Path) -> None:
    run = _run(manifest)
    stage = run.stages[2]
    ss = read_shard_set(manifest, stage.dataset, stage.split, run.model_for(stage))
    assert ss.dates == 3
    one_date = run.model_for(run.stages[0])
    with pytest.raises(DataError, match=r"time stacks of 3 dates .* set 'dates: 3'"):
        read_shard_set(manifest, "s96_g10m_t3", "train", one_date)
    with pytest.raises(DataError, match=r"single-date chips .* set 'dates: 1'"):
        read_shard_set(manifest, "s96_g10m", "train", run.model_for(stage))


def _raw_sample(manifest: Path) -> tuple[str, np.ndarray, dict]:
    shard = next((manifest.parent / "s96_g10m_t3").rglob("*.tar"))
    with shard.open("rb") as fh:
        key, members = next(iter(tar_samples(fh)))
    chip = np.load(__import__("io").BytesIO(members["npy"]))
    return key, chip, json.loads(members["json"])


def _stream(manifest: Path, run, index: int = 2) -> ShardStream:  # type: ignore[no-untyped-def]
    stage = run.stages[index]
    ss = read_shard_set(manifest, stage.dataset, stage.split, run.model_for(stage))
    return ShardStream(ss, run, stage, stage_index=index, rank=0, world_size=1,
                       position=DataPosition.start(1, 1))


@pytest.mark.parametrize("normalisation", ["dataset_stats", "per_image_minmax"])
def test_every_date_of_a_stack_gets_the_same_crop_and_flip(manifest: Path, normalisation: str) -> None:
    run = _run(manifest, f"normalisation={normalisation}", "crop_scale=[0.3,0.6]")
    stream = _stream(manifest, run)
    key, chip, meta = _raw_sample(manifest)
    dates = torch.tensor([[2024.0, 164.0], [2024.0, 169.0], [2024.0, 174.0]])  # 12, 17, 22 June 2024
    assert meta["datetimes"][0].startswith("2024-06-12")
    for index in range(4):  # several draws: some flipped, all cropped differently
        out = stream.transform({"__key__": key, "chip": chip, "dates": dates, "gsd": 10.0}, 0, index)
        assert out["image"].shape == (3, 12, 96, 96) and out["valid"].tolist() == [1.0, 1.0, 1.0]
        for t in range(3):  # by hand, date t alone, with the stream's own seed for this sample
            rng = np.random.default_rng([run.seed, 2, 0, 0, 0, index])
            x = torch.from_numpy(chip[t].astype(np.float32))
            x = normalise(x, x != NODATA, normalisation, stream.mean, stream.std)
            x = random_resized_crop(x, 96, run.crop_scale, run.crop_ratio, rng)
            if run.hflip and rng.random() < 0.5:
                x = x.flip(-1)
            assert torch.allclose(out["image"][t], x, atol=1e-5), (index, t)


def test_dates_come_from_the_samples_json_and_a_missing_date_is_flagged(manifest: Path) -> None:
    run = _run(manifest)
    batch = next(iter(iterate(make_loader(_stream(manifest, run), micro_batch=2, num_workers=0,
                                          num_batches=1))))
    assert batch["image"].shape == (2, 3, 12, 96, 96)
    assert batch["dates"].tolist() == [[[2024.0, 164.0], [2024.0, 169.0], [2024.0, 174.0]]] * 2
    assert batch["gsd"].tolist() == [10.0, 10.0]
    key, chip, _ = _raw_sample(manifest)
    chip = chip.copy()
    chip[1] = 0  # the second date all nodata
    out = _stream(manifest, run).transform({"__key__": key, "chip": chip, "dates": batch["dates"][0]}, 0, 0)
    assert out["valid"].tolist() == [1.0, 0.0, 1.0]


def test_stack_streams_resume_exactly(manifest: Path) -> None:
    run = _run(manifest, "shuffle_buffer=4", "shuffle_initial=2")

    def batches(position: DataPosition, n: int) -> list[dict]:
        stream = ShardStream(*_stream_args(manifest, run), stage_index=2, rank=0, world_size=1,
                             position=position)
        out = []
        for b in iterate(make_loader(stream, micro_batch=2, num_workers=0, num_batches=n)):
            track(position, 0, b)
            out.append(b)
        return out

    full = batches(DataPosition.start(1, 1), 6)
    first = DataPosition.start(1, 1)
    batches(first, 2)
    rest = batches(DataPosition.from_dict(json.loads(json.dumps(first.to_dict()))).resumed(1, 1), 4)
    for a, b in zip(full[2:], rest, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["dates"], b["dates"])


def _stream_args(manifest: Path, run):  # type: ignore[no-untyped-def]
    stage = run.stages[2]
    return (read_shard_set(manifest, stage.dataset, stage.split, run.model_for(stage)), run, stage)


def test_tiny_trains_through_10m_20m_and_3_date_stacks(manifest: Path, tmp_path: Path) -> None:
    """As the run book's example: one config, three stages, default model settings."""
    from training.pretrain import main

    out = tmp_path / "run"
    rc = main(["--config", CONFIG, "--set", f"manifest={manifest}", "--set", f"output_dir={out}",
               "--set", "num_workers=0", "--set", "stages.0.samples=160", "--set", "stages.1.samples=80",
               "--set", "stages.2.samples=80", "--set", "log_every=2"])
    assert rc == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "stage_start"]
    assert [(r["stage"], r["dates"], r["tokens_per_sample"], r["gsd"]) for r in starts] == [
        ("s1_10m", 1, 576, 10.0), ("s2_10m_20m", 1, 576, None), ("s3_10m_t3", 3, 3 * 576, 10.0)]
    assert starts[1]["dataset"] == "s96_g10m x1 + s96_g20m x2/train"
    losses = [r for r in records if "loss" in r]
    assert {r["stage"] for r in losses} == {"s1_10m", "s2_10m_20m", "s3_10m_t3"}
    assert all(np.isfinite(r["loss"]) for r in losses)
    assert np.mean([r["loss"] for r in losses[-3:]]) < np.mean([r["loss"] for r in losses[:3]])
    assert (out / "checkpoints" / "latest").is_file()
    state = json.loads((out / "checkpoints" / "global_step40" / "trainer_state.json").read_text())
    assert state["stage_name"] == "s3_10m_t3"
    page = (out / "report" / "index.html").read_text()
    assert "96 px \u00b7 10 m \u00b7 T 1" in page and "96 px \u00b7 T 1" in page
    assert "96 px \u00b7 10 m \u00b7 T 3" in page
    from PIL import Image

    with Image.open(out / "images" / "s3_10m_t3_step0000040.png") as stack, \
            Image.open(out / "images" / "s1_10m_step0000020.png") as single:
        # one row of panels per date: three rows against a single date's one
        assert stack.width == single.width and stack.height > 2.5 * single.height


def _keys(folder: Path) -> set[str]:
    out = set()
    for shard in folder.rglob("*.tar"):
        with shard.open("rb") as fh:
            out |= {key for key, _ in tar_samples(fh)}
    return out


def _mixed(manifest: Path, run, position: DataPosition):  # type: ignore[no-untyped-def]
    from training.data import MixedShardSet, MixedStream, read_stage_data

    stage = run.stages[1]
    mix = read_stage_data(manifest, [(d.name, d.weight) for d in run.stage_datasets(stage)], stage.split,
                          run.model_for(stage))
    assert isinstance(mix, MixedShardSet) and mix.num_samples == 98 + 20
    streams = [ShardStream(p, run, stage, stage_index=1, rank=0, world_size=1, position=position)
               for p in mix.parts]
    return MixedStream(streams, mix.weights, 2)


def _mixed_batches(manifest: Path, run, position: DataPosition, n: int) -> list[dict]:  # type: ignore[no-untyped-def]
    out = []
    for b in iterate(make_loader(_mixed(manifest, run, position), micro_batch=2, num_workers=0, num_batches=n)):
        track(position, 0, b)
        out.append(b)
    return out


def test_a_mixed_stage_draws_whole_batches_with_the_weights_asked_for(manifest: Path) -> None:
    run = _run(manifest, "shuffle_buffer=4", "shuffle_initial=2")
    batches = _mixed_batches(manifest, run, DataPosition.start(1, 1), 240)
    picks = [b["dataset"].tolist() for b in batches]
    assert all(len(set(p)) == 1 for p in picks)  # each batch from one data set
    share_20m = sum(p[0] == 1 for p in picks) / len(picks)
    # weights 1 : 2 -> 2/3 from s96_g20m; binomial sd over 240 draws is 0.030: 4 sd
    assert abs(share_20m - 2 / 3) < 0.12, share_20m
    keys = {name: _keys(manifest.parent / name) for name in ("s96_g10m", "s96_g20m")}
    for b in batches:  # every sample comes from the data set its batch says
        name = ("s96_g10m", "s96_g20m")[int(b["dataset"][0])]
        assert set(b["key"]) <= keys[name], (name, b["key"])
    again = _mixed_batches(manifest, run, DataPosition.start(1, 1), 240)
    assert [b["key"] for b in again] == [b["key"] for b in batches]  # deterministic under the seed


def test_a_mixed_stage_resumes_exactly(manifest: Path) -> None:
    run = _run(manifest, "shuffle_buffer=4", "shuffle_initial=2")
    full = _mixed_batches(manifest, run, DataPosition.start(1, 1), 9)
    first = DataPosition.start(1, 1)
    _mixed_batches(manifest, run, first, 4)
    saved = DataPosition.from_dict(json.loads(json.dumps(first.to_dict())))
    rest = _mixed_batches(manifest, run, saved.resumed(1, 1), 5)
    for a, b in zip(full[4:], rest, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["dataset"], b["dataset"])


@pytest.mark.parametrize(("stage", "needle"), [
    ("{name: x, img_size: 96, samples: 8}", "exactly one of 'dataset' or 'datasets'"),
    ("{name: x, dataset: a, datasets: [{name: b}], img_size: 96, samples: 8}", "exactly one of"),
    ("{name: x, datasets: [{name: a, weight: 0}], img_size: 96, samples: 8}", "positive"),
    ("{name: x, datasets: [{name: a}, {name: a}], img_size: 96, samples: 8}", "listed twice"),
])
def test_mixed_stage_config_errors(stage: str, needle: str) -> None:
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIG, [f"stages=[{stage}]"])


def test_a_run_stopped_inside_the_stack_stage_resumes_exactly(manifest: Path, tmp_path: Path) -> None:
    """Stopped at global step 14 (step 4 of the 3-date stage), resumed: the same losses
    afterwards as the run that never stopped."""
    from training.pretrain import main

    def run(out: Path, *extra: str) -> int:
        sets = [f"manifest={manifest}", f"output_dir={out}", "num_workers=0", "stages.0.samples=40",
                "stages.1.samples=40", "stages.2.samples=80", "log_every=1", "checkpoint_every=100",
                "image_every=100"]
        return main(["--config", CONFIG, *[a for s in sets for a in ("--set", s)], *extra])

    def losses(out: Path) -> dict[int, float]:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    assert run(tmp_path / "whole") == 0
    stopped = tmp_path / "stopped"
    assert run(stopped, "--set", "stop_at_step=14") == 0
    assert max(losses(stopped)) == 14
    assert run(stopped, "--resume") == 0
    whole, resumed = losses(tmp_path / "whole"), losses(stopped)
    assert sorted(resumed) == sorted(whole) == list(range(1, 21))
    assert [resumed[s] for s in range(15, 21)] == [whole[s] for s in range(15, 21)]


def test_metrics_also_go_to_tensorboard_when_asked(manifest: Path, tmp_path: Path) -> None:
    """`tracking: [tensorboard]`: every loss of metrics.jsonl, at its step, read back with
    TensorBoard's own event reader; the stage records as scalars too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.pretrain import main

    out = tmp_path / "run"
    sets = [f"manifest={manifest}", f"output_dir={out}", "num_workers=0", "stages.0.samples=24",
            "stages.1.samples=16", "stages.2.samples=16", "log_every=1", "tracking=[tensorboard]"]
    assert main(["--config", CONFIG, *[a for s in sets for a in ("--set", s)]]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r["loss"] for r in records if "loss" in r}
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = {e.step: e.value for e in events.Scalars("train/loss")}
    assert got.keys() == want.keys() == set(range(1, 8))
    assert all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)  # float32 in the file
    assert [e.value for e in events.Scalars("stage/dates")] == [1.0, 1.0, 3.0]
    assert "stage/s3_10m_t3" in events.Tags()["tensors"] or "stage/s3_10m_t3" in str(events.Tags())


def test_tracking_is_off_by_default_and_names_are_checked(manifest: Path) -> None:
    from training.errors import ConfigError

    assert _run(manifest).tracking == ()
    with pytest.raises(ConfigError, match="tracking"):
        _run(manifest, "tracking=[comet]")
