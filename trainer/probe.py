"""Frozen-encoder evaluation: probes with known answers, repeated grouped cross-validation, pretrained vs baselines.

    octjepa probe --checkpoint runs/smoke/encoder.pt --shards data/shards --labels data/participants.tsv \\
        [--targets study_group,age] [--folds 5] [--repeats 10] [--out probe_report] [--pooling attentive]
    octjepa probe --checkpoint W/run/checkpoints --encoders target,online --shards W/shards \\
        --labels W/data/synth_anatomy.tsv --targets study_group,inner_thinning,retina_thickness_mm   # the demo's

Every volume of the shard set is embedded once per encoder (``trainer.embed``): the checkpoint's encoder (or, from
a checkpoint, each of ``--encoders``), a randomly initialised encoder of the same architecture, and a raw-voxel
baseline (the mean depth profile and a 4 x 8 x 8 average of the volume: what a probe finds without any encoder).
Labels join per volume on ``sop_instance_uid`` when the table has that column (``synth``'s anatomy table), else
per participant on ``--id-column``; a volume without a value is counted and left out of that target.

Each target is a class target (logistic regression; balanced accuracy and macro AUROC) unless its values are all
numbers with more than two distinct values (ridge regression; R^2). Scores come from repeated grouped k-fold CV
by participant with the regularisation chosen by an inner grouped CV (``trainer.probe_stats``); every encoder
is scored on the same folds, so ``probes.<target>.paired_difference`` (the first encoder minus random init, fold
by fold) has an honest 95% interval. ``report.json`` holds it all, ``probe.png`` draws it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.embed import common_args, embed_many, pick_device, random_init_encoder
from trainer.probe_stats import (
    METRICS,
    CVPlan,
    cross_validate,
    interval_above_zero,
    outer_splits,
    paired,
    summary,
)

VOLUME_ID = "sop_instance_uid"  # a labels table with this column labels volumes, not participants
RANDOM, RAW = "random_init", "raw_voxels"


# ---------------------------------------------------------------------------------------------------------------
# Labels and the join
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LabelTable:
    """A labels table keyed by volume (``sop_instance_uid``) or participant: {key: {column: value}}."""

    path: str
    key_column: str
    columns: list[str]
    rows: dict[str, dict[str, str]]


def read_labels(path: str, *, id_column: str = "participant_id", targets: Sequence[str] = ()) -> LabelTable:
    """A TSV of labels; keyed by ``sop_instance_uid`` when it has that column, else by ``id_column``. A key that
    appears twice with different values of a target is an error naming both."""
    from shards import storage

    with storage.open_url(path, "rb") as f:
        text = f.read().decode("utf-8")
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = list(reader.fieldnames or [])
    key_column = VOLUME_ID if VOLUME_ID in columns else id_column
    for name in (key_column, *targets):
        if name not in columns:
            raise ValueError(f"{path}: no column {name!r} (columns: {columns})")
    rows: dict[str, dict[str, str]] = {}
    for line, row in enumerate(reader, start=2):
        key = (row.get(key_column) or "").strip()
        if not key:
            continue
        values = {c: (row.get(c) or "").strip() for c in columns}
        for c in targets:
            old = rows.get(key, {}).get(c, "")
            if old and values[c] and old != values[c]:
                raise ValueError(f"{path}:{line}: {key_column} {key!r} has two {c!r} values, {old!r} and {values[c]!r}")
        rows.setdefault(key, {}).update({c: v for c, v in values.items() if v})
    if not rows:
        raise ValueError(f"{path}: no row has a {key_column!r}")
    return LabelTable(path, key_column, columns, rows)


@dataclass
class Target:
    """One probe target joined to the embeddings: the rows that have a value, their values and participants."""

    name: str
    task: str
    rows: np.ndarray  # (M,) indices into the Embeddings rows
    y: np.ndarray  # (M,) float for regression, str for classes
    groups: np.ndarray  # (M,) participant ids: the unit the folds split
    counts: dict[str, int] = field(default_factory=dict)


def task_of(values: Sequence[str]) -> str:
    """Numbers with more than two distinct values are regressed; anything else is a class label."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return "classification"
    return "regression" if len(set(numbers)) > 2 else "classification"


