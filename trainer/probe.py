"""Frozen-encoder evaluation: a linear (or attentive) probe on participant labels, against a random-init encoder.

    octjepa probe --checkpoint runs/smoke/encoder.pt --shards data/shards --labels data/participants.tsv \\
        [--label-column study_group] [--split-column recommended_split] [--out probe_report] [--pooling attentive]

Every volume of the shard set is embedded once by the frozen target encoder (``trainer.embed``). Labels join on
participant id; a volume whose participant has no label is counted and skipped. A logistic probe (standardised
features) is fitted on the train split, its C chosen on val by balanced accuracy, and reported on test (on val where
the set has no test split, which is then optimistic and flagged). The same probe on a randomly initialised encoder
of the same architecture runs side by side, so the report shows what pretraining bought.
``--pooling attentive`` swaps mean pooling for V-JEPA 2's attentive probe (one learned query cross-attending to the
tokens); it keeps every token in memory (N x E float16 per volume), so it is meant for small sets.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shards import SPLITS
from trainer.embed import common_args, embed_shard_set, pick_device, random_init_encoder

LINEAR_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ATTENTIVE_WD_GRID = (1e-3, 1e-2, 1e-1)
METRICS = ("accuracy", "balanced_accuracy", "auroc_macro_ovr")


# ---------------------------------------------------------------------------------------------------------------
# Labels and the join
# ---------------------------------------------------------------------------------------------------------------
def read_labels(path: str, *, label_column: str, split_column: str | None,
                id_column: str = "participant_id") -> dict[str, tuple[str, str | None]]:
    """participants.tsv -> {participant_id: (label, split or None)}; rows with an empty label are left out."""
    from shards import storage

    with storage.open_url(path, "rb") as f:
        text = f.read().decode("utf-8")
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = reader.fieldnames or []
    for name in (id_column, label_column):
        if name not in columns:
            raise ValueError(f"{path}: no column {name!r} (columns: {columns})")
    use_split = bool(split_column) and split_column in columns
    labels: dict[str, tuple[str, str | None]] = {}
    for line, row in enumerate(reader, start=2):
        pid, label = (row.get(id_column) or "").strip(), (row.get(label_column) or "").strip()
        if not pid or not label:
            continue
        split = (row.get(split_column) or "").strip() if use_split else ""
        split = split if split in SPLITS else None  # anything else falls back to the shard set's split
        if pid in labels and labels[pid][0] != label:
            raise ValueError(f"{path}:{line}: participant {pid!r} has two labels, {labels[pid][0]!r} and {label!r}")
        labels[pid] = (label, split)
    if not labels:
        raise ValueError(f"{path}: no row has both {id_column!r} and {label_column!r}")
    return labels


@dataclass
class Joined:
    rows: np.ndarray  # (M,) indices into the Embeddings rows that have a label
    labels: list[str]  # (M,)
    splits: list[str]  # (M,)
    counts: dict[str, int] = field(default_factory=dict)


def join_labels(participant_ids: Sequence[str], sample_splits: Sequence[str],
                labels: dict[str, tuple[str, str | None]]) -> Joined:
    """Volumes x labels on participant id. The labels file's split wins; the shard set's split is the fallback."""
    rows, ys, splits = [], [], []
    from_labels = 0
    for i, (pid, sample_split) in enumerate(zip(participant_ids, sample_splits)):
        if pid not in labels:
            continue
        label, split = labels[pid]
        rows.append(i)
        ys.append(label)
        splits.append(split or sample_split)
        from_labels += split is not None
    with_volumes = set(participant_ids)
    counts = {
        "volumes": len(participant_ids),
        "labelled_volumes": len(rows),
        "skipped_volumes_without_label": len(participant_ids) - len(rows),
        "participants_without_label": len(with_volumes - set(labels)),
        "labelled_participants_without_volumes": len(set(labels) - with_volumes),
        "split_from_labels": from_labels,
        "split_from_shards": len(rows) - from_labels,
    }
    return Joined(np.asarray(rows, dtype=np.int64), ys, splits, counts)


# ---------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------
def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" is expected on small splits
        return float(balanced_accuracy_score(y_true, y_pred))


def x_is_empty(x: np.ndarray | None) -> bool:
    return x is None or len(x) == 0


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None,
                     *, c_grid: Iterable[float] = LINEAR_C_GRID, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Standardised logistic regression; C by balanced accuracy on val (ties go to the stronger regularisation).
    Without a val split, C is chosen by 3-fold cross-validation on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def make(c: float) -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))

    if len(np.unique(y_train)) < 2:
        raise ValueError(f"the train split holds one class only ({np.unique(y_train)}); a probe needs two or more")
    grid = sorted(c_grid)
    if x_is_empty(x_val):
        search = GridSearchCV(make(1.0), {"logisticregression__C": grid}, scoring="balanced_accuracy", cv=3)
        search.fit(x_train, y_train)
        return search.best_estimator_, {"C": search.best_params_["logisticregression__C"], "selected_on": "train_cv",
                                        "selection_balanced_accuracy": float(search.best_score_)}
    best, best_score, best_c = None, -1.0, grid[0]
    for c in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at large C on separable data
            model = make(c).fit(x_train, y_train)
        score = _balanced_accuracy(y_val, model.predict(x_val))
        if score > best_score:
            best, best_score, best_c = model, score, c
    return best, {"C": best_c, "selected_on": "val", "selection_balanced_accuracy": best_score}


class AttentiveProbe:
    """V-JEPA 2's attentive probe, minimal: one learned query cross-attends to the frozen tokens, then a linear
    classifier. sklearn-style ``fit`` / ``predict_proba`` / ``predict`` / ``classes_`` on (V, N, E) tokens."""

    def __init__(self, *, weight_decay: float, epochs: int = 100, lr: float = 1e-2, num_heads: int = 4,
                 seed: int = 0) -> None:
        self.weight_decay, self.epochs, self.lr, self.num_heads, self.seed = weight_decay, epochs, lr, num_heads, seed

    def fit(self, tokens: np.ndarray, y: np.ndarray) -> AttentiveProbe:
        self.classes_ = np.unique(y)
        target = torch.as_tensor(np.searchsorted(self.classes_, y))
        x = torch.as_tensor(tokens, dtype=torch.float32)  # (V, N, E)
        embed_dim = x.shape[-1]
        heads = self.num_heads if embed_dim % self.num_heads == 0 else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.query = torch.nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
            self.attn = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True)
            self.head = torch.nn.Sequential(torch.nn.LayerNorm(embed_dim), torch.nn.Linear(embed_dim, len(self.classes_)))
            params = [self.query, *self.attn.parameters(), *self.head.parameters()]
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            for _ in range(self.epochs):  # full batch: probe sets are small (the tokens are all in memory)
                opt.zero_grad()
                F.cross_entropy(self._logits(x), target).backward()
                opt.step()
        return self

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x)  # (V, 1, E)
        return self.head(pooled[:, 0])

    @torch.no_grad()
    def predict_proba(self, tokens: np.ndarray) -> np.ndarray:
        return self._logits(torch.as_tensor(tokens, dtype=torch.float32)).softmax(-1).numpy()

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(tokens).argmax(1)]


def fit_attentive_probe(t_train: np.ndarray, y_train: np.ndarray, t_val: np.ndarray | None, y_val: np.ndarray | None,
                        *, seed: int = 0) -> tuple[AttentiveProbe, dict[str, Any]]:
    """Weight decay by balanced accuracy on val (the first grid value without a val split)."""
    if x_is_empty(t_val):
        return AttentiveProbe(weight_decay=ATTENTIVE_WD_GRID[0], seed=seed).fit(t_train, y_train), {
            "weight_decay": ATTENTIVE_WD_GRID[0], "selected_on": "none"}
    best, best_score, best_wd = None, -1.0, None
    for wd in ATTENTIVE_WD_GRID:
        model = AttentiveProbe(weight_decay=wd, seed=seed).fit(t_train, y_train)
        score = _balanced_accuracy(y_val, model.predict(t_val))
        if score > best_score:
            best, best_score, best_wd = model, score, wd
    return best, {"weight_decay": best_wd, "selected_on": "val", "selection_balanced_accuracy": best_score}


def macro_auroc(y_true: np.ndarray, proba: np.ndarray, model_classes: np.ndarray) -> tuple[float | None, list[str]]:
    """Macro one-vs-rest AUROC over the classes that can be scored: present in the eval split with both positives
    and negatives, and known to the probe (seen in train). Returns (value or None, classes left out)."""
    from sklearn.metrics import roc_auc_score

    scored, left_out = [], []
    for j, cls in enumerate(model_classes):
        positives = y_true == cls
        if positives.all() or not positives.any():
            left_out.append(str(cls))
            continue
        scored.append(roc_auc_score(positives, proba[:, j]))
    left_out += [str(c) for c in np.unique(y_true) if c not in set(model_classes)]
    return (float(np.mean(scored)) if scored else None), sorted(left_out)


def probe_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray, model_classes: np.ndarray,
                  devices: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro OvR AUROC, per-class recall/precision/support, per-device breakdown."""
    from sklearn.metrics import confusion_matrix

    auroc, auroc_left_out = macro_auroc(y_true, proba, model_classes)
    per_class = {}
    for cls in classes:
        support = int((y_true == cls).sum())
        predicted = int((y_pred == cls).sum())
        hits = int(((y_true == cls) & (y_pred == cls)).sum())
        per_class[str(cls)] = {"support": support, "recall": hits / support if support else None,
                               "precision": hits / predicted if predicted else None}
    per_device = {}
    for dev in sorted(set(devices.tolist())):
        sel = devices == dev
        per_device[str(dev)] = {"n": int(sel.sum()), "accuracy": float((y_true[sel] == y_pred[sel]).mean()),
                                "balanced_accuracy": _balanced_accuracy(y_true[sel], y_pred[sel])}
    return {
        "n": len(y_true),
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "auroc_macro_ovr": auroc,
        "auroc_classes_left_out": auroc_left_out,
        "per_class": per_class,
        "per_device": per_device,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(classes)).tolist(),
    }


