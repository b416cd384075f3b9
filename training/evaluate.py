"""Evaluate a SpectralGPT encoder on the four downstream tasks of the paper.

Usage::

    python -m training.evaluate --task eurosat --data EuroSAT_MS/ --checkpoint weights.safetensors
    python -m training.evaluate --task bigearthnet --data BigEarthNet-v1.0/ --checkpoint runs/x \\
        --protocol finetune --label-set 19 --split-file test.csv
    python -m training.evaluate --task eurosat --data EuroSAT_MS/ --checkpoint SpectralGPT+.pth \\
        --protocol finetune --image-size 128 --drop-path 0.1 --mixup 0.8 --cutmix 1.0 \\
        --smoothing 0.1 --rrc --select best-val
    python -m training.evaluate --task segmentation --data seg/ --checkpoint SpectralGPT+.pth
    python -m training.evaluate --task change --data OSCD/ --checkpoint SpectralGPT+.pth

Tasks and the data layouts they read are described in ``training/evaluation/readers.py``;
protocols in ``training/evaluation/tasks.py``; checkpoints and normalisation in
``training/evaluation/checkpoints.py``. Results go to ``<checkpoint dir>/eval/<task>-<protocol>
.json`` and ``.md`` (or ``--out DIR``). Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from spectralgpt.shipped import package_folder

from training.errors import TrainingError

logger = logging.getLogger("training.evaluate")

#: Shipped evaluation configs, one per row of the paper (``--config eurosat_finetune``).
EVAL_CONFIG_DIR = package_folder("training", "configs", "eval")


TASKS = ("eurosat", "bigearthnet", "segmentation", "segmunich", "change")
PROTOCOLS = ("linear", "finetune", "knn")
# Defaults per protocol: (epochs, lr, weight decay). Linear heads train on cached features,
# so many cheap epochs; fine-tuning follows the official recipe's AdamW + wd 0.05.
DEFAULTS = {"linear": (100, 1e-3, 0.0), "knn": (0, 0.0, 0.0), "finetune": (20, 1e-4, 0.05)}
DENSE_DEFAULTS = {"linear": (30, 1e-3, 1e-4), "finetune": (30, 1e-4, 0.05)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse's status)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "python -m training.evaluate") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML of these options (a file, or a shipped one: " +
                        ", ".join(sorted(q.stem for q in EVAL_CONFIG_DIR.glob("*.yaml"))) +
                        "); flags given here win")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="data set root directory")
    p.add_argument("--checkpoint", required=True,
                   help="exported .safetensors/.pt, DeepSpeed run dir, or official .pth")
    p.add_argument("--protocol", choices=PROTOCOLS, default="linear",
                   help="linear (frozen encoder), finetune (layer-wise LR decay), knn "
                        "(classification only)")
    p.add_argument("--epochs", type=int, default=None, help="default: per protocol (results)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak LR; default: per protocol")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--layer-decay", type=float, default=0.75,
                   help="layer-wise LR decay for finetune (official 0.75)")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    r = p.add_argument_group(
        "fine-tuning recipe (finetune; each off by default, --pos-lr as the official code; "
        "official values and source lines in training/evaluation/tasks.py)")
    r.add_argument("--drop-path", type=float, default=0.0,
                   help="stochastic depth of the last block, linspace(0, R, depth) over the "
                        "blocks (official README 0.2, paper 0.1)")
    r.add_argument("--mixup", type=float, default=0.0,
                   help="Mixup Beta alpha, single-label only (official 0.8)")
    r.add_argument("--cutmix", type=float, default=0.0,
                   help="CutMix Beta alpha, single-label only; with --mixup one of the two per "
                        "batch, 50/50 (official 1.0)")
    r.add_argument("--smoothing", type=float, default=0.0,
                   help="label smoothing of the soft targets, single-label only (official 0.1)")
    r.add_argument("--reprob", type=float, default=0.0,
                   help="random-erasing probability per sample, pixel mode (official README "
                        "passes 0.25, but its code never applies it)")
    r.add_argument("--rrc", action="store_true",
                   help="random-resized crops (scale 0.2-1, bicubic) to --image-size instead "
                        "of a resize (official for EuroSAT and BigEarthNet)")
    r.add_argument("--select", choices=("last", "best-val"), default="last",
                   help="score the test split with the last epoch, or with the epoch best on "
                        "a validation split held out of the training split")
    r.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training split held out for --select best-val")
    r.add_argument("--val-file", default=None,
                   help="names of the validation samples for --select best-val (instead of "
                        "--val-fraction)")
    r.add_argument("--pos-lr", choices=("official", "decayed"), default="official",
                   help="position tables under layer-wise decay: full LR (the official "
                        "lr_decay.py with separable tables) or layer 0")
    p.add_argument("--k", type=int, default=20, help="neighbours for knn")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input side (classification: images resized to it; dense tasks: "
                        "tile size); default: the checkpoint's")
    p.add_argument("--label-set", type=int, choices=(19, 43), default=19,
                   help="BigEarthNet nomenclature")
    p.add_argument("--missing-bands", choices=("official", "official_positional", "error"),
                   default="official",
                   help="SegMunich's 2 absent bands: the official per-pixel band mean in their "
                        "slots (by name), exactly the official tensor (by position), or refuse")
    p.add_argument("--split-file", default=None,
                   help="names of the evaluation samples (one per line / CSV first column); "
                        "the rest trains unless --train-file is given")
    p.add_argument("--train-file", default=None, help="names of the training samples")
    p.add_argument("--normalisation", choices=("auto", "dataset_stats", "per_image_minmax"),
                   default="auto", help="auto = as in pretraining (see checkpoints.py)")
    p.add_argument("--manifest", default=None,
                   help="pretraining manifest.json for dataset statistics")
    p.add_argument("--preset", default=None,
                   help="preset for head counts of an official checkpoint of unusual size")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader processes (default: 0 on CPU, 8 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results directory (default <checkpoint dir>/eval)")
    return p


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{100 * v:.2f}"
    return str(v)


HEADLINE = {
    "eurosat": [("overall_accuracy", "OA %"), ("f1_macro", "macro F1 %")],
    "bigearthnet": [("map_macro", "mAP macro %"), ("map_micro", "mAP micro %"),
                    ("f1_macro", "F1 macro %"), ("f1_micro", "F1 micro %")],
    "segmentation": [("overall_accuracy", "OA %"), ("miou", "mIoU %"),
                     ("miou_without_background", "mIoU w/o bg %")],
    "change": [("f1", "change F1 %"), ("precision", "precision %"), ("recall", "recall %"),
               ("overall_accuracy", "OA %")],
}
HEADLINE["segmunich"] = HEADLINE["segmentation"]  # the paper's SegMunich mIoU includes background


def markdown(result: dict[str, Any]) -> str:
    """A small Markdown table of the headline metrics of one result."""
    cols = HEADLINE[result["task"]]
    head = ["task", "protocol", *[c[1] for c in cols], "train / test", "normalisation"]
    m = result["metrics"]
    row = [result["task"], result["protocol"], *[_fmt(m.get(k)) for k, _ in cols],
           f"{result['split']['train']} / {result['split']['test']}",
           result["normalisation"]["mode"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join(row) + " |"]
    return (f"Checkpoint `{result['checkpoint']['path']}` ({result['checkpoint']['kind']}), "
            f"image size {result['image_size']}, seed {result['seed']}.\n\n" + "\n".join(lines)
            + "\n")


def _num(v: Any) -> Any:
    return float("nan") if v is None else v


def summary(out_dir: Path) -> str:
    """One Markdown table of every ``<task>-<protocol>.json`` result in ``out_dir``."""
    rows = ["| task | protocol | metrics (%) | train / test | normalisation | seconds |",
            "|---|---|---|---|---|---|"]
    order = {t: i for i, t in enumerate(TASKS)}
    results = [json.loads(f.read_text()) for f in sorted(out_dir.glob("*-*.json"))]
    results = [r for r in results if isinstance(r, dict) and r.get("task") in order]
    for r in sorted(results, key=lambda r: (order[r["task"]], PROTOCOLS.index(r["protocol"]))):
        m = r["metrics"]
        shown = ", ".join(f"{label.removesuffix(' %')} {_fmt(_num(m.get(k)))}"
                          for k, label in HEADLINE[r["task"]])
        rows.append(f"| {r['task']} | {r['protocol']} | {shown} | {r['split']['train']} / "
                    f"{r['split']['test']} | {r['normalisation']['mode']} | {r['seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN -> None."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _probe(data: Any) -> None:
    for name in ("load", "load_image", "load_pair"):
        if hasattr(data, name):
            getattr(data, name)(0)
            return


def _check_recipe(args: argparse.Namespace, dense: bool) -> None:
    """Refuse recipe options that would be silently ignored or are out of range."""
    from training.evaluation.errors import EvaluationError

    ranges = {"drop_path": (0.0, 1.0, False), "smoothing": (0.0, 1.0, False),
              "reprob": (0.0, 1.0, True)}
    for name, (lo, hi, closed) in ranges.items():
        v = getattr(args, name)
        if not (lo <= v <= hi if closed else lo <= v < hi):
            raise EvaluationError(f"--{name.replace('_', '-')} must be in [{lo:g}, {hi:g}"
                                  f"{']' if closed else ')'}, got {v}")
    for name in ("mixup", "cutmix"):
        if getattr(args, name) < 0:
            raise EvaluationError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.val_fraction < 1.0:
        raise EvaluationError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    given = [flag for flag, on in (("--drop-path", args.drop_path > 0), ("--mixup", args.mixup > 0),
                                   ("--cutmix", args.cutmix > 0),
                                   ("--smoothing", args.smoothing > 0),
                                   ("--reprob", args.reprob > 0), ("--rrc", args.rrc),
                                   ("--select best-val", args.select == "best-val"),
                                   ("--val-file", args.val_file is not None)) if on]
    if args.protocol != "finetune" and given:
        raise EvaluationError(f"{', '.join(given)}: fine-tuning options (--protocol finetune)")
    classification_only = [g for g in given if g != "--drop-path"]
    if dense and classification_only:
        raise EvaluationError(f"{', '.join(classification_only)}: classification fine-tuning "
                              f"options; {args.task} takes --drop-path and --pos-lr")
    if args.val_file is not None and args.select != "best-val":
        raise EvaluationError("--val-file is for --select best-val")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run one task/protocol; return the result record (also written to disk)."""
    from training.evaluation import checkpoints, readers, tasks
    from training.evaluation.errors import EvaluationError
    from training.evaluation.heads import Encoder

    dense = args.task in ("segmentation", "segmunich", "change")
    if dense and args.protocol == "knn":
        raise EvaluationError(f"--protocol knn is for classification; {args.task} takes "
                              f"linear or finetune")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda but no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("epochs", "batch_size", "image_size", "k"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "epochs" else 1):
            raise EvaluationError(f"--{name.replace('_', '-')} must be positive, got {v}")

    _check_recipe(args, dense)

    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise EvaluationError(f"--data '{data_dir}' is not a directory")
    ckpt = checkpoints.load_checkpoint(args.checkpoint, args.preset)
    size = args.image_size or ckpt.config.img_size
    if size % ckpt.config.patch_size:
        raise EvaluationError(f"--image-size {size} is not a multiple of the patch size "
                              f"{ckpt.config.patch_size}")
    norm = checkpoints.resolve_normalisation(ckpt, args.normalisation, args.manifest)

    if args.task == "eurosat":
        data: Any = readers.read_eurosat(data_dir)
    elif args.task == "bigearthnet":
        data = readers.read_bigearthnet(data_dir, args.label_set)
    elif args.task == "segmentation":
        data = readers.read_segmentation(data_dir)
    elif args.task == "segmunich":  # the official layout, label remap and band filler
        data = readers.read_segmunich(data_dir, missing_bands=args.missing_bands)
    else:
        data = readers.read_oscd(data_dir)
    _probe(data)  # read one sample now: a missing band fails before any training
    eval_list = readers.read_name_list(args.split_file) if args.split_file else None
    train_list = readers.read_name_list(args.train_file) if args.train_file else None
    train, test, split = tasks.make_split(data.ids, data.split_files, seed=args.seed,
                                         eval_list=eval_list, train_list=train_list)

    val: list[int] | None = None
    if args.select == "best-val":
        val_list = readers.read_name_list(args.val_file) if args.val_file else \
            data.split_files.get("val")
        train, val, val_record = tasks.split_validation(
            data.ids, train, test, seed=args.seed, val_list=val_list,
            fraction=args.val_fraction)
        if val_list is not None and not args.val_file:
            val_record["source"] = "data set split file"
        split = {**split, "train": len(train), "val": len(val), "val_source": val_record}

    epochs, lr, wd = (DENSE_DEFAULTS if dense else DEFAULTS)[args.protocol]
    settings = tasks.TrainSettings(
        epochs=args.epochs if args.epochs is not None else epochs,
        batch_size=args.batch_size, lr=args.lr if args.lr is not None else lr,
        weight_decay=args.weight_decay if args.weight_decay is not None else wd,
        layer_decay=args.layer_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
        device=device, k=args.k,
        workers=args.workers if args.workers is not None else (8 if device.type == "cuda" else 0),
        drop_path=args.drop_path, mixup=args.mixup, cutmix=args.cutmix,
        smoothing=args.smoothing, reprob=args.reprob, rrc=args.rrc, selection=args.select,
        pos_lr=args.pos_lr)
    torch.manual_seed(args.seed)
    encoder = Encoder(checkpoints.build_mae(ckpt, size)).to(device)
    logger.info("%s / %s: %d train, %d test samples (%s); image size %d; normalisation %s; "
                "%s", args.task, args.protocol, len(train), len(test), split["source"], size,
                norm.mode, device)
    t0 = time.perf_counter()
    run = {"eurosat": tasks.run_classification, "bigearthnet": tasks.run_classification,
           "segmentation": tasks.run_segmentation, "segmunich": tasks.run_segmentation,
           "change": tasks.run_change}[args.task]
    if dense:
        out = run(encoder, data, train, test, norm, size, args.protocol, settings)
    else:
        out = run(encoder, data, train, test, norm, size, args.protocol, settings, val=val)
    chosen = out["training"].get("selection", {"mode": "last", "epoch": settings.epochs or None})
    finetune = args.protocol == "finetune"

    result = {
        "task": args.task, "protocol": args.protocol, "metrics": out["metrics"],
        **({"paper": getattr(args, "paper", None), "config": Path(args.config).name}
           if getattr(args, "config", None) else {}),
        "checkpoint": ckpt.describe(), "data": {"root": data_dir.resolve().name, **data.info,
                                                "classes": data.class_names},
        "split": split, "normalisation": norm.describe(), "image_size": size,
        "bands": " ".join(readers.model_bands()),
        "settings": {"epochs": settings.epochs, "batch_size": settings.batch_size,
                     "lr": settings.lr, "weight_decay": settings.weight_decay,
                     "layer_decay": settings.layer_decay if finetune else None,
                     "warmup_epochs": settings.warmup_epochs,
                     "k": settings.k if args.protocol == "knn" else None,
                     **({"drop_path": settings.drop_path, "pos_lr": settings.pos_lr}
                        if finetune else {}),
                     **({"mixup": settings.mixup, "cutmix": settings.cutmix,
                         "mixup_switch_prob": settings.mixup_switch_prob,
                         "smoothing": settings.smoothing, "reprob": settings.reprob,
                         "rrc": settings.rrc} if finetune and not dense else {})},
        "selection": chosen["mode"], "selected_epoch": chosen["epoch"],
        "training": out["training"], "seed": args.seed, "device": str(device),
        "seconds": round(time.perf_counter() - t0, 2),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "notes": ("metrics over the whole test split "
                  + (f"with the weights of epoch {chosen['epoch']}, the best on the "
                     f"validation split held out of the training split"
                     if chosen["mode"] == "best-val" else
                     "after the last epoch (no best-epoch selection)")
                  + "; dense tasks scored on full images, each pixel once"),
    }
    given = Path(args.checkpoint)
    out_dir = Path(args.out) if args.out else (given if given.is_dir() else given.parent) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    # results are shared: the checkpoint is named relative to them, never by an absolute path
    result["checkpoint"]["path"] = Path(os.path.relpath(given.resolve(), out_dir.resolve())).as_posix()
    stem = out_dir / f"{args.task}-{args.protocol}"
    stem.with_suffix(".json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    (out_dir / "summary.md").write_text(summary(out_dir))
    result["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md")),
                       str(out_dir / "summary.md")]
    return result


