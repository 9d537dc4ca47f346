"""``probe predict``: predictions on raw inputs, one row per input (errors flagged), as CSV or JSON lines.

Features of inputs already in the model's feature space are read from the cache; with ``write=True`` newly
computed features are stored too (so a later refit or drift check can use predicted traffic).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from .defaults import DEFAULT_CACHE
from .featureset import FeatureSet
from .files import atomic_write_text
from .model import ProbeModel
from .sources import Record, resolve


@dataclass
class Prediction:
    path: str
    sha256: str | None
    prediction: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    label: str | None = None
    error: str | None = None


@dataclass
class PredictionResult:
    rows: list[Prediction]
    features: FeatureSet
    proba: np.ndarray  # (n_ok, n_classes), aligned with features.keys

    @property
    def errors(self) -> list[Prediction]:
        return [r for r in self.rows if r.error]


def predict(model: ProbeModel, inputs: Sequence[Record | str | os.PathLike] | str | os.PathLike, *,
            cache=DEFAULT_CACHE, write: bool = False, top_k: int = 5, **extract_options) -> PredictionResult:
    """Predict every input (files, folders, CSVs or records); an undecodable input gets a row with ``error``."""
    records = inputs if isinstance(inputs, list) and all(isinstance(r, Record) for r in inputs) else resolve(inputs)
    fs = model.features(records, cache=cache, write=write, strict=False, **extract_options)
    return predictions_from_features(model, records, fs, top_k)


def ranked_classes(proba: np.ndarray, classes: Sequence[str]) -> list[tuple[str, float]]:
    """Every class with its probability, most probable first (ties in class order)."""
    return [(classes[c], float(proba[c])) for c in np.argsort(-proba, kind="stable")]


def predictions_from_features(model: ProbeModel, records: Sequence[Record], fs: FeatureSet,
                              top_k: int = 5) -> PredictionResult:
    """One row per record from the FeatureSet of those records (``fs.indices`` / failure indices point into
    ``records``): the head's top-k classes, or the record's error."""
    proba = model.predict_proba_features(fs.features) if len(fs) else np.zeros((0, len(model.classes_)))
    classes = [str(c) for c in model.classes_]
    k = max(1, min(top_k, len(classes)))
    rows: list[Prediction | None] = [None] * len(records)
    for j, i in enumerate(fs.indices):
        top = ranked_classes(proba[j], classes)[:k]
        rows[i] = Prediction(fs.paths[j], fs.keys[j], top[0][0], top[0][1], top, records[i].label)
    for f in fs.failures:
        rows[f.index] = Prediction(records[f.index].path, None, label=records[f.index].label, error=f.error)
    return PredictionResult([r for r in rows if r is not None], fs, proba)


def write_predictions(result: PredictionResult, out: IO[str], fmt: str = "csv") -> None:
    if fmt == "jsonl":
        for r in result.rows:
            out.write(json.dumps({
                "path": r.path, "sha256": r.sha256, "prediction": r.prediction, "probability": r.probability,
                "top_k": [{"class": c, "probability": p} for c, p in r.top_k], "error": r.error,
            }) + "\n")
        return
    k = max([len(r.top_k) for r in result.rows] + [0])
    w = csv.writer(out, lineterminator="\n")
    header = ["path", "sha256", "prediction", "probability"]
    for i in range(1, k + 1):
        header += [f"top{i}_class", f"top{i}_probability"]
    w.writerow(header + ["error"])
    for r in result.rows:
        row = [r.path, r.sha256 or "", r.prediction or "", "" if r.probability is None else f"{r.probability:.6g}"]
        for i in range(k):
            row += [r.top_k[i][0], f"{r.top_k[i][1]:.6g}"] if i < len(r.top_k) else ["", ""]
        w.writerow(row + [r.error or ""])


def save_predictions(result: PredictionResult, path: str | os.PathLike, fmt: str = "csv") -> Path:
    """Write predictions to ``path`` atomically (temporary file, then rename)."""
    buf = io.StringIO()
    write_predictions(result, buf, fmt)
    return atomic_write_text(path, buf.getvalue())
