"""Drift detection: two-sample tests on cached embeddings (numpy / scipy / scikit-learn; no torch import).

    reference features, current features --> kernel MMD (permutation p-value)
                                         --> classifier two-sample test (held-out AUC, Mann-Whitney p-value)
    with a model: predicted labels       --> chi-square on the label distribution
                  top-class confidence   --> shift in mean confidence (Mann-Whitney p-value)
                  (reference predictions are cross-fitted: the head refit on the other folds of its training
                  set predicts each fold, so both sides are predictions on unseen inputs)
    --> one verdict (Bonferroni over the tests), the most shifted current inputs

The statistics are written here (about a hundred lines) rather than taken from alibi-detect, whose installation
would add or change 21 packages in probe's environment (transformers, opencv-python, numba, scikit-image, pandas,
and older numpy and Pillow; measured with pip's dry run for alibi-detect 0.13). How each p-value is calibrated:

* **MMD**: squared maximum mean discrepancy (V-statistic) with an RBF kernel ``exp(-d^2 / m)``, ``m`` the median
  squared pairwise distance of the pooled sample (median heuristic). The p-value is a permutation test, ``(1 + #{perm >= observed}) / (1 + P)``:
  exact under the null (the samples are exchangeable), for any P.
* **Classifier**: a logistic regression (standardized features) tells reference from current. It is fit on a
  seeded stratified half of the pooled sample and scores the other half; under the null those held-out scores are
  i.i.d. and independent of the side, so the one-sided Mann-Whitney U test (current > reference) is exact;
  AUC = U / (n_ref * n_cur). (Pooling K-fold out-of-fold scores into one test is anti-conservative: measured
  17 % false positives at alpha 0.05.) K-fold out-of-fold scores rank the "most shifted" current inputs.

Large sets are subsampled (seeded) to ``max_samples`` per side, so a check stays in seconds.

:func:`check_sources` and :func:`check_model` extract the current data through the engine (imported when called).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np


from .defaults import DEFAULT_CACHE

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.05
DEFAULT_PERMUTATIONS = 200
DEFAULT_MAX_SAMPLES = 1000
DEFAULT_FOLDS = 5
TOP_SHIFTED = 10
#: With --model, at most this many training inputs form the reference (and are cross-fitted for the model tests).
REFERENCE_MAX = 10000


@dataclass
class TestResult:
    name: str
    statistic: float
    p_value: float
    detail: dict = field(default_factory=dict)
    __test__ = False  # not a pytest test class

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DriftReport:
    tests: list[TestResult]
    alpha: float
    n_reference: int
    n_current: int
    shifted: list[dict] = field(default_factory=list)  # [{"path", "score"}], most shifted first

    @property
    def threshold(self) -> float:
        """The per-test significance level: alpha split over the tests (Bonferroni)."""
        return self.alpha / max(1, len(self.tests))

    @property
    def drift(self) -> bool:
        return any(t.p_value < self.threshold for t in self.tests)

    @property
    def verdict(self) -> str:
        flagged = [t.name for t in self.tests if t.p_value < self.threshold]
        if flagged:
            return (f"DRIFT: {', '.join(flagged)} below p={self.threshold:.3g} "
                    f"(alpha {self.alpha} over {len(self.tests)} tests)")
        return f"no drift: every p-value >= {self.threshold:.3g} (alpha {self.alpha} over {len(self.tests)} tests)"

    def to_dict(self) -> dict:
        return {"drift": self.drift, "verdict": self.verdict, "alpha": self.alpha, "threshold": self.threshold,
                "n_reference": self.n_reference, "n_current": self.n_current,
                "tests": [t.to_dict() for t in self.tests], "most_shifted": self.shifted}

    def format(self) -> str:
        lines = [f"reference {self.n_reference} inputs, current {self.n_current} inputs"]
        for t in self.tests:
            extra = ", ".join(f"{k} {_fmt(v)}" for k, v in t.detail.items() if not isinstance(v, (list, dict)))
            lines.append(f"  {t.name:18s} statistic {_fmt(t.statistic):>10s}  p-value {t.p_value:.4g}"
                         + (f"  ({extra})" if extra else ""))
        if self.shifted:
            lines.append("most shifted current inputs (classifier out-of-fold score):")
            lines.extend(f"  {s['score']:.3f}  {s['path']}" for s in self.shifted)
        lines.append(self.verdict)
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def subsample(n: int, max_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``max_samples`` of ``n`` rows (all rows when there are few enough)."""
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def _as_2d(X, what: str) -> np.ndarray:
    from .errors import ProbeError

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ProbeError(f"{what}: need at least 2 inputs with features (got shape {X.shape})")
    return X


