"""Probe statistics a reviewer accepts: repeated grouped k-fold cross-validation by participant.

    scores = cross_validate(features, y, participants, task="regression", plan=CVPlan(folds=5, repeats=10))
    summary(scores["r2"], plan, n=len(y))                                   # mean and 95% interval
    summary(paired(scores_a["r2"], scores_b["r2"]), plan, n=len(y))        # a - b over the same folds

Every repeat splits the participants (never the volumes: both eyes of a person stay on one side) into ``folds``
folds, stratified by class for class targets. Each outer training part standardises the features and chooses its
regularisation by an inner grouped CV on itself alone (ridge alpha by R^2, logistic C by balanced accuracy); the
held-out fold is scored once. Two encoders are compared on the same splits, fold by fold.

Interval: the folds of repeated CV share training data, so their scores are correlated and the plain standard
error is too small. The 95% interval is Nadeau & Bengio's corrected resampled t (Bouckaert & Frank 2004):
mean +- t(0.975, J-1) * sqrt((1/J + n_test/n_train) * s^2) over the J = repeats * folds scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ATTENTIVE_WD_GRID = (1e-3, 1e-2, 1e-1)  # the attentive probe's weight decay (its regularisation)
RIDGE_ALPHAS = tuple(10.0**k for k in np.arange(-2.0, 5.01, 0.5))  # on standardised features
LOGISTIC_CS = (1e-3, 1e-2, 1e-1, 1.0)  # larger C never won on these sizes and cost the most iterations
TASKS = ("regression", "classification")
METRICS = {"regression": ("r2",), "classification": ("balanced_accuracy", "auroc_macro_ovr")}


@dataclass(frozen=True)
class CVPlan:
    folds: int = 5
    repeats: int = 10
    inner_folds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2 or self.inner_folds < 2 or self.repeats < 1:
            raise ValueError(f"need folds >= 2, inner_folds >= 2 and repeats >= 1, got {self}")


def outer_splits(y: np.ndarray, groups: np.ndarray, task: str, plan: CVPlan) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) of every fold of every repeat; folds hold whole participants."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < plan.folds:
        raise ValueError(f"{n_groups} participants cannot fill {plan.folds} folds; lower the number of folds")
    splits = []
    for r in range(plan.repeats):
        if task == "classification":
            splitter = StratifiedGroupKFold(plan.folds, shuffle=True, random_state=plan.seed + r)
        else:
            splitter = GroupKFold(plan.folds, shuffle=True, random_state=plan.seed + r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "least populated class has fewer members than n_splits"
            splits += list(splitter.split(np.zeros(len(y)), y, groups))
    return splits


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Zero mean, unit variance per feature, with the training part's statistics (constant features stay 0)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def _ridge_all_alphas(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """(n_test, len(RIDGE_ALPHAS)) predictions of ridge regressions with an intercept, one per alpha.

    The closed form from one SVD of the centred training features gives every alpha at once (sklearn's Ridge
    solves the same system per call; at these sizes its per-call parameter checks cost more than the solve)."""
    x_train, x_test = _standardise(x_train, x_test)
    y_mean = y_train.mean()
    u, s, vt = np.linalg.svd(x_train, full_matrices=False)
    alphas = np.asarray(RIDGE_ALPHAS)
    shrink = s[:, None] / (s[:, None] ** 2 + alphas[None, :])  # (k, A)
    coef = vt.T @ (shrink * (u.T @ (y_train - y_mean))[:, None])  # (E, A)
    return x_test @ coef + y_mean


def _logistic_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(classes, test probabilities) per C of LOGISTIC_CS, fitted strongest regularisation first (warm starts)."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = _standardise(x_train, x_test)
    # tol 1e-3: probabilities to three decimals are all a balanced accuracy and an AUROC read.
    model = LogisticRegression(max_iter=500, tol=1e-3, warm_start=True)
    out = []
    for c in LOGISTIC_CS:
        model.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at large C on separable data
            model.fit(x_train, y_train)
        out.append((model.classes_.copy(), model.predict_proba(x_test)))
    return out


ClassPath = Callable[[np.ndarray, np.ndarray, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]


def _attentive_path(t_train: np.ndarray, y_train: np.ndarray, t_test: np.ndarray) -> list[tuple[Any, np.ndarray]]:
    """(classes, test probabilities) per weight decay of ATTENTIVE_WD_GRID, on (V, N, E) tokens."""
    out = []
    for wd in ATTENTIVE_WD_GRID:
        model = AttentiveProbe(weight_decay=wd).fit(t_train, y_train)
        out.append((model.classes_, model.predict_proba(t_test)))
    return out


def _class_path(x: np.ndarray) -> ClassPath:
    """Pooled features (V, E) take the logistic path, tokens (V, N, E) the attentive probe's."""
    return _attentive_path if x.ndim == 3 else _logistic_path


