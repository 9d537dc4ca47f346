"""Heads and the regularization sweep, on synthetic features (no backbone, no torch)."""

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from probe.errors import ProbeError
import skops.io as skops_io

from probe.heads import C_GRID, HEADS, SKOPS_TRUSTED_TYPES, HeadError, head_description, make_head
from probe.sweep import fit_head, sweep, train_val_split

LABELS = np.array(["ant", "bee", "cat", "dog"])


def blobs(n, dim=16, sep=4.0, seed=0, centers_seed=123):
    """Four well-separated Gaussian blobs with string labels (chance accuracy 0.25)."""
    centers = np.random.default_rng(centers_seed).normal(size=(4, dim)) * sep / math.sqrt(2)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    rng.shuffle(y)
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), LABELS[y]


def few_noisy(n, seed, dim=100, sep=2.5):
    """Few samples, signal in 4 of ``dim`` dimensions: strong regularization generalizes best."""
    rng = np.random.default_rng(seed)
    means = np.zeros((4, dim))
    means[:, :4] = np.eye(4) * sep
    y = np.arange(n) % 4
    return means[y] + rng.normal(size=(n, dim)), LABELS[y]


def many_correlated(n, seed, rho=0.98):
    """Many samples with strongly correlated noise: the best boundary is far from the nearest-centroid one that
    strong regularization tends to, so weak regularization wins."""
    rng = np.random.default_rng(seed)
    means = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    y = np.arange(n) % 4
    return means[y] + rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n), LABELS[y]