def mmd_test(X, Y, *, n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
             max_samples: int | None = DEFAULT_MAX_SAMPLES) -> TestResult:
    """Kernel two-sample test: squared MMD (V-statistic, RBF kernel, median-heuristic bandwidth) and its
    permutation p-value."""
    from sklearn.metrics.pairwise import euclidean_distances

    rng = np.random.default_rng(seed)
    X = _as_2d(X, "reference")
    Y = _as_2d(Y, "current")
    X = X[subsample(len(X), max_samples, rng)]
    Y = Y[subsample(len(Y), max_samples, rng)]
    Z = np.concatenate([X, Y])
    m, n = len(X), len(Y)
    d2 = euclidean_distances(Z, Z, squared=True)
    off = d2[np.triu_indices(len(Z), k=1)]
    median = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    K = np.exp(-d2 / median)  # bandwidth sigma^2 = median / 2 of squared distances: exp(-d^2 / (2 sigma^2))
    # MMD^2 (biased V-statistic) = a' K a with a = +1/m on X rows, -1/n on Y rows; permutations reshuffle a.
    a = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(a @ K @ a)
    A = a[rng.permuted(np.tile(np.arange(m + n), (n_permutations, 1)), axis=1)].T
    null = np.einsum("ij,ij->j", A, K @ A)
    p = (1.0 + float(np.sum(null >= observed))) / (1.0 + n_permutations)
    return TestResult("mmd", observed, p, {"bandwidth_sq": median / 2, "permutations": n_permutations,
                                            "n_reference": m, "n_current": n})


def classifier_test(X, Y, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                    max_samples: int | None = DEFAULT_MAX_SAMPLES, C: float = 1.0) -> TestResult:
    """Classifier two-sample test: a logistic regression tells reference from current.

    The statistic and p-value come from one seeded, stratified half/half split: fit on one half, score the
    other, one-sided Mann-Whitney U of current vs reference scores (exact: the held-out scores are i.i.d. and
    independent of the side under the null). AUC = U / (n_ref * n_cur). Stratified K-fold out-of-fold scores of
    every (subsampled) current input rank the most shifted ones (``detail["current_scores"]`` with the input
    rows in ``detail["current_index"]``); their AUC is reported as ``cv_auc`` (not used for the p-value: pooled
    out-of-fold scores are not independent, and a test on them is anti-conservative).
    """
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    X = _as_2d(X, "reference")
    Y = _as_2d(Y, "current")
    if len(X) < 4 or len(Y) < 4:
        from .errors import ProbeError

        raise ProbeError(f"the classifier test needs at least 4 inputs per side (got {len(X)} and {len(Y)})")
    xi = subsample(len(X), max_samples, rng)
    yi = subsample(len(Y), max_samples, rng)
    Z = np.concatenate([X[xi], Y[yi]])
    side = np.concatenate([np.zeros(len(xi), dtype=int), np.ones(len(yi), dtype=int)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300))
    tr, te = train_test_split(np.arange(len(Z)), test_size=0.5, stratify=side, random_state=seed)
    from .heads import blas_threads

    with blas_threads():  # lbfgs on a few hundred rows: extra BLAS threads only contend (see probe/heads.py)
        held = clf.fit(Z[tr], side[tr]).decision_function(Z[te])
    cur, ref = held[side[te] == 1], held[side[te] == 0]
    res = mannwhitneyu(cur, ref, alternative="greater")
    auc = float(res.statistic) / (len(cur) * len(ref))
    detail = {"auc": auc, "n_reference": len(xi), "n_current": len(yi)}
    if folds:  # rank the current inputs (folds=0 skips it: the p-value does not need it)
        k = int(max(2, min(folds, len(xi), len(yi))))
        oof = np.empty(len(Z))
        for a, b in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(Z, side):
            with blas_threads():
                oof[b] = clf.fit(Z[a], side[a]).decision_function(Z[b])
        detail.update({"cv_auc": float(roc_auc_score(side, oof)), "folds": k,
                       "current_scores": (1 / (1 + np.exp(-oof[side == 1]))).tolist(), "current_index": yi.tolist()})
    return TestResult("classifier", auc, float(res.pvalue), detail)


