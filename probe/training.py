"""``probe fit`` and ``probe evaluate``: heads on cached features, with lineage, leakage checks and a report.

    data --extract (cache hits are free)--> features + labels --split / --val--> regularization sweep
         --> refit on train+val --> ProbeModel (.probe) + metrics.json + confusion_matrix.png
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import clone

from .defaults import DEFAULT_BACKBONE, DEFAULT_CACHE
from .errors import ProbeError, StrictModeError
from .files import atomic_write_text
from .engine import UNSET, Extractor, make_options
from .featureset import ExtractStats, FeatureSet
from .heads import blas_threads, head_description, head_spec
from .sweep import fit_head
from .metrics import classification_metrics, format_report, plot_confusion_matrix
from .jsonable import json_default
from .model import ProbeModel, keys_digest
from .sources import Record, resolve

log = logging.getLogger(__name__)


@dataclass
class Leak:
    key: str
    train_path: str
    other_path: str


@dataclass
class FitResult:
    model: ProbeModel
    metrics: dict
    sweep: object | None
    leakage: list[Leak]
    train_stats: ExtractStats
    val_stats: ExtractStats | None
    report: str
    path: Path | None = None
    files: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    metrics: dict
    leakage: list[Leak]
    stats: ExtractStats
    report: str
    files: dict = field(default_factory=dict)


def find_leakage(train: FeatureSet | dict[str, str], other: FeatureSet) -> list[Leak]:
    """Inputs of ``other`` whose bytes (cache key) are also on the training side: a FeatureSet, or a mapping of
    training keys to the path to report for each."""
    if isinstance(train, FeatureSet):
        first: dict[str, str] = {}
        for k, p in zip(train.keys, train.paths):
            first.setdefault(k, p)
    else:
        first = train
    return [Leak(k, first[k], p) for k, p in zip(other.keys, other.paths) if k in first]


def split_by_key(keys: list[str], labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of rows in which all rows sharing bytes (a key) land on the same side, so the
    split itself cannot leak. Returns (train row indices, val row indices)."""
    from sklearn.model_selection import train_test_split

    uniq = list(dict.fromkeys(keys))
    if len(uniq) < 2:
        raise ProbeError(f"cannot hold out a validation split: the data holds {len(uniq)} distinct input(s) "
                         f"({len(keys)} rows); add inputs or give --val DATA")
    first_label = {}
    for k, lab in zip(keys, labels):
        first_label.setdefault(k, lab)
    y = np.asarray([first_label[k] for k in uniq], dtype=object)
    counts = {c: int((y == c).sum()) for c in set(y)}
    n_val = max(1, round(fraction * len(uniq)))
    stratify = y if min(counts.values()) >= 2 and n_val >= len(counts) else None
    if stratify is None:
        log.warning("validation split is not stratified: some class has fewer than 2 distinct inputs")
    tr_keys, va_keys = train_test_split(uniq, test_size=n_val, random_state=seed, stratify=stratify)
    va = set(va_keys)
    rows = np.arange(len(keys))
    is_val = np.fromiter((k in va for k in keys), dtype=bool, count=len(keys))
    return rows[~is_val], rows[is_val]


def _check_failures(fs: FeatureSet, what: str, strict: bool) -> None:
    for f in fs.failures:
        log.warning("%s: skipped %s", what, f.error)
    if strict and fs.failures:
        raise StrictModeError(f"--strict: {len(fs.failures)} {what} inputs failed (first: {fs.failures[0].error})")


