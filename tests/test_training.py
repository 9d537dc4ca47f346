"""probe.fit / probe.evaluate on the tiny backbone: heads, cache reuse, refit, leakage, report files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY, invoke, make_image_folder

import probe
from probe.errors import ProbeError, StrictModeError
from probe.training import split_by_key


@pytest.fixture
def train_folder(tmp_path):
    return make_image_folder(tmp_path / "train", per_class=12, seed=0)


@pytest.fixture
def test_folder(tmp_path):
    return make_image_folder(tmp_path / "test", per_class=6, seed=500)


@pytest.mark.parametrize("clf", ["logreg", "linear-svm", "ridge", "knn", "sgd", "mlp"])
def test_each_head_beats_chance_on_held_out_images(clf, train_folder, test_folder, cache_dir, tmp_path):
    res = probe.fit(train_folder, clf, backbone=TINY, cache=cache_dir, batch_size=8, standardize=True,
                    output=tmp_path / clf / "model.probe")
    ev = probe.evaluate(res.model, test_folder, cache=cache_dir)
    assert ev.metrics["accuracy"] >= 0.9  # chance is 1/3
    assert set(res.model.classes_) == {"cat", "dog", "fish"}


def test_second_fit_extracts_nothing(train_folder, cache_dir):
    first = probe.fit(train_folder, backbone=TINY, cache=cache_dir, batch_size=8)
    assert first.train_stats.new == 36 and first.train_stats.model_batches > 0
    second = probe.fit(train_folder, backbone=TINY, cache=cache_dir, batch_size=8)
    assert second.train_stats.new == 0
    assert second.train_stats.model_batches == 0
    assert second.metrics["inputs_cached"] == 36 and second.metrics["inputs_extracted"] == 0


def test_no_extract_refuses_uncached_inputs(train_folder, cache_dir):
    with pytest.raises(ProbeError, match="not in the cache"):
        probe.fit(train_folder, backbone=TINY, cache=cache_dir, extract_missing=False)
    probe.extract(train_folder, TINY, cache_dir, batch_size=8)
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, extract_missing=False)
    assert res.train_stats.new == 0


def test_refit_uses_train_plus_val_and_records_lineage(train_folder, cache_dir):
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, val_split=0.25, batch_size=8)
    m = res.metrics
    assert m["refit_on_train_val"] is True
    assert m["n_train"] + m["n_val"] == 36 and m["n_val"] == 9
    assert m["sweep"] is not None and len(m["sweep"]["evaluated"]) >= 7
    assert res.model.meta_["training"]["n_inputs"] == 36
    assert len(res.model.train_keys_) == 36


def test_final_head_is_fit_on_train_plus_val(train_folder, cache_dir, tmp_path):
    """A class that only the validation data has is learned by the final head: the refit saw validation rows."""
    val = make_image_folder(tmp_path / "val", per_class=4, seed=900,
                            classes={"cat": (220, 40, 40), "eel": (230, 230, 40)})
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, val=val, batch_size=8)
    assert "eel" in list(res.model.classes_) and res.metrics["refit_on_train_val"] is True
    eels = sorted(str(p) for p in (val / "eel").glob("*.png"))
    assert list(res.model.predict(eels)).count("eel") >= 3
    fixed = probe.fit(train_folder, backbone=TINY, cache=cache_dir, val=val, value=1.0, batch_size=8)
    assert "eel" in list(fixed.model.classes_)  # with a fixed C too


def test_fixed_C_skips_the_sweep(train_folder, cache_dir):
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, value=0.5, batch_size=8)
    assert res.sweep is None
    assert res.metrics["chosen"] == {"clf__C": 0.5}


def test_no_validation_needs_a_fixed_value(train_folder, cache_dir):
    with pytest.raises(ProbeError, match="val-split 0"):
        probe.fit(train_folder, backbone=TINY, cache=cache_dir, val_split=0)
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, val_split=0, value=1.0, batch_size=8)
    assert res.metrics["n_val"] == 0 and res.metrics["evaluated_on"].startswith("training data")


def test_leakage_report_finds_planted_duplicate(train_folder, test_folder, cache_dir, tmp_path):
    planted = test_folder / "cat" / "planted.png"
    shutil.copy(train_folder / "dog" / "dog_003.png", planted)
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, val=test_folder, batch_size=8)
    assert [(lk.train_path.endswith("dog_003.png"), lk.other_path) for lk in res.leakage] == [(True, str(planted))]
    with pytest.raises(StrictModeError, match="also appear in the training data"):
        probe.fit(train_folder, backbone=TINY, cache=cache_dir, val=test_folder, strict=True)
    # The final head was refit on train+val, so evaluation data is checked against both.
    fresh = make_image_folder(tmp_path / "fresh", per_class=2, seed=800)
    shutil.copy(test_folder / "fish" / "fish_001.png", fresh / "fish" / "from_val.png")
    ev = probe.evaluate(res.model, fresh, cache=cache_dir)
    assert [lk.other_path for lk in ev.leakage] == [str(fresh / "fish" / "from_val.png")]


def test_internal_split_never_separates_identical_bytes():
    keys = ["a", "a", "b", "c", "c", "d", "e", "f", "g", "h"] * 3
    labels = np.array(["x", "x", "y", "x", "x", "y", "x", "y", "x", "y"] * 3, dtype=object)
    tr, va = split_by_key(keys, labels, 0.3, seed=0)
    assert not {keys[i] for i in tr} & {keys[i] for i in va}
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(keys)))


def test_report_files_next_to_model(train_folder, cache_dir, tmp_path):
    out = tmp_path / "run" / "model.probe"
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir, output=out, batch_size=8)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "per_class", "sweep", "fit_seconds",
              "inputs_cached", "inputs_extracted"):
        assert k in metrics, k
    assert "top5_accuracy" not in metrics  # 3 classes
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 0
    assert res.path == out and out.exists()


def test_cli_fit_and_evaluate(train_folder, test_folder, cache_dir, tmp_path):
    out = tmp_path / "m" / "model.probe"
    r = invoke("fit", train_folder, "-b", TINY, "--cache", cache_dir, "-o", out, "--C", "1", "--batch-size", "8")
    assert "accuracy" in r.output and "model saved" in r.output
    r = invoke("evaluate", out, test_folder, "--cache", cache_dir, "-o", tmp_path / "eval")
    assert "accuracy" in r.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 18


def test_cli_fit_rejects_bad_params_json(train_folder, cache_dir):
    r = invoke("fit", train_folder, "-b", TINY, "--cache", cache_dir, "--params", "{nope", expect=2)
    assert "not valid JSON" in r.output


def test_held_out_report_reuses_the_sweep_fit(train_folder, cache_dir, monkeypatch):
    """The validation metrics come from the sweep's train-only fit at the chosen value, not from another fit."""
    import probe.training as training

    probe.extract(train_folder, TINY, cache_dir, batch_size=8)
    seen = {}
    real = training.classification_metrics

    def spy(y_true, proba, classes):
        seen["proba"] = proba
        return real(y_true, proba, classes)

    monkeypatch.setattr(training, "classification_metrics", spy)
    monkeypatch.setattr(training, "clone", lambda est: pytest.fail("held-out metrics refit the head"))
    res = probe.fit(train_folder, backbone=TINY, cache=cache_dir)
    assert seen["proba"] is res.sweep.val_proba and res.metrics["n"] == res.metrics["n_val"]


def test_every_head_fit_in_probe_fit_uses_one_blas_thread(train_folder, cache_dir):
    from test_heads import ThreadRecordingClassifier

    ThreadRecordingClassifier.seen = []
    res = probe.fit(train_folder, "test_heads.ThreadRecordingClassifier", backbone=TINY, cache=cache_dir,
                    batch_size=8)
    assert res.sweep is None and len(ThreadRecordingClassifier.seen) == 2  # held-out fit + final refit
    assert all(s <= {1} for s in ThreadRecordingClassifier.seen)
