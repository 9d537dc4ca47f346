"""scikit-learn heads on cached features, and the regularization sweep. No torch import.

A *head* is a scikit-learn :class:`~sklearn.pipeline.Pipeline`: optional ``("l2", Normalizer())``, optional
``("scale", StandardScaler())``, then ``("clf", classifier)``. Heads come from the :data:`HEADS` registry by name
(``logreg``, ``linear-svm``, ``ridge``, ``knn``, ``sgd``, ``mlp``) or from an import path to any scikit-learn
classifier (``"sklearn.ensemble.RandomForestClassifier"``) with a dict of constructor parameters.

``knn`` votes with ``weights="distance"`` (smoother probabilities than uniform votes of few neighbours) and
``algorithm="brute"`` (trees do not help on high-dimensional embeddings, and nothing but the training matrix
is stored); give ``l2_normalize=True`` for cosine neighbours.

Heads whose classifier has no ``predict_proba`` (``linear-svm``, ``ridge``, some import-path classifiers) are
swept plain, but their final refit is wrapped in ``CalibratedClassifierCV(method="sigmoid", cv=3,
ensemble=False)``: the classifier itself is fitted on all of train + validation and Platt scaling is learned
on its out-of-fold decision values, so the served model always has ``predict_proba``.


The regularization sweep that chooses a head's parameter lives in :mod:`probe.sweep`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import re
from dataclasses import dataclass, field

from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted

from .errors import ProbeError
from .jsonable import jsonable

log = logging.getLogger(__name__)

C_GRID = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)  # CLIP's coarse grid
RIDGE_ALPHA_GRID = tuple(1.0 / c for c in reversed(C_GRID))  # alpha ~ 1/C: the same range
SGD_ALPHA_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # alpha multiplies a per-sample (mean) loss
MLP_ALPHA_GRID = (1e-4, 1e-2, 1.0)  # coarse only: every point is a full network fit
KNN_GRID = (1, 3, 5, 10, 20, 50)

# scikit-learn internals that fitted built-in heads contain and skops does not trust by default; all are plain
# data holders from scikit-learn itself. Pass them as ``trusted=`` to ``skops.io.load`` for built-in heads.
SKOPS_TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
)


#: BLAS threads while fitting heads. The solvers' matrix products are small (n x dim @ dim x classes), and threads
#: cost more than they give: one lbfgs logreg fit on 3000x1280 EfficientNet-Lite0 features took 2.9-3.9 s with
#: OpenBLAS's 2 threads and 1.5 s with 1 on a 2-core machine (12000x1280: 8.3 s vs 3.4 s), 1.86 s vs 0.22 s on a
#: 16-core one. ``None`` leaves the BLAS setting alone.
BLAS_THREADS: int | None = 1


def blas_threads():
    """Context manager limiting BLAS threads to :data:`BLAS_THREADS` (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=BLAS_THREADS, user_api="blas")


class HeadError(ProbeError, ValueError):
    """An unknown head name, a bad import path or bad head parameters (the message names the bad value)."""


@dataclass(frozen=True)
class HeadSpec:
    """How to build one kind of head and which constructor parameter its sweep varies."""

    estimator: type
    defaults: dict = field(default_factory=dict)
    param: str | None = None  # the swept constructor parameter ("C", "alpha", "n_neighbors"), None: no sweep
    grid: tuple = ()  # the coarse grid
    stronger: str | None = None  # which end of ``param`` regularizes more: "smaller" (C) or "larger" (alpha)
    refine_steps: int = 0  # default number of refinement steps after the coarse grid
    warm_start: bool = False  # the solver can start from the previous solution while sweeping
    summary: str = ""
    sweep_params: dict = field(default_factory=dict)  # solver settings for sweep fits only (not the final refit)


HEADS: dict[str, HeadSpec] = {
    "logreg": HeadSpec(
        LogisticRegression, {"max_iter": 1000}, "C", C_GRID, "smaller", 3, True,
        "multinomial logistic regression (lbfgs), the CLIP linear probe",
        # Ranking C values needs no tight optimum: tol 1e-3 made a 13-point sweep on 2700x1280 EfficientNet
        # features ~5x cheaper and chose the same C; the final refit keeps sklearn's tol=1e-4.
        {"tol": 1e-3}),
    "linear-svm": HeadSpec(
        LinearSVC, {"dual": "auto"}, "C", C_GRID, "smaller", 3, False,
        "linear SVM (liblinear); final fit is sigmoid-calibrated for predict_proba"),
    "ridge": HeadSpec(
        RidgeClassifier, {}, "alpha", RIDGE_ALPHA_GRID, "larger", 3, False,
        "ridge classifier (closed form); final fit is sigmoid-calibrated for predict_proba"),
    "knn": HeadSpec(
        KNeighborsClassifier, {"weights": "distance", "algorithm": "brute"}, "n_neighbors", KNN_GRID, "larger", 1,
        False, "k nearest neighbours, distance-weighted votes (use l2_normalize for cosine)"),
    "sgd": HeadSpec(
        SGDClassifier, {"loss": "log_loss"}, "alpha", SGD_ALPHA_GRID, "larger", 2, True,
        "logistic regression by SGD, for many samples"),
    "mlp": HeadSpec(
        MLPClassifier, {"hidden_layer_sizes": (256,), "early_stopping": True, "max_iter": 200}, "alpha",
        MLP_ALPHA_GRID, "larger", 0, False, "one-hidden-layer MLP (256 units, early stopping)"),
}