def fit(
    data,
    clf: str = "logreg",
    *,
    backbone: str = DEFAULT_BACKBONE,
    cache=UNSET,
    val=None,
    val_split: float = 0.1,
    value: float | None = None,
    params: dict | None = None,
    standardize: bool = False,
    l2_normalize: bool = False,
    extract_missing: bool = True,
    strict: bool = False,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    **extract_options,
) -> FitResult:
    """Train a head on the features of ``data`` (folder / CSV / files with labels) and build a ProbeModel.

    The regularization value is chosen on a validation set (``val`` data, or a seeded stratified ``val_split``),
    then the head is refit on train+val. ``value`` (e.g. C=0.5) skips the sweep. With ``output``, the model, its
    ``metrics.json`` and ``confusion_matrix.png`` are written there.
    """
    if val is None and val_split <= 0 and value is None and head_spec(clf).param:
        raise ProbeError(f"--val-split 0 leaves no data to choose {head_spec(clf).param} on; "
                         "give --val DATA, a --val-split above 0, or a fixed --C / --alpha")
    ex = Extractor(make_options(backbone, cache, **extract_options))
    train = ex.extract(resolve(data), extract_missing=extract_missing)
    _check_failures(train, "training", strict)
    y_all = train.y
    X_all = train.features
    leakage: list[Leak] = []
    val_fs = None
    if val is not None:
        val_fs = ex.extract(resolve(val), extract_missing=extract_missing)
        _check_failures(val_fs, "validation", strict)
        leakage = find_leakage(train, val_fs)
        X_tr, y_tr, X_va, y_va = X_all, y_all, val_fs.features, val_fs.y
    elif val_split > 0:
        tr_idx, va_idx = split_by_key(train.keys, y_all, val_split, seed)
        X_tr, y_tr, X_va, y_va = X_all[tr_idx], y_all[tr_idx], X_all[va_idx], y_all[va_idx]
    else:
        X_tr, y_tr, X_va, y_va = X_all, y_all, None, None
    for leak in leakage:
        log.warning("leakage: %s (train) and %s (validation) have the same bytes", leak.train_path, leak.other_path)
    if strict and leakage:
        raise StrictModeError(f"--strict: {len(leakage)} validation inputs also appear in the training data "
                              f"(e.g. {leakage[0].other_path} = {leakage[0].train_path})")

    hf = fit_head(clf, X_tr, y_tr, X_val=X_va, y_val=y_va, value=value, params=params,
                  standardize=standardize, l2_normalize=l2_normalize, seed=seed)
    head = hf.estimator

    if X_va is not None:
        # Held-out metrics: the chosen setting fit on train only, scored on validation (before the refit). The
        # sweep already made that fit and kept its validation probabilities; otherwise fit it here.
        if hf.sweep is not None and hf.sweep.val_proba is not None:
            proba, classes = hf.sweep.val_proba, hf.sweep.val_classes
        else:
            with blas_threads():
                held = clone(head).fit(X_tr, y_tr)
            proba, classes = held.predict_proba(X_va), held.classes_
        unseen = sorted(set(np.asarray(y_va).tolist()) - set(np.asarray(classes).tolist()), key=str)
        if unseen:  # validation-only classes: the train-only head gives them probability 0
            proba = np.hstack([proba, np.zeros((len(proba), len(unseen)))])
            classes = np.asarray(list(classes) + unseen, dtype=object)
        metrics = classification_metrics(y_va, proba, classes)
        metrics["evaluated_on"] = "validation (head fit on train only, before the train+val refit)"
    else:
        metrics = classification_metrics(y_tr, head.predict_proba(X_tr), head.classes_)
        metrics["evaluated_on"] = "training data (no validation split: optimistic)"

    all_keys = train.keys + (val_fs.keys if val_fs is not None else [])
    all_labels = list(y_all) + (list(val_fs.y) if val_fs is not None else [])
    n_new = train.stats.new + (val_fs.stats.new if val_fs else 0)
    n_cached = train.stats.cached + (val_fs.stats.cached if val_fs else 0)
    metrics.update({
        "head": clf,
        "chosen": hf.chosen,
        "n_train": int(hf.n_train),
        "n_val": int(hf.n_val),
        "refit_on_train_val": bool(X_va is not None),
        "fit_seconds": round(hf.fit_seconds, 3),
        "inputs_cached": int(n_cached),
        "inputs_extracted": int(n_new),
        "leakage": len(leakage),
        "sweep": _sweep_dict(hf.sweep),
    })
    model = ProbeModel.fitted(
        backbone_record(ex.space, ex.backbone.weights_path),
        head,
        meta={
            "head": {"name": clf, **head_description(head), "chosen": hf.chosen},
            "training": {
                "source": _sources(data),
                "val_source": None if val is None else str(val),
                "val_split": val_split if val is None else None,
                "seed": seed,
                "keys_digest": keys_digest(all_keys, all_labels),
                "n_inputs": len(all_keys),
                "n_cached": int(n_cached),
                "n_extracted": int(n_new),
            },
            "metrics": _headline(metrics),
        },
        train_keys=sorted(set(all_keys)),
        cache=ex.options.cache, params=params, standardize=standardize, l2_normalize=l2_normalize,
        val_split=val_split, value=value, seed=seed,
    )
    model.train_set_ = train_set_rows(all_keys, all_labels)
    report = format_report(metrics, hf.sweep)
    result = FitResult(model, metrics, hf.sweep, leakage, train.stats, val_fs.stats if val_fs else None, report)
    if output is not None:
        result.path = model.save(output)
        result.files = write_report_files(Path(output).parent, metrics, model.classes_)
    return result