def run_probe(x: np.ndarray, labels: Sequence[str], splits: Sequence[str], devices: Sequence[str], *,
              attentive: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fit on train, select on val, report on test (val when there is no test). ``x`` is (M, E) pooled features,
    or (M, N, E) tokens with ``attentive``."""
    y, split, dev = np.asarray(labels), np.asarray(splits), np.asarray(devices)
    classes = sorted(set(y.tolist()))
    if not (split == "train").any():
        raise ValueError(f"no labelled volume is in the train split (splits present: {sorted(set(split.tolist()))})")
    has_val, has_test = (split == "val").any(), (split == "test").any()
    eval_split = "test" if has_test else "val" if has_val else None
    if eval_split is None:
        raise ValueError("no labelled volume is in a val or test split; nothing to report the probe on")
    tr, va, ev = split == "train", split == "val", split == eval_split
    fit = fit_attentive_probe if attentive else fit_linear_probe
    model, selection = fit(x[tr], y[tr], x[va] if has_val else None, y[va] if has_val else None, seed=seed)
    proba = model.predict_proba(x[ev])
    y_pred = model.classes_[proba.argmax(1)]
    metrics = probe_metrics(y[ev], y_pred, proba, model.classes_, dev[ev], classes)
    return {"eval_split": eval_split, "selection": selection,
            "n_by_split": {s: int((split == s).sum()) for s in SPLITS}, **metrics}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The probe table: one row per metric, one column per encoder (and pretrained - random when both exist)."""
    names = list(results)
    header = f"{'metric':<22}" + "".join(f"{n:>14}" for n in names)
    both = {"pretrained", "random_init"} <= set(names)
    header += f"{'delta':>10}" if both else ""
    lines = [header]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for metric in METRICS:
        vals = [results[n][metric] for n in names]
        line = f"{metric:<22}" + "".join(f"{fmt(v):>14}" for v in vals)
        if both:
            a, b = results["pretrained"][metric], results["random_init"][metric]
            line += f"{(fmt(a - b) if a is not None and b is not None else 'n/a'):>10}"
        lines.append(line)
    first = results[names[0]]
    lines.append(f"(on the {first['eval_split']} split, n={first['n']})")
    return "\n".join(lines)


def plot_confusion(results: dict[str, dict[str, Any]], classes: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Long class names (AI-READI's study groups) are cut so the matrices keep their size; report.json has them whole.
    ticks = [c if len(c) <= 18 else c[:17] + "~" for c in classes]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        cm = np.asarray(res["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), ticks, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), ticks, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: bal. acc {res['balanced_accuracy']:.2f} (n={res['n']}, {res['eval_split']})",
                     fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def main_probe(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="octjepa probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--labels", required=True, help="participants.tsv (joined on --id-column)")
    parser.add_argument("--label-column", default="study_group")
    parser.add_argument("--split-column", default="recommended_split",
                        help="train/val/test per participant; the shard set's split where missing")
    parser.add_argument("--id-column", default="participant_id")
    parser.add_argument("--pooling", choices=("mean", "attentive"), default="mean")
    parser.add_argument("--no-random-baseline", action="store_true")
    parser.add_argument("--out", default="probe_report", help="directory for report.json and confusion.png")
    args = parser.parse_args(argv)
    from trainer.checkpoint import load_encoder

    labels = read_labels(args.labels, label_column=args.label_column, split_column=args.split_column,
                         id_column=args.id_column)
    pretrained, cfg = load_encoder(args.checkpoint)
    encoders = {"pretrained": pretrained}
    if not args.no_random_baseline:
        encoders["random_init"] = random_init_encoder(cfg, args.seed)
    attentive = args.pooling == "attentive"
    device = pick_device(args.device)
    results, joined = {}, None
    for name, encoder in encoders.items():
        emb = embed_shard_set(encoder, args.shards, batch_size=args.batch_size, keep_tokens=attentive, device=device)
        joined = join_labels(emb.participant_ids, emb.splits, labels)
        if len(joined.rows) == 0:
            raise ValueError(f"{args.labels}: no participant of the shard set {args.shards} has a "
                             f"{args.label_column!r} label ({joined.counts})")
        x = (emb.tokens if attentive else emb.features)[joined.rows]
        devices = [emb.devices[i] for i in joined.rows]
        results[name] = run_probe(x, joined.labels, joined.splits, devices, attentive=attentive, seed=args.seed)
    classes = sorted(set(joined.labels))
    os.makedirs(args.out, exist_ok=True)
    report = {
        "checkpoint": args.checkpoint, "shards": args.shards, "labels": args.labels,
        "label_column": args.label_column, "split_column": args.split_column, "pooling": args.pooling,
        "seed": args.seed, "classes": classes, "join": joined.counts, "encoders": results,
    }
    if results[next(iter(results))]["eval_split"] == "val":
        report["note"] = "no test split: reported on val, which also chose the regularisation (optimistic)"
    report_path, png_path = os.path.join(args.out, "report.json"), os.path.join(args.out, "confusion.png")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    plot_confusion(results, classes, png_path)
    print(f"labels: {joined.counts['labelled_volumes']} of {joined.counts['volumes']} volumes labelled "
          f"({joined.counts['skipped_volumes_without_label']} skipped without a {args.label_column!r} label)")
    print(format_table(results))
    print(f"report: {report_path}\nconfusion matrix: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_probe())