def _inner_choice(x: np.ndarray, y: np.ndarray, groups: np.ndarray, task: str, plan: CVPlan, repeat: int) -> int:
    """Index of the regularisation an inner grouped CV on (x, y) alone prefers (ties: the stronger one)."""
    from sklearn.model_selection import GroupKFold

    folds = min(plan.inner_folds, len(np.unique(groups)))
    splitter = GroupKFold(folds, shuffle=True, random_state=plan.seed + 1000 + repeat)
    grid = RIDGE_ALPHAS if task == "regression" else ATTENTIVE_WD_GRID if x.ndim == 3 else LOGISTIC_CS
    totals = np.zeros(len(grid))
    for tr, te in splitter.split(x, y, groups):
        if task == "regression":
            totals += r2(y[te], _ridge_all_alphas(x[tr], y[tr], x[te]))
        else:
            if len(np.unique(y[tr])) < 2:
                continue
            totals += [
                balanced_accuracy(y[te], classes[proba.argmax(1)])
                for classes, proba in _class_path(x)(x[tr], y[tr], x[te])
            ]
    best = np.flatnonzero(totals >= totals.max() - 1e-12)
    # Ties go to the strongest regularisation: the largest alpha or weight decay, the smallest C.
    return int(best[0] if grid is LOGISTIC_CS else best[-1])


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination 1 - SS_res / SS_tot (sklearn's r2_score), for each column of ``y_pred``
    (n,) or (n, k) at once (SS_tot is floored, so a constant fold gives a large negative score, not a division
    by zero)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    residual = ((y_true[:, None] - np.asarray(y_pred).reshape(len(y_true), -1)) ** 2).sum(axis=0)
    total = max(float(((y_true - y_true.mean()) ** 2).sum()), np.finfo(np.float64).tiny)
    out = 1.0 - residual / total
    return out if np.ndim(y_pred) == 2 else out[0]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" on small folds
        return float(balanced_accuracy_score(y_true, y_pred))


def macro_auroc(y_true: np.ndarray, proba: np.ndarray, model_classes: np.ndarray) -> float | None:
    """Macro one-vs-rest AUROC over the classes with positives and negatives in the fold that the probe knows."""
    from sklearn.metrics import roc_auc_score

    scored = [
        roc_auc_score(y_true == cls, proba[:, j])
        for j, cls in enumerate(model_classes)
        if (y_true == cls).any() and not (y_true == cls).all()
    ]
    return float(np.mean(scored)) if scored else None


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    task: str,
    plan: CVPlan,
    splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, list[float | None]]:
    """Per-fold test scores {metric: [one per fold of every repeat]}; ``splits`` (from ``outer_splits``) lets
    several feature sets share the same folds."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if x.ndim == 3 and task != "classification":
        raise ValueError("the attentive probe (token features) takes class targets only")
    from threadpoolctl import threadpool_limits

    y, groups = np.asarray(y), np.asarray(groups)
    splits = splits if splits is not None else outer_splits(y, groups, task, plan)
    scores: dict[str, list[float | None]] = {m: [] for m in METRICS[task]}
    with threadpool_limits(1):  # small matrices: BLAS threads only contend (several times slower on a busy host)
        for number, (tr, te) in enumerate(splits):
            _score_fold(x, y, groups, tr, te, task=task, plan=plan, repeat=number // plan.folds, scores=scores)
    return scores


def _score_fold(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    *,
    task: str,
    plan: CVPlan,
    repeat: int,
    scores: dict[str, list[float | None]],
) -> None:
    """Fit on ``tr`` (regularisation from the inner CV on ``tr`` alone), score ``te`` once, append to scores.
    A class fold whose training part holds one class (tiny sets) scores None: no probe can be fitted there."""
    if task == "classification" and len(np.unique(y[tr])) < 2:
        for metric in scores:
            scores[metric].append(None)
        return
    choice = _inner_choice(x[tr], y[tr], groups[tr], task, plan, repeat)
    if task == "regression":
        scores["r2"].append(float(r2(y[te], _ridge_all_alphas(x[tr], y[tr], x[te])[:, choice])))
        return
    classes, proba = _class_path(x)(x[tr], y[tr], x[te])[choice]
    scores["balanced_accuracy"].append(balanced_accuracy(y[te], classes[proba.argmax(1)]))
    scores["auroc_macro_ovr"].append(macro_auroc(y[te], proba, classes))


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> list[float | None]:
    """Fold-by-fold differences a - b (None where either fold has no score)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same folds, got {len(a)} and {len(b)}")
    return [None if x is None or y is None else x - y for x, y in zip(a, b)]


def summary(scores: Sequence[float | None], plan: CVPlan) -> dict[str, Any]:
    """Mean, corrected 95% interval (see the module docstring) and the scores themselves."""
    from scipy import stats

    values = np.array([s for s in scores if s is not None], dtype=np.float64)
    out: dict[str, Any] = {
        "mean": None,
        "ci95": None,
        "n_folds": int(values.size),
        "folds": [None if s is None else round(float(s), 6) for s in scores],
    }
    if values.size == 0:
        return out
    mean = float(values.mean())
    out["mean"] = mean
    if values.size > 1:
        test_share = 1.0 / plan.folds  # n_test / n for grouped k-fold
        variance = (1.0 / values.size + test_share / (1.0 - test_share)) * values.var(ddof=1)
        half = float(stats.t.ppf(0.975, values.size - 1) * np.sqrt(variance))
        out["ci95"] = [mean - half, mean + half]
    return out


def interval_above_zero(s: dict[str, Any]) -> bool:
    return s["ci95"] is not None and s["ci95"][0] > 0


class AttentiveProbe:
    """V-JEPA 2's attentive probe, minimal: one learned query cross-attends to the frozen tokens, then a linear
    classifier. sklearn-style ``fit`` / ``predict_proba`` / ``predict`` / ``classes_`` on (V, N, E) tokens."""

    def __init__(
        self, *, weight_decay: float, epochs: int = 100, lr: float = 1e-2, num_heads: int = 4, seed: int = 0
    ) -> None:
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
            self.head = torch.nn.Sequential(
                torch.nn.LayerNorm(embed_dim), torch.nn.Linear(embed_dim, len(self.classes_))
            )
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
