"""Deterministic, versioned training subsets: the BigEarthNet 10 % fine-tuning list.

The SpectralGPT paper fine-tunes on "10 % of the BigEarthNet training set" but the official
repository does not contain that subset (its ``txt_file/bigearthnet_train.txt`` is a full
list, and issue #30 asking how the 10 % were chosen is unanswered; research note section
5.1). We cannot ship a list of BigEarthNet patch names offline either, so **the published
artefact is this generator**: a fixed, versioned rule that anyone holding the BigEarthNet
training names (and labels) turns into the same list, byte for byte, on any machine, in any
input order::

    python -m training.evaluation.subsets bigearthnet --names train.csv --data BigEarthNet-v1.0 \\
        --out bigearthnet_train_10pct.txt

Rule ``ben10-v1`` (never changed once published; another rule gets another version):

1. Names are deduplicated. Each name ``n`` gets the key ``sha256("ben10-v1:" + n)`` (UTF-8,
   the digest compared as bytes, ties - practically impossible - broken by the name). Sorting
   by key is a pseudo-random order that does not depend on the input order or on a seed.
2. Without labels: the first ``round(f * N)`` names in key order (``f`` = fraction, 0.1;
   ``round`` is Python's, halves to even).
3. With labels: iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML-PKDD 2011)
   into two parts, "selected" and "rest", made deterministic. Each label ``l`` with ``n_l``
   patches wants ``s_l = max(1, round(f * n_l))`` selected and ``n_l - s_l`` in the rest; the
   selected part wants ``round(f * N)`` patches in all. Repeatedly take the label with the
   fewest unassigned patches (ties by label name) and assign each of its unassigned patches,
   in key order, to the part that still wants more of that label (tie: the part that wants
   more patches in all; tie: the rest), then lower the wants of that part for every label of
   the patch. Patches without labels go last, in key order, to the part that wants more
   patches in all (tie: the rest). Every label then ends within about one patch of its
   target, rare labels keep at least one patch, and the total is about ``f * N``.
4. The list is written sorted by name, after a ``#`` header naming the version, the rule, the
   fraction, the number of input names and the SHA-256 of the sorted, deduplicated input
   names (so a user can check they started from the same list).

``read_name_list`` skips ``#`` lines; the official SpectralGPT loader does not (it reads every
line as a patch id, ``util/datasets.py`` L546-547), so use ``--no-header`` for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pipeline.names import UnsafeName, confined, safe_name
from training.evaluation.errors import DatasetFormatError, EvaluationError

__all__ = ["BIGEARTHNET_VERSION", "RULES", "bigearthnet_subset", "format_subset",
           "input_digest", "main", "subset_key"]

BIGEARTHNET_VERSION = "ben10-v1"

#: One-line statements of each published rule (written into the list header).
RULES = {
    "ben10-v1": "key = sha256('ben10-v1:' + name); round half to even; no labels: the "
                "round(f*N) smallest keys; "
                "labels: iterative stratification into selected/rest, label with fewest "
                "unassigned patches first (ties by name), its patches in key order to the part "
                "wanting more of the label (then more in all, then rest); label wants "
                "max(1, round(f*n)) selected; unlabelled patches last; output sorted by name",
}


def subset_key(name: str, version: str = BIGEARTHNET_VERSION) -> bytes:
    """The 32-byte order key of ``name`` under rule ``version``: ``sha256(f"{version}:{name}")``."""
    return hashlib.sha256(f"{version}:{name}".encode()).digest()


def input_digest(names: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted, deduplicated names joined by newlines (with a final one)."""
    return hashlib.sha256("".join(f"{n}\n" for n in sorted(set(names))).encode()).hexdigest()


def bigearthnet_subset(names: Iterable[str], labels: Mapping[str, Iterable[str]] | None = None,
                       *, fraction: float = 0.1,
                       version: str = BIGEARTHNET_VERSION) -> list[str]:
    """The ``fraction`` subset of ``names`` under rule ``version`` (module doc), sorted by name.

    Args:
        names: patch names (any order, duplicates ignored).
        labels: optional ``name -> label names`` (e.g. the 19-class labels of each patch); a
            name missing from the mapping counts as having no label.
        fraction: share to keep, in ``(0, 1]``.
        version: the rule; only the versions in :data:`RULES` exist.

    Returns:
        The selected names, sorted; ``round(fraction * N)`` of them without labels, about
        that many with labels, each label keeping about ``max(1, round(fraction * n_label))``
        of its patches.
    """
    if version not in RULES:
        raise EvaluationError(f"unknown subset rule {version!r} (known: {', '.join(RULES)})")
    if not 0 < fraction <= 1:
        raise EvaluationError(f"fraction must be in (0, 1], got {fraction}")
    unique = set(names)
    ordered = sorted(unique, key=lambda n: (subset_key(n, version), n))
    total = round(fraction * len(ordered))
    if labels is None:
        return sorted(ordered[:total])
    sets = {n: sorted(set(labels.get(n, ()))) for n in ordered}
    by_label: dict[str, list[str]] = {}
    for n in ordered:  # key order within every label
        for label in sets[n]:
            by_label.setdefault(label, []).append(n)
    # Wants of the two parts, index 0 = selected, 1 = rest.
    want = {label: [max(1, round(fraction * len(m))), 0] for label, m in by_label.items()}
    for label, m in by_label.items():
        want[label][1] = len(m) - want[label][0]
    want_all = [total, len(ordered) - total]
    unassigned = {label: len(m) for label, m in by_label.items()}
    part: dict[str, int] = {}

    def assign(n: str, k: int) -> None:
        part[n] = k
        want_all[k] -= 1
        for label in sets[n]:
            want[label][k] -= 1
            unassigned[label] -= 1

    while True:
        open_labels = [label for label, left in unassigned.items() if left > 0]
        if not open_labels:
            break
        label = min(open_labels, key=lambda x: (unassigned[x], x))
        for n in by_label[label]:
            if n in part:
                continue
            w = want[label]
            if w[0] != w[1]:
                k = 0 if w[0] > w[1] else 1
            else:
                k = 0 if want_all[0] > want_all[1] else 1
            assign(n, k)
    for n in ordered:
        if n not in part:
            assign(n, 0 if want_all[0] > want_all[1] else 1)
    return sorted(n for n, k in part.items() if k == 0)