def label_shift_test(pred_reference: Sequence, pred_current: Sequence) -> TestResult:
    """Chi-square test of the predicted-label distribution, reference vs current (a 2 x classes table)."""
    from scipy.stats import chi2_contingency

    labels = sorted(set(map(str, pred_reference)) | set(map(str, pred_current)))
    ref = [str(v) for v in pred_reference]
    cur = [str(v) for v in pred_current]
    table = np.array([[ref.count(c) for c in labels], [cur.count(c) for c in labels]])
    shares = {c: [round(r / max(1, len(ref)), 4), round(u / max(1, len(cur)), 4)]
              for c, r, u in zip(labels, table[0], table[1])}
    if len(labels) < 2:
        return TestResult("predicted_labels", 0.0, 1.0, {"shares": shares})
    chi2, p, dof, _ = chi2_contingency(table)
    return TestResult("predicted_labels", float(chi2), float(p), {"dof": int(dof), "shares": shares})


def confidence_shift_test(conf_reference, conf_current) -> TestResult:
    """Shift in the model's top-class confidence: mean difference (current - reference), two-sided
    Mann-Whitney p-value."""
    from scipy.stats import mannwhitneyu

    a = np.asarray(conf_reference, dtype=np.float64)
    b = np.asarray(conf_current, dtype=np.float64)
    res = mannwhitneyu(b, a, alternative="two-sided")
    return TestResult("confidence", float(b.mean() - a.mean()), float(res.pvalue),
                      {"mean_reference": float(a.mean()), "mean_current": float(b.mean())})


def detect(reference, current, *, current_paths: Sequence[str] | None = None, reference_proba=None,
           current_proba=None, classes=None, alpha: float = DEFAULT_ALPHA,
           n_permutations: int = DEFAULT_PERMUTATIONS, max_samples: int | None = DEFAULT_MAX_SAMPLES,
           seed: int = 0, top: int = TOP_SHIFTED) -> DriftReport:
    """Run the embedding tests (and, given both sides' predicted probabilities, the model tests)."""
    tests = [mmd_test(reference, current, n_permutations=n_permutations, seed=seed, max_samples=max_samples)]
    clf = classifier_test(reference, current, seed=seed, max_samples=max_samples)
    scores = clf.detail.pop("current_scores", [])
    index = clf.detail.pop("current_index", [])
    tests.append(clf)
    if reference_proba is not None and current_proba is not None:
        rp, cp = np.asarray(reference_proba), np.asarray(current_proba)
        names = np.asarray(classes) if classes is not None else np.arange(rp.shape[1])
        tests.append(label_shift_test(names[rp.argmax(axis=1)], names[cp.argmax(axis=1)]))
        tests.append(confidence_shift_test(rp.max(axis=1), cp.max(axis=1)))
    shifted = []
    if current_paths is not None:
        order = np.argsort(-np.asarray(scores), kind="stable")[:top]
        shifted = [{"path": str(current_paths[index[i]]), "score": float(scores[i])} for i in order]
    return DriftReport(tests, alpha, len(reference), len(current), shifted)


# -- on data sources (extracts the current data through the engine) ------------------------------------------


def check_sources(reference, current, *, backbone: str, cache=DEFAULT_CACHE, alpha: float = DEFAULT_ALPHA,
                  seed: int = 0, n_permutations: int = DEFAULT_PERMUTATIONS,
                  max_samples: int | None = DEFAULT_MAX_SAMPLES, **extract_options) -> DriftReport:
    """Drift between two data sources (folders / CSVs / file lists), on ``backbone`` features (cached or
    extracted into ``cache``)."""
    from .engine import Extractor
    from .sources import resolve

    ex = Extractor(backbone, cache, **extract_options)
    ref = ex.extract(resolve(reference))
    cur = ex.extract(resolve(current))
    return detect(ref.features, cur.features, current_paths=cur.paths, alpha=alpha, seed=seed,
                  n_permutations=n_permutations, max_samples=max_samples)