def join_target(name: str, table: LabelTable, participant_ids: Sequence[str], volume_ids: Sequence[str]) -> Target:
    keys = volume_ids if table.key_column == VOLUME_ID else participant_ids
    rows = [i for i, k in enumerate(keys) if name in table.rows.get(k, {})]
    values = [table.rows[keys[i]][name] for i in rows]
    task = task_of(values)
    y = np.asarray(values, dtype=np.float64 if task == "regression" else object)
    groups = np.asarray([participant_ids[i] for i in rows])
    counts = {
        "volumes": len(keys),
        "labelled_volumes": len(rows),
        "volumes_without_value": len(keys) - len(rows),
        "participants": len(set(groups.tolist())),
        "table_keys_without_volumes": len(set(table.rows) - set(keys)),
    }
    return Target(name, task, np.asarray(rows, dtype=np.int64), y, groups, counts)


# ---------------------------------------------------------------------------------------------------------------
# Probes and the report
# ---------------------------------------------------------------------------------------------------------------
def unprobeable(target: Target, plan: CVPlan) -> str | None:
    """Why a target cannot be probed on this set (a small set may hold one value, or too few participants)."""
    if len(target.y) == 0:
        return "no volume of the shard set has a value"
    if len(np.unique(target.y)) < 2:
        return f"a single value ({target.y[0]!r}) over all {len(target.y)} volumes"
    people = len(np.unique(target.groups))
    if people < plan.folds:
        return f"{people} participant(s) with a value, fewer than the {plan.folds} folds"
    return None


def probe_target(
    target: Target, features: dict[str, np.ndarray], plan: CVPlan, *, reference: str | None = None
) -> dict[str, Any]:
    """Every feature set on the same folds; paired differences of each encoder against each baseline.
    ``reference`` (default: the first feature set) is the one ``paired_difference`` reports against random init.
    A target that ``unprobeable`` refuses is reported as {"skipped": reason, "counts": ...}."""
    reason = unprobeable(target, plan)
    if reason is not None:
        return {"task": target.task, "skipped": reason, "counts": target.counts}
    splits = outer_splits(target.y, target.groups, target.task, plan)
    scores = {
        name: cross_validate(x[target.rows], target.y, target.groups, task=target.task, plan=plan, splits=splits)
        for name, x in features.items()
    }
    metrics = METRICS[target.task]
    primary = metrics[0]
    out: dict[str, Any] = {
        "task": target.task,
        "metric": primary,
        "counts": target.counts,
        "scores": {name: {m: summary(s[m], plan) for m in metrics} for name, s in scores.items()},
        "paired_differences": {},
    }
    if target.task == "classification":
        out["classes"] = sorted(set(target.y.tolist()))
    encoders = [n for n in features if n not in (RANDOM, RAW)]
    for enc in encoders:
        for base in (RANDOM, RAW):
            if base in scores:
                out["paired_differences"][f"{enc} - {base}"] = {
                    m: summary(paired(scores[enc][m], scores[base][m]), plan) for m in metrics
                }
    reference = reference or (encoders[0] if encoders else None)
    if reference is not None and RANDOM in scores:
        diff = out["paired_differences"][f"{reference} - {RANDOM}"][primary]
        out["paired_difference"] = {
            "encoder": reference,
            "baseline": RANDOM,
            "metric": primary,
            **diff,
            "interval_above_zero": interval_above_zero(diff),
        }
    return out