def load_eval_config(name: str, parser: argparse.ArgumentParser) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(flag defaults, paper reference)`` from an evaluation config: a YAML mapping of the
    long option names (``batch_size`` or ``batch-size``) to values, plus an optional ``paper``
    block (the published figure, recorded beside the result). Flags on the command line win.

    Raises:
        ConfigError: missing file, bad YAML, an unknown key or a value of the wrong type.
    """
    from pipeline.config import parse_config_yaml
    from spectralgpt.shipped import find_config, shipped_names
    from training.errors import ConfigError

    path = find_config(name, EVAL_CONFIG_DIR)
    if not path.is_file():
        raise ConfigError(f"evaluation config '{name[:200]}' not found (shipped: "
                          f"{shipped_names(EVAL_CONFIG_DIR)})")
    try:
        raw = parse_config_yaml(path.read_text()[: 1 << 20]) or {}
    except ValueError as exc:
        raise ConfigError(f"evaluation config '{path.name}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"evaluation config '{path.name}': expected a mapping of option names to values")
    paper = raw.pop("paper", None)
    actions = {a.dest: a for a in parser._actions if a.option_strings}  # noqa: SLF001 (argparse has no public map)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise ConfigError(f"evaluation config '{path.name}': unknown option {str(key)[:60]!r}")
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if not isinstance(value, bool):
                raise ConfigError(f"evaluation config '{path.name}': {key} must be true or false")
        elif value is not None:
            try:
                value = action.type(value) if action.type is not None else str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"evaluation config '{path.name}': {key}={str(value)[:60]!r} is not "
                                  f"a valid value") from None
            if action.choices is not None and value not in action.choices:
                raise ConfigError(f"evaluation config '{path.name}': {key}={value!r}: use one of "
                                  f"{', '.join(map(str, action.choices))}")
        values[dest] = value
    return values, (paper if isinstance(paper, dict) else {})


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    """The flags, with an evaluation ``--config`` (if any) as their defaults."""
    from training.errors import ConfigError

    parser = build_parser(prog)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    paper: dict[str, Any] = {}
    if known.config:
        try:
            values, paper = load_eval_config(known.config, parser)
        except ConfigError as exc:
            parser.exit(2, f"error: {exc}\n")
        parser.set_defaults(**values)
        for action in parser._actions:  # noqa: SLF001
            if action.dest in values:
                action.required = False
    args = parser.parse_args(argv)
    args.paper = paper
    return args


def main(argv: list[str] | None = None, prog: str = "python -m training.evaluate") -> int:
    try:
        args = parse_args(argv, prog)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed run dirs on a CPU machine
    try:
        result = evaluate(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result), end="")
    print(f"written: {' '.join(result['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
