"""Classification metrics of a head's probabilities, a confusion-matrix plot and a plain-text report. No torch.

Everything :func:`classification_metrics` returns is JSON-able, so it can be written next to a model as is.
Conventions: ``proba`` columns follow ``classes`` (the estimator's ``classes_``); the prediction is the class of
highest probability; balanced accuracy is the mean recall over the classes present in ``y_true``; macro-F1
averages over the classes present in ``y_true`` or predicted; ECE uses 15 equal-width bins of the top
probability (Guo et al., 2017).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, log_loss, precision_recall_fscore_support

from .files import atomic_path

log = logging.getLogger(__name__)

ECE_BINS = 15


def classification_metrics(y_true, proba, classes, top_k: int = 5) -> dict:
    """Accuracy, balanced accuracy, macro-F1, top-k accuracy (only when there are more than ``top_k``
    classes), log loss, expected calibration error, per-class precision/recall/F1/support and the confusion
    matrix (rows: true class, columns: predicted class, both in the order of ``classes``)."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    classes = np.asarray(classes)
    if y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of labels, got shape {y_true.shape}")
    if proba.ndim != 2 or proba.shape != (len(y_true), len(classes)):
        raise ValueError(f"proba must have shape (n_samples, n_classes) = ({len(y_true)}, {len(classes)}), "
                         f"got {proba.shape}")
    known = set(classes.tolist())
    unknown = sorted({v for v in y_true.tolist() if v not in known}, key=str)
    if unknown:
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"labels unknown to the model: {shown}; the model knows {len(classes)} classes")

    index = {c: i for i, c in enumerate(classes.tolist())}
    true_idx = np.array([index[v] for v in y_true.tolist()])
    pred_idx = proba.argmax(axis=1)
    y_pred = classes[pred_idx]
    correct = pred_idx == true_idx
    n_classes = len(classes)

    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (true_idx, pred_idx), 1)
    support = cm.sum(axis=1)
    present = support > 0
    recall_present = np.diag(cm)[present] / support[present]

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    out = {
        "n": int(len(y_true)),
        "n_classes": int(n_classes),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(recall_present.mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if n_classes > top_k:
        out[f"top{top_k}_accuracy"] = top_k_accuracy(true_idx, proba, top_k)
    # float32 heads give rows summing to 1 only within float32 rounding; log_loss checks at float64 precision.
    normalized = proba / np.clip(proba.sum(axis=1, keepdims=True), 1e-12, None)
    out["log_loss"] = float(log_loss(true_idx, normalized, labels=np.arange(n_classes)))
    out["ece"] = expected_calibration_error(proba.max(axis=1), correct)
    out["per_class"] = {
        str(c): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes.tolist(), precision, recall, f1, support)
    }
    out["classes"] = [str(c) for c in classes.tolist()]
    out["confusion_matrix"] = cm.tolist()
    return out


def top_k_accuracy(true_idx, proba, k: int) -> float:
    """Fraction of samples whose true class (an index into ``proba``'s columns) is among the k most probable."""
    proba = np.asarray(proba)
    top = np.argpartition(-proba, kth=min(k, proba.shape[1]) - 1, axis=1)[:, :k]
    return float((top == np.asarray(true_idx)[:, None]).any(axis=1).mean())


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins (lo, hi] of |accuracy - mean confidence| weighted by the bin's
    share of samples."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(ece)


def plot_confusion_matrix(cm, classes, path, *, title: str | None = None) -> Path:
    """Write the confusion matrix as a PNG (rows: true, columns: predicted), atomically. Returns the path.

    Uses matplotlib's Agg canvas directly, never pyplot, so no GUI backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    labels = [str(c) for c in classes]
    n = len(labels)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {n} classes")
    size = min(4 + 0.4 * n, 30)
    fig = Figure(figsize=(size + 1.5, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    if n <= 50:
        ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
        ax.set_yticks(range(n), labels)
    if n <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > threshold else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


_HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "log_loss", "ece")


def format_report(metrics: dict, sweep=None) -> str:
    """A plain-text report: headline metrics, per-class precision/recall/F1, and the sweep curve if given.

    ``sweep`` is a :class:`probe.sweep.SweepResult` or its ``to_dict()``.
    """
    lines = [f"n={metrics.get('n')}  classes={metrics.get('n_classes')}", ""]
    headline = [k for k in _HEADLINE if k in metrics]
    headline += [k for k in metrics if k.startswith("top") and k.endswith("_accuracy") and k not in headline]
    width = max(len(k) for k in headline) if headline else 0
    lines += [f"{k:<{width}}  {metrics[k]:.4f}" for k in headline]

    per_class = metrics.get("per_class") or {}
    if per_class:
        name_w = max(5, *(len(c) for c in per_class))
        lines += ["", f"{'class':<{name_w}}  precision  recall      f1  support"]
        for c, m in per_class.items():
            lines.append(f"{c:<{name_w}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  "
                         f"{m['support']:7d}")

    if sweep is not None:
        s = sweep.to_dict() if hasattr(sweep, "to_dict") else sweep
        param = s["param"].removeprefix("clf__")
        lines += ["", f"sweep of {param} ({s['n_fits']} fits, {s['seconds']:.1f} s), validation {s['scoring']}:"]
        not_converged = set(s.get("not_converged") or ())
        for value, score in s["curve"]:
            mark = "  <- best" if value == s["best_value"] else ""
            note = "  (not converged)" if value in not_converged else ""
            lines.append(f"  {param}={_fmt(value):<10}  {score:.4f}{mark}{note}")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