def head_names() -> list[str]:
    return sorted(HEADS)


def head_spec(name: str) -> HeadSpec:
    """The spec of a registered head, or of a classifier given by import path (which has no sweep)."""
    if not isinstance(name, str):
        raise HeadError(f"a head name must be a string, got {type(name).__name__}")
    if name in HEADS:
        return HEADS[name]
    if "." not in name:
        close = difflib.get_close_matches(name, head_names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known heads: {', '.join(head_names())}"
        raise HeadError(f"unknown head {name!r}; {hint} (or give an import path such as "
                        "'sklearn.ensemble.RandomForestClassifier')")
    return HeadSpec(_import_classifier(name), summary=f"{name} (no sweep)")


_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.[A-Z][A-Za-z0-9_]*$")


def _import_classifier(path: str) -> type:
    # Checked before importing anything: importing a module runs its code, so only a well-formed
    # ``package.module.ClassName`` whose module exists is imported.
    if not _CLASS_PATH.match(path):
        raise HeadError(f"head {path!r} is not an import path of a classifier class (package.module.ClassName)")
    module_name, _, attr = path.rpartition(".")
    try:
        if importlib.util.find_spec(module_name) is None:
            raise ImportError(f"no module named {module_name!r}")
    except (ImportError, ValueError) as exc:
        raise HeadError(f"head {path!r}: cannot import module {module_name!r} ({exc})") from None
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError) as exc:  # ValueError: an empty module name (".Foo")
        raise HeadError(f"head {path!r}: cannot import module {module_name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise HeadError(f"head {path!r}: module {module_name!r} has no {attr!r}{hint}")
    if not (isinstance(cls, type) and issubclass(cls, ClassifierMixin) and issubclass(cls, BaseEstimator)):
        raise HeadError(f"head {path!r} is not a scikit-learn classifier (a BaseEstimator and ClassifierMixin)")
    return cls


def make_head(name: str, params: dict | None = None, standardize: bool = False, l2_normalize: bool = False,
              seed: int = 0) -> Pipeline:
    """An unfitted head pipeline: optional ``l2`` and ``scale`` steps, then ``clf``.

    ``params`` are constructor parameters of the classifier on top of the registry defaults; ``random_state``
    is set to ``seed`` where the classifier has one. The swept parameter is addressed as ``clf__C`` etc.
    """
    spec = head_spec(name)
    kwargs = dict(spec.defaults)
    kwargs.update(_check_params(spec.estimator, params or {}, name))
    if "random_state" in _param_names(spec.estimator) and "random_state" not in (params or {}):
        kwargs["random_state"] = seed
    steps = []
    if l2_normalize:
        steps.append(("l2", Normalizer()))
    if standardize:
        steps.append(("scale", StandardScaler()))
    clf = spec.estimator(**kwargs)
    validate = getattr(clf, "_validate_params", None)  # scikit-learn's own parameter constraints, checked now
    if validate is not None:
        try:
            validate()
        except (ValueError, TypeError) as e:
            raise HeadError(f"head {name!r}: {' '.join(str(e).split())}") from None
    steps.append(("clf", clf))
    return Pipeline(steps)


def _param_names(cls: type) -> list[str]:
    return list(cls._get_param_names())  # the sklearn BaseEstimator contract: constructor parameter names


def _check_params(cls: type, params: dict, name: str) -> dict:
    if not isinstance(params, dict):
        raise HeadError(f"head {name!r}: params must be a dict, got {type(params).__name__}")
    known = _param_names(cls)
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(known)}"
            raise HeadError(f"head {name!r}: {cls.__name__} has no parameter {key!r}{hint}")
    return {k: tuple(v) if isinstance(v, list) and k == "hidden_layer_sizes" else v for k, v in params.items()}


def head_description(pipeline) -> dict:
    """A JSON-able description of a head: public type name and constructor parameters of every step, plus
    ``classes`` and ``n_features_in`` once fitted."""
    d = _describe(pipeline)
    try:
        check_is_fitted(pipeline)
    except NotFittedError:
        return d
    if hasattr(pipeline, "classes_"):
        d["classes"] = _jsonable(list(pipeline.classes_))
    if hasattr(pipeline, "n_features_in_"):
        d["n_features_in"] = int(pipeline.n_features_in_)
    return d


def _describe(est) -> dict:
    if isinstance(est, Pipeline):
        return {"type": _public_name(type(est)), "steps": [{"name": n, **_describe(s)} for n, s in est.steps]}
    return {"type": _public_name(type(est)),
            "params": {k: _jsonable(v) for k, v in sorted(est.get_params(deep=False).items())}}


def _public_name(cls: type) -> str:
    """``sklearn.linear_model.LogisticRegression`` rather than ``sklearn.linear_model._logistic...``."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module_name = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(module_name), cls.__qualname__, None) is cls:
                return f"{module_name}.{cls.__qualname__}"
        except ImportError:
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(v):
    return jsonable(v, lambda o: _describe(o) if isinstance(o, BaseEstimator) else None)