def format_subset(selected: Sequence[str], names: Iterable[str], *, fraction: float,
                  version: str = BIGEARTHNET_VERSION, labels_source: str | None = None,
                  header: bool = True) -> str:
    """The list file: a ``#`` header (version, rule, fraction, input size and digest, label
    source) unless ``header`` is False, then one name per line."""
    unique = set(names)
    lines = []
    if header:
        lines += [f"# BigEarthNet fine-tuning subset, rule {version} "
                  f"(training.evaluation.subsets)",
                  f"# rule: {RULES[version]}",
                  f"# fraction: {fraction}; selected {len(selected)} of {len(unique)} names",
                  f"# input: sha256 of the sorted input names = {input_digest(unique)}",
                  f"# labels: {labels_source or 'none (unstratified)'}"]
    return "\n".join([*lines, *selected]) + "\n"


def _labels_from_data(root: Path, names: Iterable[str], label_set: int) -> dict[str, list[str]]:
    """``name -> labels`` from ``<root>/<name>/<name>_labels_metadata.json`` (BigEarthNet-S2
    v1.0), in the 19- or 43-class nomenclature."""
    from training.evaluation.readers import bigearthnet_labels

    table = bigearthnet_labels()
    out: dict[str, list[str]] = {}
    for name in names:
        try:
            patch = safe_name(name, "patch name")
            meta_path = confined(root, f"{patch}/{patch}_labels_metadata.json", "patch metadata")
        except UnsafeName as exc:
            raise DatasetFormatError(str(exc)) from None
        if not meta_path.is_file():
            raise DatasetFormatError(f"'{meta_path}' not found (patch '{name}' of --names)")
        raw = json.loads(meta_path.read_text()).get("labels")
        if not isinstance(raw, list):
            raise DatasetFormatError(f"'{meta_path}' has no 'labels' list")
        if label_set == 43:
            out[name] = [str(x) for x in raw]
        else:
            unknown = [x for x in raw if x not in table["old2new"]]
            if unknown:
                raise DatasetFormatError(f"'{meta_path}': unknown label(s) {unknown}")
            out[name] = sorted({table["old2new"][x] for x in raw} - {None})
    return out


def _labels_from_json(path: Path) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"--labels '{path}': {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DatasetFormatError(f"--labels '{path}' must be a JSON object name -> [labels]")
    return {str(k): [str(x) for x in v] for k, v in raw.items()}


def build_parser(prog: str = "python -m training.evaluation.subsets") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Deterministic, versioned "
                                     "training subsets (module doc of training.evaluation."
                                     "subsets).")
    sub = parser.add_subparsers(dest="dataset", required=True)
    ben = sub.add_parser("bigearthnet", help="the 10 %% BigEarthNet fine-tuning list")
    ben.add_argument("--names", type=Path, required=True,
                     help="training patch names: one per line, or BigEarthNet's train.csv")
    src = ben.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="BigEarthNet-S2 v1.0 folder: stratify by the "
                     "labels in <patch>/<patch>_labels_metadata.json")
    src.add_argument("--labels", type=Path, help="JSON object patch name -> [label names]")
    ben.add_argument("--label-set", type=int, choices=(19, 43), default=19,
                     help="nomenclature of the --data labels (default 19)")
    ben.add_argument("--fraction", type=float, default=0.1)
    ben.add_argument("--version", default=BIGEARTHNET_VERSION, choices=sorted(RULES))
    ben.add_argument("--out", type=Path, required=True)
    ben.add_argument("--no-header", action="store_true",
                     help="names only (the official SpectralGPT loader reads every line)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the subset list; errors are one line on stderr and exit status 2."""
    from training.evaluation.readers import read_name_list

    args = build_parser().parse_args(argv)
    try:
        names = read_name_list(args.names)
        if args.data is not None:
            labels: dict[str, list[str]] | None = _labels_from_data(args.data, set(names),
                                                                    args.label_set)
            source = f"{args.label_set}-class labels from <patch>_labels_metadata.json"
        elif args.labels is not None:
            labels, source = _labels_from_json(args.labels), f"JSON file {args.labels.name}"
        else:
            labels, source = None, None
        selected = bigearthnet_subset(names, labels, fraction=args.fraction,
                                      version=args.version)
        args.out.write_text(format_subset(selected, names, fraction=args.fraction,
                                          version=args.version, labels_source=source,
                                          header=not args.no_header))
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(selected)} of {len(set(names))} names ({args.version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