def _fmt(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "n/a"
    if s["ci95"] is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def format_table(probes: dict[str, dict[str, Any]]) -> str:
    """One block per target: each feature set's primary score, then the paired differences (mean [95% CI])."""
    lines = []
    for name, p in probes.items():
        if "skipped" in p:
            lines.append(f"{name}: not probed: {p['skipped']}")
            continue
        metric = p["metric"]
        lines.append(
            f"{name} ({p['task']}, {metric}, {p['counts']['labelled_volumes']} volumes of "
            f"{p['counts']['participants']} participants)"
        )
        for enc, s in p["scores"].items():
            lines.append(f"  {enc:<26}{_fmt(s[metric])}")
        for pair, s in p["paired_differences"].items():
            lines.append(f"  {pair:<26}{_fmt(s[metric])}")
    return "\n".join(lines)


def plot_probes(probes: dict[str, dict[str, Any]], path: str) -> None:
    """Per target: each feature set's score and each paired difference, mean with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = {name: p for name, p in probes.items() if "skipped" not in p} or {
        "(no target probed)": {"metric": "", "scores": {}, "paired_differences": {}}
    }
    fig, axes = plt.subplots(len(probes), 2, figsize=(11, 1.0 + 1.3 * len(probes)), squeeze=False)
    for (name, p), (left, right) in zip(probes.items(), axes):
        metric = p["metric"]
        for ax, entries, title in (
            (left, p["scores"], f"{name}: {metric}"),
            (right, p["paired_differences"], "paired difference"),
        ):
            labels = list(entries)
            for i, label in enumerate(labels):
                s = entries[label][metric]
                if s["mean"] is None:
                    continue
                lo, hi = s["ci95"] or (s["mean"], s["mean"])
                above = ax is right and lo > 0
                ax.errorbar(
                    s["mean"],
                    i,
                    xerr=[[s["mean"] - lo], [hi - s["mean"]]],
                    fmt="o",
                    capsize=3,
                    color="tab:green" if above else "tab:blue",
                )
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_ylim(-0.6, len(labels) - 0.4)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(True, axis="x", alpha=0.3)
        right.axvline(0.0, color="grey", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def load_encoders(checkpoint: str, kinds: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """{name: encoder} from an export or checkpoint (named "pretrained", or by kind when ``kinds`` are given)."""
    from trainer.checkpoint import load_encoder

    if not kinds:
        encoder, cfg = load_encoder(checkpoint)
        return {"pretrained": encoder}, cfg
    loaded = {kind: load_encoder(checkpoint, kind) for kind in kinds}
    return {kind: enc for kind, (enc, _) in loaded.items()}, next(iter(loaded.values()))[1]


def main_probe(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="octjepa probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_args(parser)
    parser.add_argument(
        "--labels", required=True, help="TSV of targets: per volume (sop_instance_uid) or per participant (--id-column)"
    )
    parser.add_argument(
        "--targets",
        "--label-column",
        dest="targets",
        default="study_group",
        help="comma-separated columns of --labels to probe",
    )
    parser.add_argument("--id-column", default="participant_id")
    parser.add_argument(
        "--encoders",
        default="",
        help="from a checkpoint: comma-separated 'target', 'online' "
        "(the first is the paired difference's); default: the export",
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--pooling",
        choices=("mean", "attentive"),
        default="mean",
        help="attentive: V-JEPA 2's attentive probe on the tokens (class targets, small sets)",
    )
    parser.add_argument("--no-random-baseline", action="store_true")
    parser.add_argument("--no-raw-baseline", action="store_true")
    parser.add_argument("--out", default="probe_report", help="directory for report.json and probe.png")
    args = parser.parse_args(argv)

    targets = [t for t in args.targets.split(",") if t]
    table = read_labels(args.labels, id_column=args.id_column, targets=targets)
    encoders, cfg = load_encoders(args.checkpoint, [k for k in args.encoders.split(",") if k])
    if not args.no_random_baseline:
        encoders[RANDOM] = random_init_encoder(cfg, args.seed)
    attentive = args.pooling == "attentive"
    emb = embed_many(
        encoders,
        args.shards,
        batch_size=args.batch_size,
        device=pick_device(args.device),
        raw_voxels=None if args.no_raw_baseline or attentive else RAW,
        keep_tokens=attentive,
    )
    first = next(iter(emb.values()))
    features = {name: e.tokens if attentive else e.features for name, e in emb.items()}
    plan = CVPlan(folds=args.folds, repeats=args.repeats, seed=args.seed)
    probes = {}
    for name in targets:
        target = join_target(name, table, first.participant_ids, first.sop_instance_uids)
        probes[name] = probe_target(target, features, plan)
        print(format_table({name: probes[name]}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "checkpoint": args.checkpoint,
        "shards": args.shards,
        "labels": args.labels,
        "key": table.key_column,
        "pooling": args.pooling,
        "feature_sets": list(features),
        "cv": {
            "folds": plan.folds,
            "repeats": plan.repeats,
            "inner_folds": plan.inner_folds,
            "seed": plan.seed,
            "unit": "participant",
            "interval": "corrected resampled t (Nadeau & Bengio), 95%",
        },
        "probes": probes,
    }
    report_path, png_path = os.path.join(args.out, "report.json"), os.path.join(args.out, "probe.png")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    plot_probes(probes, png_path)
    print(f"report: {report_path}\nplot: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_probe())
