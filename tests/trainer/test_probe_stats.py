"""Probe statistics on synthetic features with a known answer: repeated grouped CV by participant detects a
planted difference between two encoders and not a null one, never splits a participant, and chooses its
regularisation without the test fold."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import probe_stats
from trainer.probe_stats import CVPlan, cross_validate, interval_above_zero, outer_splits, paired, summary

PLAN = CVPlan(folds=5, repeats=4, inner_folds=3, seed=0)


def participants(n_people: int = 60, eyes: int = 2, seed: int = 0):
    """Two volumes per participant sharing the participant's value (as both eyes do)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_people), eyes).astype(str)
    value = np.repeat(rng.normal(size=n_people), eyes)
    return rng, groups, value


def test_a_planted_regression_signal_is_detected_and_a_null_difference_is_not():
    rng, groups, y = participants()
    n, dim = len(y), 24
    informative = rng.normal(size=(n, dim))
    informative[:, 0] = y + 0.5 * rng.normal(size=n)  # one feature carries the target, with noise
    noise_a, noise_b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    splits = outer_splits(y, groups, "regression", PLAN)
    good = cross_validate(informative, y, groups, task="regression", plan=PLAN, splits=splits)["r2"]
    null_a = cross_validate(noise_a, y, groups, task="regression", plan=PLAN, splits=splits)["r2"]
    null_b = cross_validate(noise_b, y, groups, task="regression", plan=PLAN, splits=splits)["r2"]
    assert len(good) == PLAN.folds * PLAN.repeats
    assert summary(good, PLAN)["mean"] > 0.5 and interval_above_zero(summary(good, PLAN))
    assert not interval_above_zero(summary(null_a, PLAN))
    diff = summary(paired(good, null_a), PLAN)
    assert diff["mean"] > 0.5 and interval_above_zero(diff)
    low, high = summary(paired(null_a, null_b), PLAN)["ci95"]
    assert low < 0 < high  # two encoders that know nothing: no difference found


def test_a_planted_class_signal_is_detected_and_shuffled_labels_sit_at_chance():
    rng, groups, value = participants(n_people=60)
    labels = np.array(["a", "b", "c"])[np.digitize(value, [-0.43, 0.43])]  # three about equal classes
    x = rng.normal(size=(len(labels), 16))
    x[:, 0] = value + 0.3 * rng.normal(size=len(labels))
    plan = CVPlan(folds=5, repeats=2)  # logistic fits cost more than ridge
    scores = cross_validate(x, labels, groups, task="classification", plan=plan)
    assert summary(scores["balanced_accuracy"], plan)["mean"] > 0.7
    assert summary(scores["auroc_macro_ovr"], plan)["ci95"][0] > 0.75
    # Labels shuffled between participants keep the groups intact and carry no signal.
    people = np.unique(groups)
    shuffled = dict(zip(people, rng.permutation([labels[groups == p][0] for p in people])))
    null = cross_validate(x, np.array([shuffled[g] for g in groups]), groups, task="classification", plan=plan)
    low, high = summary(null["balanced_accuracy"], plan)["ci95"]
    assert low < 1 / 3 < high


def test_folds_keep_participants_whole_and_stratify_classes():
    rng, groups, value = participants(n_people=30, eyes=3)
    labels = np.where(value > 0, "x", "y")
    for task, y in (("regression", value), ("classification", labels)):
        splits = outer_splits(y, groups, task, PLAN)
        assert len(splits) == PLAN.folds * PLAN.repeats
        for r in range(PLAN.repeats):
            tests = [te for _, te in splits[r * PLAN.folds : (r + 1) * PLAN.folds]]
            assert sorted(np.concatenate(tests).tolist()) == list(range(len(y)))  # each volume tested once a repeat
        for tr, te in splits:
            assert not set(groups[tr]) & set(groups[te])
    with pytest.raises(ValueError, match="participants"):
        outer_splits(value[:6], groups[:6], "regression", PLAN)


def test_the_regularisation_is_chosen_without_the_test_fold(monkeypatch):
    rng, groups, y = participants(n_people=30)
    y = y + np.arange(len(y)) * 1e-9  # every row's target is unique, so a fit's rows can be told apart
    seen = []
    original = probe_stats._ridge_all_alphas

    def recording(x_train, y_train, x_test):
        seen.append(set(y_train.tolist()))
        return original(x_train, y_train, x_test)

    monkeypatch.setattr(probe_stats, "_ridge_all_alphas", recording)
    plan = CVPlan(folds=5, repeats=1, inner_folds=3)
    splits = outer_splits(y, groups, "regression", plan)
    cross_validate(rng.normal(size=(len(y), 8)), y, groups, task="regression", plan=plan, splits=splits)
    per_fold = plan.inner_folds + 1  # the inner fits, then the outer one
    for k, (tr, _) in enumerate(splits):
        train_values = set(y[tr].tolist())
        for fit in seen[k * per_fold : (k + 1) * per_fold]:
            assert fit <= train_values
    assert all(len(fit) < len(tr) for fit in seen[: plan.inner_folds])  # the inner fits hold part of it out


def test_the_ridge_path_equals_sklearns_ridge_on_standardised_features():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 12)) * rng.uniform(0.1, 5.0, 12) + 3.0
    y, x_test = rng.normal(size=50) + 2.0, rng.normal(size=(9, 12))
    mean, std = x.mean(axis=0), x.std(axis=0)
    path = probe_stats._ridge_all_alphas(x, y, x_test)
    for k, alpha in enumerate(probe_stats.RIDGE_ALPHAS):
        expected = Ridge(alpha=alpha).fit((x - mean) / std, y).predict((x_test - mean) / std)
        np.testing.assert_allclose(path[:, k], expected, atol=1e-9)


def test_interval_is_corrected_for_overlapping_training_sets():
    scores = [0.1, 0.2, 0.3, 0.4] * 5
    s = summary(scores, CVPlan(folds=5, repeats=4))
    naive_half = 2.093 * np.std(scores, ddof=1) / np.sqrt(20)
    half = (s["ci95"][1] - s["ci95"][0]) / 2
    assert s["mean"] == pytest.approx(0.25)
    assert half == pytest.approx(2.093 * np.sqrt((1 / 20 + 0.25) * np.var(scores, ddof=1)), rel=1e-3)
    assert half > 2 * naive_half
    assert summary([None, 0.5], PLAN)["n_folds"] == 1 and summary([], PLAN)["ci95"] is None
