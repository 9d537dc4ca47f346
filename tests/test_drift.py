"""Drift statistics (probe/drift.py) on synthetic gaussian features: calibration, power, reporting."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from probe.drift import (classifier_test, confidence_shift_test, detect, label_shift_test, mmd_test)

TRIALS = 40
N, DIM, PERMS = 60, 8, 100


def _pair(seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, DIM))
    Y = rng.normal(size=(N, DIM))
    Y[:, :4] += shift
    return X, Y


def test_false_positive_rate_is_near_alpha_without_shift():
    flags = {"mmd": 0, "classifier": 0}
    for seed in range(TRIALS):
        X, Y = _pair(seed)
        flags["mmd"] += mmd_test(X, Y, n_permutations=PERMS, seed=seed).p_value < 0.05
        flags["classifier"] += classifier_test(X, Y, seed=seed, folds=0).p_value < 0.05
    rates = {k: v / TRIALS for k, v in flags.items()}
    assert all(r < 0.15 for r in rates.values()), rates


def test_planted_shift_is_detected_in_nearly_all_trials():
    hits = {"mmd": 0, "classifier": 0}
    trials = 20
    for seed in range(trials):
        X, Y = _pair(1000 + seed, shift=1.0)
        hits["mmd"] += mmd_test(X, Y, n_permutations=PERMS, seed=seed).p_value < 0.05
        hits["classifier"] += classifier_test(X, Y, seed=seed, folds=0).p_value < 0.05
    assert all(h >= trials - 1 for h in hits.values()), hits


def test_p_values_are_permutation_exact_and_bounded():
    X, Y = _pair(3)
    res = mmd_test(X, Y, n_permutations=19, seed=0)
    assert 1 / 20 <= res.p_value <= 1.0
    assert res.p_value * 20 == pytest.approx(round(res.p_value * 20))  # (1 + count) / (1 + P)


def test_mmd_statistic_matches_the_textbook_formula():
    """Cross-check against a direct computation: MMD^2 = mean k(x,x') + mean k(y,y') - 2 mean k(x,y), RBF kernel
    exp(-d^2 / median d^2) over the pooled sample."""
    rng = np.random.default_rng(11)
    X, Y = rng.normal(size=(30, 5)), rng.normal(0.3, 1.0, size=(20, 5))
    Z = np.concatenate([X, Y])
    d2 = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    K = np.exp(-d2 / np.median(d2[np.triu_indices(50, k=1)]))
    expected = K[:30, :30].mean() + K[30:, 30:].mean() - 2 * K[:30, 30:].mean()
    assert mmd_test(X, Y, n_permutations=10).statistic == pytest.approx(expected, rel=1e-9)


def test_classifier_auc_is_the_held_out_roc_auc():
    rng = np.random.default_rng(12)
    X, Y = rng.normal(size=(40, 3)), rng.normal(1.0, 1.0, size=(40, 3))
    res = classifier_test(X, Y, seed=0)
    assert 0.5 < res.statistic <= 1.0 and res.detail["auc"] == res.statistic
    assert res.detail["cv_auc"] > 0.5 and len(res.detail["current_scores"]) == 40


def test_large_sets_are_subsampled_to_the_bound():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(500, 4)), rng.normal(size=(300, 4))
    res = mmd_test(X, Y, n_permutations=10, max_samples=100)
    assert (res.detail["n_reference"], res.detail["n_current"]) == (100, 100)
    assert classifier_test(X, Y, max_samples=50).detail["n_current"] == 50


def test_most_shifted_inputs_are_the_shifted_ones():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(80, DIM))
    Y = rng.normal(size=(80, DIM))
    Y[:20] += 4.0  # the first 20 current inputs moved far away
    paths = [f"{'moved' if i < 20 else 'same'}/{i}.png" for i in range(80)]
    report = detect(X, Y, current_paths=paths, n_permutations=50, top=10)
    assert report.drift
    assert len(report.shifted) == 10
    assert all(s["path"].startswith("moved/") for s in report.shifted)


def test_model_tests_label_distribution_and_confidence():
    same = label_shift_test(["a"] * 50 + ["b"] * 50, ["a"] * 48 + ["b"] * 52)
    moved = label_shift_test(["a"] * 50 + ["b"] * 50, ["a"] * 90 + ["b"] * 10)
    assert same.p_value > 0.5 and moved.p_value < 1e-6
    assert moved.detail["shares"]["a"] == [0.5, 0.9]
    rng = np.random.default_rng(0)
    conf = confidence_shift_test(rng.uniform(0.8, 1.0, 100), rng.uniform(0.5, 0.8, 100))
    assert conf.statistic < -0.1 and conf.p_value < 1e-6


def test_report_verdict_uses_bonferroni_and_serializes():
    X, Y = _pair(5)
    proba = np.full((N, 2), 0.5)
    proba[:, 0] += 0.1
    proba[:, 1] -= 0.1
    report = detect(X, Y, reference_proba=proba, current_proba=proba, classes=["a", "b"], n_permutations=50)
    assert [t.name for t in report.tests] == ["mmd", "classifier", "predicted_labels", "confidence"]
    assert report.threshold == pytest.approx(0.05 / 4)
    assert not report.drift and report.verdict.startswith("no drift")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["drift"] is False and len(d["tests"]) == 4
    assert "no drift" in report.format()


def test_drift_module_does_not_import_torch():
    code = "import sys, probe.drift, probe.registry; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
