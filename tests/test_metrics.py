"""Metrics, the confusion-matrix plot and the text report, on hand-computed examples."""

import json

import numpy as np
import pytest

from probe.sweep import SweepResult
from probe.metrics import (
    classification_metrics, expected_calibration_error, format_report, plot_confusion_matrix, top_k_accuracy,
)

CLASSES = ["a", "b", "c"]
Y = ["a", "b", "a", "c"]
PROBA = [[0.90, 0.05, 0.05],  # a, right, confidence 0.90
         [0.20, 0.70, 0.10],  # b, right, 0.70
         [0.30, 0.62, 0.08],  # a predicted as b, 0.62
         [0.10, 0.10, 0.80]]  # c, right, 0.80


def test_hand_computed_example():
    m = classification_metrics(Y, PROBA, CLASSES)
    assert m["n"] == 4 and m["n_classes"] == 3
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)  # recalls: a 1/2, b 1/1, c 1/1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)  # a: p=1 r=.5; b: p=.5 r=1; c: 1
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # rows: true a, b, c
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    # each sample in its own bin: mean |correct - confidence|
    assert m["ece"] == pytest.approx((0.10 + 0.30 + 0.62 + 0.20) / 4)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.7, 0.3, 0.8])))
    assert "top5_accuracy" not in m
    json.dumps(m)


def test_ece_perfect_and_constructed():
    y = ["a", "b", "c", "a"]
    onehot = np.eye(3)[[0, 1, 2, 0]]
    m = classification_metrics(y, onehot, CLASSES)
    assert m["accuracy"] == 1.0 and m["ece"] == 0.0
    # ten samples at confidence 0.75 (one bin), six right: |0.6 - 0.75|
    assert expected_calibration_error(np.full(10, 0.75), [1] * 6 + [0] * 4) == pytest.approx(0.15)
    # two bins, weighted by size: 4 at 0.95 all right (gap .05), 6 at 0.35 with 3 right (gap .15)
    ece = expected_calibration_error([0.95] * 4 + [0.35] * 6, [1] * 4 + [1, 1, 1, 0, 0, 0])
    assert ece == pytest.approx(0.4 * 0.05 + 0.6 * 0.15)


def test_top_k_only_with_more_classes_than_k():
    five = classification_metrics(["a"], [[0.6, 0.1, 0.1, 0.1, 0.1]], list("abcde"))
    assert "top5_accuracy" not in five
    classes = list("abcdefg")
    proba = np.array([[0.05, 0.3, 0.2, 0.1, 0.15, 0.12, 0.08],   # true a ranked last: miss
                      [0.1, 0.3, 0.25, 0.05, 0.1, 0.15, 0.05]])  # true c ranked 2nd: hit, top-1 miss
    m = classification_metrics(["a", "c"], proba, classes)
    assert m["accuracy"] == 0.0
    assert m["top5_accuracy"] == pytest.approx(0.5)
    assert classification_metrics(["a", "c"], proba, classes, top_k=2)["top2_accuracy"] == pytest.approx(0.5)
    assert top_k_accuracy([1, 2], proba, 1) == pytest.approx(0.5)  # b is top-1 of row 0, c is not of row 1


def test_classes_absent_from_y_true():
    m = classification_metrics(["a", "a", "b"], [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]], CLASSES)
    assert m["per_class"]["c"]["support"] == 0
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)  # over the classes present


def test_unknown_labels_are_errors_naming_them():
    with pytest.raises(ValueError, match="'zebra'"):
        classification_metrics(["a", "zebra"], [[1, 0, 0], [0, 1, 0]], CLASSES)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(["a"], [[1, 0]], CLASSES)


def test_format_report_contains_the_numbers():
    m = classification_metrics(Y, PROBA, CLASSES)
    sweep = SweepResult(param="clf__C", evaluated=[(1.0, 0.8), (1e-2, 0.9), (1e2, 0.7), (0.1, 0.9)],
                        best_value=1e-2, best_score=0.9, n_fits=4, seconds=0.5, coarse_grid=(1e-2, 1.0, 1e2))
    text = format_report(m, sweep)
    assert "accuracy           0.7500" in text
    assert "ece" in text and f"{m['ece']:.4f}" in text
    assert "0.6667" in text  # a's f1 / per-class table
    lines = text.splitlines()
    best = [line for line in lines if "<- best" in line]
    assert best == ["  C=0.01        0.9000  <- best"]
    curve = [line.split()[0] for line in lines if line.startswith("  C=")]
    assert curve == ["C=0.01", "C=0.1", "C=1", "C=100"]  # sorted by value
    assert format_report(m, sweep.to_dict()) == text
    assert "sweep" not in format_report(m)


def test_plot_writes_a_png(tmp_path):
    from PIL import Image as image
    m = classification_metrics(Y, PROBA, CLASSES)
    path = tmp_path / "plots" / "cm.png"
    assert plot_confusion_matrix(m["confusion_matrix"], m["classes"], path) == path
    plot_confusion_matrix(m["confusion_matrix"], m["classes"], path, title="again")  # overwrites in place
    with image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix([[1, 0], [0, 1]], CLASSES, path)