@pytest.fixture(scope="module")
def data():
    X, y = blobs(240, seed=0)
    X_test, y_test = blobs(400, seed=1)
    return X, y, X_test, y_test


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_trains_and_beats_chance(name, data):
    X, y, X_test, y_test = data
    fit = fit_head(name, X, y, standardize=True)
    est = fit.estimator
    assert isinstance(est, Pipeline)
    assert list(est.classes_) == list(LABELS)  # string labels kept
    assert est.score(X_test, y_test) > 0.8  # chance is 0.25
    proba = est.predict_proba(X_test)
    assert proba.shape == (len(X_test), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert fit.sweep is not None and fit.sweep.param == f"clf__{HEADS[name].param}"
    assert fit.chosen == {fit.sweep.param: fit.sweep.best_value}
    assert est.get_params()[fit.sweep.param if not fit.calibrated else "clf__estimator__" + HEADS[name].param] \
        == fit.sweep.best_value
    assert fit.sweep.n_fits == len(fit.sweep.evaluated) >= len(fit.sweep.coarse_grid)
    json.dumps(fit.to_dict())  # everything recorded is JSON-able


@pytest.mark.parametrize("name", ["linear-svm", "ridge"])
def test_heads_without_predict_proba_are_calibrated_for_the_final_fit_only(name, data):
    X, y, _, _ = data
    fit = fit_head(name, X, y)
    assert fit.calibrated
    clf = fit.estimator.named_steps["clf"]
    assert isinstance(clf, CalibratedClassifierCV) and clf.method == "sigmoid" and clf.ensemble is False
    assert not hasattr(make_head(name).named_steps["clf"], "predict_proba")  # what the sweep scored


def test_logreg_is_not_calibrated_and_final_fit_is_not_warm_started(data):
    X, y, _, _ = data
    fit = fit_head("logreg", X, y)
    assert not fit.calibrated
    assert fit.estimator.named_steps["clf"].warm_start is False


def test_sweep_follows_the_data_strong_vs_weak_regularization():
    X, y = few_noisy(40, seed=0)
    X_val, y_val = few_noisy(400, seed=100)
    noisy = fit_head("logreg", X, y, X_val=X_val, y_val=y_val)
    X, y = many_correlated(1000, seed=0)
    X_val, y_val = many_correlated(400, seed=100)
    clean = fit_head("logreg", X, y, X_val=X_val, y_val=y_val)
    c_noisy, c_clean = noisy.chosen["clf__C"], clean.chosen["clf__C"]
    assert c_noisy <= 1e-2, noisy.sweep.curve
    assert c_clean >= 1e-1, clean.sweep.curve
    assert c_clean >= 10 * c_noisy


def test_sweep_refines_between_coarse_grid_values(data):
    X, y, X_val, y_val = data
    result = sweep("logreg", X, y, X_val, y_val, refine_steps=3)
    coarse = sorted(C_GRID)
    assert [v for v, _ in result.evaluated[:len(coarse)]] == coarse  # coarse grid first, weakest C last
    refined = result.refined
    assert refined, "refinement evaluated nothing"
    assert len(refined) <= 2 * 3
    for v in refined:
        assert v not in coarse and coarse[0] < v < coarse[-1]
        below = max(c for c in coarse if c < v)
        assert below < v < below * 100  # between two neighbouring coarse values
    assert result.curve == sorted(result.evaluated)
    assert result.best_score == max(s for _, s in result.evaluated)
    assert (result.best_value, result.best_score) in result.evaluated
    assert result.n_fits == len(result.evaluated) and result.seconds >= 0


def test_ties_are_settled_by_log_loss_by_default_or_by_strength(data):
    X, y, X_val, y_val = data  # easy blobs: every C in this range scores the same
    result = sweep("logreg", X, y, X_val, y_val, grid=[1.0, 100.0, 1e4], refine_steps=0, tie_break="stronger")
    assert len({s for _, s in result.evaluated}) == 1
    assert result.best_value == 1.0
    result = sweep("ridge", X, y, X_val, y_val, grid=[1e-3, 1e-1, 1.0], refine_steps=0, tie_break="stronger")
    assert len({s for _, s in result.evaluated}) == 1
    assert result.best_value == 1.0  # ridge: larger alpha is stronger
    lossy = sweep("logreg", X, y, X_val, y_val, grid=[1.0, 100.0, 1e4], refine_steps=0, tie_break="log_loss")
    assert lossy.best_value > 1.0 and len(lossy.log_losses) == 3
    default = sweep("logreg", X, y, X_val, y_val, grid=[1.0, 100.0, 1e4], refine_steps=0)
    assert default.tie_break == "log_loss" and default.best_value == lossy.best_value


def test_refit_uses_train_and_validation(data):
    X, y, _, _ = data
    fit = fit_head("logreg", X, y, standardize=True, val_split=0.25)
    assert fit.refit_on_train_val
    assert fit.n_train + fit.n_val == len(X)
    assert fit.n_val == math.ceil(0.25 * len(X))
    assert fit.estimator.named_steps["scale"].n_samples_seen_ == len(X)  # the final fit saw every sample
    knn = fit_head("knn", X, y)
    assert knn.estimator.named_steps["clf"].n_samples_fit_ == len(X)


def test_refit_learns_a_class_seen_only_in_the_validation_set(data):
    X, y, X_val, y_val = data
    train = y != "dog"
    fit = fit_head("logreg", X[train], y[train], X_val=X_val, y_val=y_val, standardize=True, value=1.0)
    assert fit.n_train == train.sum() and fit.n_val == len(X_val)
    assert "dog" in fit.estimator.classes_
    assert fit.estimator.named_steps["scale"].n_samples_seen_ == train.sum() + len(X_val)
    assert (fit.estimator.predict(X_val[y_val == "dog"]) == "dog").mean() > 0.8


def test_fixed_value_skips_the_sweep(data):
    X, y, _, _ = data
    fit = fit_head("logreg", X, y, value=0.5)
    assert fit.sweep is None
    assert fit.chosen == {"clf__C": 0.5}
    assert fit.estimator.named_steps["clf"].C == 0.5
    assert (fit.n_train, fit.n_val) == (len(X), 0)
    same = fit_head("logreg", X, y, params={"C": 0.5})
    assert same.sweep is None and same.chosen == {"clf__C": 0.5}
    with pytest.raises(HeadError, match="given twice"):
        fit_head("logreg", X, y, value=0.5, params={"C": 2.0})


def test_import_path_head_with_params(data):
    X, y, X_test, y_test = data
    fit = fit_head("sklearn.ensemble.RandomForestClassifier", X, y, params={"n_estimators": 20, "max_depth": 6},
                   seed=3)
    clf = fit.estimator.named_steps["clf"]
    assert (clf.n_estimators, clf.max_depth, clf.random_state) == (20, 6, 3)
    assert fit.sweep is None and fit.chosen == {}
    assert fit.estimator.score(X_test, y_test) > 0.8
    desc = head_description(fit.estimator)
    json.dumps(desc)
    assert desc["steps"][-1]["type"] == "sklearn.ensemble.RandomForestClassifier"
    assert desc["steps"][-1]["params"]["n_estimators"] == 20
    assert desc["classes"] == list(LABELS) and desc["n_features_in"] == X.shape[1]


def test_import_path_head_sweeps_only_when_given_a_grid(data):
    X, y, _, _ = data
    fit = fit_head("sklearn.tree.DecisionTreeClassifier", X, y, grid={"clf__max_depth": [1, 2, 8]})
    assert fit.sweep.param == "clf__max_depth"
    assert fit.chosen["clf__max_depth"] in (2, 8)  # depth 1 separates at most two of four classes
    assert fit.sweep.refined == []


@pytest.mark.parametrize("name, message", [
    ("sklearn.ensemble.RandomForestClassifer", "did you mean RandomForestClassifier"),
    ("sklearn.no_such_module.Thing", "cannot import module 'sklearn.no_such_module'"),
    ("sklearn.preprocessing.StandardScaler", "not a scikit-learn classifier"),
    ("sklearn.linear_model.LinearRegression", "not a scikit-learn classifier"),
    ("lgreg", "did you mean logreg"),
])
def test_bad_head_names_are_clear_errors(name, message):
    with pytest.raises(HeadError, match=message) as info:
        make_head(name)
    assert isinstance(info.value, ProbeError) and isinstance(info.value, ValueError)
    assert name in str(info.value)


def test_bad_params_name_the_parameter():
    with pytest.raises(HeadError, match="'max_iters'.*did you mean max_iter"):
        make_head("logreg", {"max_iters": 10})


def test_bad_arguments(data):
    X, y, _, _ = data
    with pytest.raises(HeadError, match="val_split.*1.5"):
        fit_head("logreg", X, y, val_split=1.5)
    with pytest.raises(HeadError, match="at least two classes"):
        fit_head("logreg", X, np.full(len(X), "ant"))
    with pytest.raises(HeadError, match="no swept parameter"):
        fit_head("sklearn.ensemble.RandomForestClassifier", X, y, value=3)
    with pytest.raises(HeadError, match="tie_break"):
        fit_head("logreg", X, y, tie_break="coin")


def test_split_is_stratified_and_seeded():
    y = np.repeat(LABELS, [40, 40, 40, 80])
    train, val = train_val_split(y, 0.25, seed=7)
    assert len(set(train) | set(val)) == len(y) and not set(train) & set(val)
    counts = dict(zip(*np.unique(y[val], return_counts=True)))
    assert counts == {"ant": 10, "bee": 10, "cat": 10, "dog": 20}
    again, _ = train_val_split(y, 0.25, seed=7)
    np.testing.assert_array_equal(train, again)


def test_split_falls_back_when_a_class_is_too_rare(data, caplog):
    X, y, _, _ = data
    y = y.copy()
    y[0] = "eel"  # a single sample: cannot be stratified
    with caplog.at_level(logging.WARNING, logger="probe.sweep"):
        fit = fit_head("logreg", X, y)
    assert "random split" in caplog.text and "eel" in caplog.text
    assert "eel" in fit.estimator.classes_  # the refit on everything still learns it


def test_fitted_heads_persist_with_skops_given_the_trusted_types(data):
    X, y, X_test, _ = data
    for name in sorted(HEADS):
        est = fit_head(name, X, y, l2_normalize=True).estimator
        blob = skops_io.dumps(est)
        assert set(skops_io.get_untrusted_types(data=blob)) <= set(SKOPS_TRUSTED_TYPES), name
        loaded = skops_io.loads(blob, trusted=list(SKOPS_TRUSTED_TYPES))
        np.testing.assert_array_equal(loaded.predict(X_test), est.predict(X_test))


def test_heads_and_metrics_do_not_import_torch():
    code = ("import sys, probe.heads, probe.sweep, probe.metrics; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


class ThreadRecordingClassifier(LogisticRegression):
    """Records the BLAS thread counts in force while it is fitted."""

    seen: list = []

    def fit(self, X, y, sample_weight=None):
        from threadpoolctl import threadpool_info

        ThreadRecordingClassifier.seen.append(
            {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return super().fit(X, y, sample_weight)


def test_heads_fit_with_one_blas_thread(data):
    X, y, _, _ = data
    ThreadRecordingClassifier.seen = []
    fit_head("test_heads.ThreadRecordingClassifier", X, y, grid={"clf__C": [0.1, 1.0]})
    assert len(ThreadRecordingClassifier.seen) == 3  # two sweep fits and the final refit
    assert all(s <= {1} for s in ThreadRecordingClassifier.seen)