def check_model(model, current, *, cache=DEFAULT_CACHE, alpha: float = DEFAULT_ALPHA, seed: int = 0,
                n_permutations: int = DEFAULT_PERMUTATIONS, max_samples: int | None = DEFAULT_MAX_SAMPLES,
                current_features=None, **extract_options) -> DriftReport:
    """Drift of ``current`` data from ``model``'s own training inputs (their features are read from the cache,
    never re-extracted), with the predicted-label and confidence tests added. ``current_features`` (a
    FeatureSet) skips extracting ``current``."""
    from .sources import resolve

    if model.train_set_ is not None:
        label_of: dict = {}
        for k, lab in zip(*model.train_set_):
            label_of.setdefault(k, lab)
        keys = _bounded(list(label_of), seed)
        ref = training_features(model, cache, keys)
        ref_proba = cross_fitted_proba(model, ref, [label_of[k] for k in keys], seed)
    else:
        ref = training_features(model, cache, _bounded(list(model.train_keys_ or []), seed))
        ref_proba = None
        log.warning("the model records no training labels: the predicted-label and confidence tests are skipped "
                    "(on its own training inputs a head is over-confident, which would read as drift)")
    if current_features is None:
        current_features = model.features(resolve(current), cache=cache, write=True, strict=False,
                                          **extract_options)
    cur = current_features
    return detect(ref, cur.features, current_paths=cur.paths, reference_proba=ref_proba,
                  current_proba=None if ref_proba is None else model.predict_proba_features(cur.features),
                  classes=model.classes_, alpha=alpha, seed=seed, n_permutations=n_permutations,
                  max_samples=max_samples)


def _bounded(keys: list[str], seed: int) -> list[str]:
    """At most :data:`REFERENCE_MAX` of a model's training keys (a seeded subset, in their order)."""
    if len(keys) <= REFERENCE_MAX:
        return keys
    idx = subsample(len(keys), REFERENCE_MAX, np.random.default_rng(seed))
    log.info("reference: %d of the model's %d training inputs (seeded subset)", REFERENCE_MAX, len(keys))
    return [keys[i] for i in idx]


def cross_fitted_proba(model, X: np.ndarray, y, seed: int = 0, folds: int = DEFAULT_FOLDS) -> np.ndarray | None:
    """Out-of-fold class probabilities of the model's training inputs: the head (same settings) refit on the
    other folds predicts each fold, so the reference predictions are made on unseen inputs, like the current
    ones. (In-sample predictions are over-confident and would make every new data set look drifted.)
    None when some class has fewer than 2 training inputs."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray([str(v) for v in y], dtype=object)
    classes = [str(c) for c in model.classes_]
    counts = [int((y == c).sum()) for c in classes]
    k = min(folds, min(counts))
    if k < 2:
        log.warning("a class has fewer than 2 training inputs: predicted-label and confidence tests skipped")
        return None
    from .heads import blas_threads

    proba = np.zeros((len(y), len(classes)))
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y):
        with blas_threads():
            head = clone(model.head_).fit(X[tr], y[tr])
        cols = [classes.index(str(c)) for c in head.classes_]
        proba[np.ix_(te, cols)] = head.predict_proba(X[te])
    return proba


def training_features(model, cache=DEFAULT_CACHE, keys: Sequence[str] | None = None) -> np.ndarray:
    """Features of ``model``'s training inputs (or of ``keys``) from the feature cache, without a backbone."""
    from .cache import FeatureCache
    from .errors import ProbeError

    keys = list(keys if keys is not None else (model.train_keys_ or []))
    if not keys:
        raise ProbeError("the model records no training inputs (train-keys.txt); give REFERENCE data instead")
    digest = model.backbone_.get("space_digest")
    fc = FeatureCache(cache)
    try:
        store = fc.open_path(fc.find(digest[:16]))
    except ProbeError as e:
        raise ProbeError(f"{cache}: the model's feature space {digest[:16]} is not in this cache ({e}); "
                         "pass the cache the model was trained with (--cache)") from e
    try:
        missing = store.missing(keys)
        if missing:
            raise ProbeError(f"{cache}: {len(missing)} of {len(set(keys))} training inputs of the model are not in "
                             f"the cache (space {digest[:16]}); extract the training data into it first")
        return store.get(keys)
    finally:
        store.close()
