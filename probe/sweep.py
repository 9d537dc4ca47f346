"""The regularization sweep: choose a head's parameter on a validation split, then refit on train + validation.

The sweep follows the CLIP / DINOv2 linear-probe protocol: fit on a training split, score on a validation split
over a coarse log-spaced grid of the regularization parameter (C from 1e-6 to 1e6 in factors of 100), then
refine with log-midpoints between the best value and its neighbours (CLIP's binary search), and finally refit on
train + validation with the chosen value. Ties in validation accuracy are settled by validation log loss, then
by the stronger regularization (smaller C, larger alpha, more neighbours). On easy data accuracy saturates over a
wide range, and "stronger wins" alone would pick the most regularized of many perfect models, whose probabilities
are nearly uniform (measured: 4 separable classes -> C=1e-6, mean top probability 0.25; with the log-loss
tie-break C~178, ECE 0.03 instead of 0.55 on a 7-class test). ``tie_break="stronger"`` restores the plain rule.

No torch import: training a head on cached features never pays for torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import get_scorer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from .heads import HEADS, HeadError, HeadSpec, _jsonable, blas_threads, head_description, head_spec, make_head
from .jsonable import plain

log = logging.getLogger(__name__)

TIE_BREAKS = ("stronger", "log_loss")


@dataclass
class SweepResult:
    """Every value the sweep tried, with its validation score, and the winner."""

    param: str  # pipeline address, e.g. "clf__C"
    evaluated: list[tuple[Any, float]]  # (value, score) in evaluation order: the coarse grid, then refinements
    best_value: Any
    best_score: float
    n_fits: int
    seconds: float
    scoring: str = "accuracy"
    coarse_grid: tuple = ()
    stronger: str | None = None  # tie-break direction: "smaller" or "larger" values regularize more
    not_converged: tuple = ()  # values whose fit raised a ConvergenceWarning
    tie_break: str = "log_loss"
    log_losses: list[float] = field(default_factory=list)  # per evaluation, with tie_break="log_loss" only
    # Validation probabilities of the best value's train-only fit (columns: ``val_classes``), when the
    # classifier has predict_proba: the held-out report comes from them without another fit.
    val_proba: np.ndarray | None = field(default=None, repr=False)
    val_classes: np.ndarray | None = field(default=None, repr=False)

    @property
    def curve(self) -> list[tuple[Any, float]]:
        """(value, score) sorted by value."""
        return sorted(self.evaluated, key=lambda vs: vs[0])

    @property
    def refined(self) -> list[Any]:
        """Values evaluated by refinement, i.e. not on the coarse grid."""
        return [v for v, _ in self.evaluated if v not in self.coarse_grid]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("val_proba", "val_classes")}
        d["evaluated"] = [[_jsonable(v), float(s)] for v, s in self.evaluated]
        d["curve"] = [[_jsonable(v), float(s)] for v, s in self.curve]
        for key in ("coarse_grid", "not_converged"):
            d[key] = [_jsonable(v) for v in d[key]]
        d["best_value"] = _jsonable(self.best_value)
        return d


@dataclass
class HeadFit:
    """A head refitted on train + validation with the chosen regularization, and how it was chosen."""

    estimator: Pipeline  # fitted; ``classes_``, ``predict``, ``predict_proba`` always available
    sweep: SweepResult | None  # None when ``value`` was given or the head has no swept parameter
    chosen: dict  # e.g. {"clf__C": 0.01}; {} when nothing was swept or fixed
    n_train: int
    n_val: int
    fit_seconds: float  # sweep + final refit
    refit_on_train_val: bool = True
    name: str = ""
    calibrated: bool = False  # the final classifier is wrapped in CalibratedClassifierCV

    @property
    def classes_(self) -> np.ndarray:
        return self.estimator.classes_

    def to_dict(self) -> dict:
        """A JSON-able record of the fit (everything but the estimator itself, which is described)."""
        return {
            "name": self.name,
            "chosen": {k: _jsonable(v) for k, v in self.chosen.items()},
            "n_train": self.n_train,
            "n_val": self.n_val,
            "fit_seconds": self.fit_seconds,
            "refit_on_train_val": self.refit_on_train_val,
            "calibrated": self.calibrated,
            "sweep": self.sweep.to_dict() if self.sweep else None,
            "head": head_description(self.estimator),
        }


def sweep(pipeline_or_name: Pipeline | str, X_train, y_train, X_val, y_val, *, grid=None,
          refine_steps: int | None = None, scoring: str = "accuracy", tie_break: str = "log_loss") -> SweepResult:
    """Choose the regularization of a head by its score on (X_val, y_val).

    ``grid`` is None (the head's coarse grid), a sequence of values for the head's swept parameter, or a
    one-item dict ``{"clf__param": values}`` to sweep any parameter (needed for import-path heads; without a
    known direction, ties go to the value listed first). ``refine_steps`` defaults to the head's own.

    ``tie_break="stronger"`` settles equal scores by the stronger regularization alone; ``"log_loss"`` first
    prefers the lower validation log loss (heads with ``predict_proba``), which avoids picking a needlessly
    under-confident model when accuracy saturates on a small validation split.
    """
    if isinstance(pipeline_or_name, str):
        spec, pipe = head_spec(pipeline_or_name), make_head(pipeline_or_name)
    elif isinstance(pipeline_or_name, Pipeline):
        pipe = pipeline_or_name
        spec = _registered_spec(pipe.steps[-1][1])
    else:
        raise HeadError(f"sweep needs a head name or a Pipeline, got {type(pipeline_or_name).__name__}")
    plan = _plan(spec, grid, refine_steps, n_train=len(X_train))
    if plan is None:
        raise HeadError("this head has no swept parameter; pass grid={'clf__<param>': [values]}")
    with blas_threads():
        return _run_sweep(pipe, plan, X_train, y_train, X_val, y_val, scoring, tie_break)


def _registered_spec(clf) -> HeadSpec | None:
    for spec in HEADS.values():
        if type(clf) is spec.estimator:
            return spec
    return None


@dataclass(frozen=True)
class _Plan:
    param: str  # constructor name, without "clf__"
    grid: tuple  # coarse grid in evaluation order (strongest regularization first when known)
    stronger: str | None
    refine_steps: int
    warm_start: bool
    sweep_params: dict = field(default_factory=dict)


def _plan(spec: HeadSpec | None, grid, refine_steps: int | None, n_train: int) -> _Plan | None:
    param = spec.param if spec else None
    if isinstance(grid, dict):
        if len(grid) != 1:
            raise HeadError(f"grid must name exactly one parameter, got {sorted(grid)}")
        (key, values), = grid.items()
        param_name = key.removeprefix("clf__")
        if param_name != param:
            spec = None  # a parameter the registry knows nothing about: no direction, no warm start
        param, grid = param_name, values
    if param is None:
        return None
    values = tuple(spec.grid if grid is None else grid)
    if not values:
        raise HeadError(f"empty grid for {param!r}")
    if param == "n_neighbors":  # k cannot exceed the number of training samples
        values = tuple(min(int(v), n_train) for v in values)
    values = tuple(dict.fromkeys(plain(v) for v in values))  # de-duplicate, keep order
    stronger = spec.stronger if spec else None
    if stronger:
        values = tuple(sorted(values, reverse=stronger == "larger"))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    steps = (spec.refine_steps if spec else 0) if refine_steps is None else int(refine_steps)
    return _Plan(param, values, stronger, steps if numeric else 0, bool(spec and spec.warm_start),
                 dict(spec.sweep_params) if spec else {})


def _run_sweep(pipe: Pipeline, plan: _Plan, X_train, y_train, X_val, y_val, scoring: str,
               tie_break: str = "log_loss") -> SweepResult:
    t0 = time.perf_counter()
    if tie_break not in TIE_BREAKS:
        raise HeadError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    scorer = get_scorer(scoring)
    if len(pipe.steps) > 1:  # the transforms do not depend on the swept value: apply them once
        pre = clone(pipe[:-1])
        X_train, X_val = pre.fit_transform(X_train, y_train), pre.transform(X_val)
    clf = clone(pipe.steps[-1][1])
    if tie_break == "log_loss" and not hasattr(clf, "predict_proba"):
        tie_break = "stronger"
    if plan.warm_start:
        clf.set_params(warm_start=True)  # the sweep only; the final refit starts cold
    if plan.sweep_params:
        clf.set_params(**plan.sweep_params)
    integer = all(isinstance(v, int) for v in plan.grid)
    evaluated: list[tuple[Any, float]] = []
    not_converged = []
    log_losses: list[float] = []

    snapshots: dict[Any, tuple[np.ndarray, np.ndarray]] = {}  # value -> solution, for warm starts
    probas: dict[Any, np.ndarray] = {}  # value -> validation probabilities

    def evaluate(value):
        clf.set_params(**{plan.param: value})
        if snapshots:  # start from the solution of the nearest value evaluated so far (log scale)
            nearest = min(snapshots, key=lambda v: abs(math.log(v) - math.log(value)))
            clf.coef_, clf.intercept_ = (a.copy() for a in snapshots[nearest])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(X_train, y_train)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                not_converged.append(value)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if plan.warm_start and hasattr(clf, "coef_"):
            snapshots[value] = (clf.coef_.copy(), np.atleast_1d(clf.intercept_).copy())
        score = float(scorer(clf, X_val, y_val))
        evaluated.append((value, score))
        if hasattr(clf, "predict_proba"):
            probas[value] = clf.predict_proba(X_val)
        if tie_break == "log_loss":
            log_losses.append(_log_loss(clf.classes_, probas[value], y_val))
        log.debug("sweep %s=%s: %s %.4f", plan.param, value, scoring, score)

    for value in plan.grid:
        evaluate(value)
    for _ in range(plan.refine_steps):
        candidates = _midpoints(evaluated, _best(evaluated, plan.stronger, log_losses), integer)
        if plan.stronger == "larger":
            candidates.reverse()
        if not candidates:
            break
        for value in candidates:
            evaluate(value)
    best_value, best_score = _best(evaluated, plan.stronger, log_losses)
    if plan.stronger and len(evaluated) > 1:
        curve = sorted(evaluated)
        for edge, inner in ((curve[0], curve[1]), (curve[-1], curve[-2])):
            if edge[0] == best_value and edge[1] > inner[1]:
                log.info("best %s=%s lies at the edge of the sweep grid; a wider grid might do better",
                         plan.param, best_value)
    return SweepResult(
        param=f"clf__{plan.param}", evaluated=evaluated, best_value=best_value, best_score=best_score,
        n_fits=len(evaluated), seconds=time.perf_counter() - t0, scoring=scoring, coarse_grid=plan.grid,
        stronger=plan.stronger, not_converged=tuple(dict.fromkeys(not_converged)), tie_break=tie_break,
        log_losses=log_losses, val_proba=probas.get(best_value), val_classes=getattr(clf, "classes_", None),
    )


def _best(evaluated: list[tuple[Any, float]], stronger: str | None, log_losses=()) -> tuple[Any, float]:
    """Highest score; ties go to the lower log loss when given, then to the stronger regularization (or to the
    earliest value when the direction is unknown)."""
    def key(item):
        i, (value, score) = item
        tie = {"smaller": lambda: -value, "larger": lambda: value}.get(stronger, lambda: -i)()
        return score, -log_losses[i] if log_losses else 0.0, tie
    return max(enumerate(evaluated), key=key)[1]


def _log_loss(classes, proba, y_val) -> float:
    """Mean negative log probability of the true class; labels the classifier never saw count as probability 0."""
    index = {c: i for i, c in enumerate(classes.tolist())}
    cols = np.array([index.get(v, -1) for v in np.asarray(y_val).tolist()])
    p = np.where(cols >= 0, proba[np.arange(len(cols)), np.maximum(cols, 0)], 0.0)
    return float(-np.log(np.clip(p, 1e-15, 1.0)).mean())


def _midpoints(evaluated, best, integer: bool) -> list:
    """Log-midpoints between the best value and its neighbours among the values evaluated so far, ascending."""
    values = sorted({v for v, _ in evaluated})
    i = values.index(best[0])
    pairs = [(values[j], values[j + 1]) for j in (i - 1, i) if 0 <= j and j + 1 < len(values)]
    out = []
    for lo, hi in pairs:
        mid = math.sqrt(lo * hi)
        if integer:
            mid = int(round(mid))
        if lo < mid < hi:
            out.append(mid)
    return out


def train_val_split(y, val_split: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded, stratified train/validation split of labels ``y``.

    Falls back to a non-stratified split (with a logged warning) when some class is too rare to stratify.
    """
    if not 0.0 < float(val_split) < 1.0:
        raise HeadError(f"val_split must be a fraction strictly between 0 and 1, got {val_split!r}")
    y = np.asarray(y)
    idx = np.arange(len(y))
    n_val = int(math.ceil(val_split * len(y)))
    if len(y) < 2 or n_val >= len(y):
        raise HeadError(f"cannot split {len(y)} samples into train and validation (val_split={val_split})")
    try:
        train, val = train_test_split(idx, test_size=n_val, random_state=seed, stratify=y)
    except ValueError as exc:
        counts = dict(zip(*np.unique(y, return_counts=True)))
        rare = sorted(str(c) for c, n in counts.items() if n < 2)
        log.warning("stratified validation split impossible (%s%s); using a random split",
                    exc, f"; classes with one sample: {', '.join(rare[:10])}" if rare else "")
        train, val = train_test_split(idx, test_size=n_val, random_state=seed)
    return np.sort(train), np.sort(val)


def fit_head(name: str, X, y, *, X_val=None, y_val=None, val_split: float = 0.1, value=None,
             standardize: bool = False, l2_normalize: bool = False, params: dict | None = None, seed: int = 0,
             grid=None, refine_steps: int | None = None, scoring: str = "accuracy",
             tie_break: str = "log_loss") -> HeadFit:
    """Sweep the head's regularization on a validation split, then refit on train + validation.

    Without ``X_val`` a stratified, seeded ``val_split`` fraction of ``X`` is held out for the sweep. Giving
    ``value`` (or the swept parameter in ``params``) skips the sweep and the split; so does a head without a
    swept parameter. Either way the returned estimator was fitted on every sample of ``X`` (and ``X_val``).
    """
    t0 = time.perf_counter()
    X, y = _check_xy(X, y, "X", "y")
    spec = head_spec(name)
    params = dict(params or {})
    if spec.param and spec.param in params:  # a fixed value given through params
        fixed = params.pop(spec.param)
        if value is not None and value != fixed:
            raise HeadError(f"{spec.param} given twice: value={value!r} and params[{spec.param!r}]={fixed!r}")
        value = fixed
    pipe = make_head(name, params, standardize=standardize, l2_normalize=l2_normalize, seed=seed)
    if value is not None and grid is not None:
        raise HeadError("give a fixed value or a grid to sweep, not both")
    if value is not None and not spec.param:
        raise HeadError(f"head {name!r} has no swept parameter to set to {value!r}; pass params instead")
    if value is not None:
        _check_value(spec.param, value)
    plan = None if value is not None else _plan(spec, grid, refine_steps, n_train=len(X))
    if plan is None and grid is not None:
        raise HeadError(f"head {name!r} has no swept parameter; pass grid={{'clf__<param>': [values]}}")
    if X_val is not None or y_val is not None:
        if X_val is None or y_val is None:
            raise HeadError("give both X_val and y_val, or neither")
        X_val, y_val = _check_xy(X_val, y_val, "X_val", "y_val")
        if X_val.shape[1] != X.shape[1]:
            raise HeadError(f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}")
        unseen = sorted(set(np.unique(y_val).tolist()) - set(np.unique(y).tolist()), key=str)
        if unseen:
            log.warning("validation labels absent from training: %s", ", ".join(map(str, unseen[:10])))
        X_tr, y_tr, X_va, y_va = X, y, X_val, y_val
        X_all, y_all = np.concatenate([X, X_val]), np.concatenate([y, y_val])
    elif plan is not None:
        train, val = train_val_split(y, val_split, seed)
        X_tr, y_tr, X_va, y_va = X[train], y[train], X[val], y[val]
        X_all, y_all = X, y
    else:  # nothing to choose: no validation split needed
        X_tr, y_tr, X_va, y_va = X, y, X[:0], y[:0]
        X_all, y_all = X, y
    if len(np.unique(y_all)) < 2:
        raise HeadError("a classifier needs at least two classes; the labels hold only one")

    result = None
    chosen: dict = {}
    if plan is not None:
        if len(np.unique(y_tr)) < 2:
            raise HeadError("the training split holds only one class; give more samples or a larger val_split")
        plan = _plan(spec, grid, refine_steps, n_train=len(X_tr))
        with blas_threads():
            result = _run_sweep(pipe, plan, X_tr, y_tr, X_va, y_va, scoring, tie_break)
        chosen = {result.param: result.best_value}
        log.info("%s: %s=%s (validation %s %.4f, %d fits)", name, result.param, result.best_value, scoring,
                 result.best_score, result.n_fits)
    elif value is not None:
        chosen = {f"clf__{spec.param}": plain(value)}

    final = clone(pipe).set_params(**chosen)
    calibrated = not hasattr(final.steps[-1][1], "predict_proba")
    if calibrated:
        final.steps[-1] = ("clf", _calibrated(final.steps[-1][1], y_all, name))
    with blas_threads():
        final.fit(X_all, y_all)  # cold: warm-starting from the sweep's solution saved no time (lbfgs, measured)
    return HeadFit(
        estimator=final, sweep=result, chosen=chosen, n_train=len(X_tr), n_val=len(X_va),
        fit_seconds=time.perf_counter() - t0, refit_on_train_val=True, name=name, calibrated=calibrated,
    )


def _check_value(param: str, value) -> None:
    """A fixed regularization value must be a finite positive number (a positive integer for n_neighbors)."""
    if param == "n_neighbors":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise HeadError(f"{param}={value!r} must be a positive integer")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value <= 0:
        raise HeadError(f"{param}={value!r} must be a finite number above 0")


def _calibrated(clf, y, name: str) -> CalibratedClassifierCV:
    _, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        raise HeadError(f"head {name!r} has no predict_proba and is calibrated by cross-validation, which needs "
                        "at least two samples of every class; use 'logreg' or add samples")
    return CalibratedClassifierCV(clf, method="sigmoid", cv=int(min(3, counts.min())), ensemble=False)


def _check_xy(X, y, xname: str, yname: str) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2:
        raise HeadError(f"{xname} must be 2-D (samples x features), got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise HeadError(f"{yname} must be 1-D with one label per row of {xname}: shapes {y.shape} and {X.shape}")
    return X, y