def backbone_record(space, weights_path: str | None) -> dict:
    """The model's backbone record: the feature space's own description (``backbone`` named ``name``), where the
    weights were read, and the space digest that loading checks."""
    record = space.to_dict()
    return {"name": record.pop("backbone"), **record, "weights_path": weights_path, "space_digest": space.digest}


def evaluate(model: ProbeModel, data, *, cache=DEFAULT_CACHE, write: bool = False, strict: bool = False,
             output_dir: str | os.PathLike | None = None, **extract_options) -> EvalResult:
    """Score a model on labelled data (features from the cache where present); reports overlap with training."""
    fs = model.features(resolve(data), cache=cache, write=write, strict=False, **extract_options)
    _check_failures(fs, "evaluation", strict)
    return evaluate_features(model, fs, strict=strict, output_dir=output_dir)


def evaluate_features(model: ProbeModel, fs: FeatureSet, *, strict: bool = False,
                      output_dir: str | os.PathLike | None = None) -> EvalResult:
    metrics = classification_metrics(fs.y, model.predict_proba_features(fs.features), model.classes_)
    metrics["evaluated_on"] = "evaluation data"
    leakage = find_leakage(dict.fromkeys(model.train_keys_ or (), "(training set)"), fs)
    metrics["leakage"] = len(leakage)
    for leak in leakage:
        log.warning("leakage: %s has the same bytes as a training input", leak.other_path)
    if strict and leakage:
        raise StrictModeError(f"--strict: {len(leakage)} evaluation inputs were in the training data "
                              f"(e.g. {leakage[0].other_path})")
    result = EvalResult(metrics, leakage, fs.stats, format_report(metrics))
    if output_dir is not None:
        result.files = write_report_files(Path(output_dir), metrics, model.classes_)
    return result


def write_report_files(folder: Path, metrics: dict, classes) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    mpath = atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2, default=json_default) + "\n")
    cpath = plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), [str(c) for c in classes],
                                  folder / "confusion_matrix.png")
    return {"metrics": mpath, "confusion_matrix": Path(cpath) if cpath else folder / "confusion_matrix.png"}


def _sources(data) -> list[str]:
    """How the training data was given, for the lineage: paths as given; records as the count of inputs."""
    items = data if isinstance(data, (list, tuple)) else [data]
    if items and all(isinstance(d, Record) for d in items):
        return [f"{len(items)} inputs given as a list"]
    return [str(d) for d in items]
def train_set_rows(keys, labels) -> tuple[list[str], list[str]]:
    """(keys, labels) in order without exact repeats: what a model records so a refit can reuse its training set."""
    pairs = list(dict.fromkeys((str(k), str(lab)) for k, lab in zip(keys, labels)))
    return [k for k, _ in pairs], [lab for _, lab in pairs]


def _sweep_dict(sweep) -> dict | None:
    return None if sweep is None else sweep.to_dict()


def _headline(metrics: dict) -> dict:
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "ece", "n", "evaluated_on")
    return {k: metrics[k] for k in keys if k in metrics}
