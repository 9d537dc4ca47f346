"""probe predict: one row per input, CSV/JSONL round trips, cache reuse, errors flagged, --strict, --evaluate."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from conftest import TINY, invoke, make_image_folder

import probe
from probe.model import load
from probe.prediction import predict


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    train = make_image_folder(root / "train", per_class=10)
    res = probe.fit(train, backbone=TINY, cache=root / "train-cache", batch_size=8, output=root / "model.probe")
    return res.path


@pytest.fixture
def new_images(tmp_path):
    return make_image_folder(tmp_path / "new", per_class=4, seed=900)


def _rows_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_cli_predictions_equal_model_predict_proba(model_path, new_images, tmp_path):
    model = load(model_path)
    paths = sorted(str(p) for p in new_images.rglob("*.png"))
    proba = model.predict_proba(paths)
    classes = [str(c) for c in model.classes_]
    r = invoke("predict", model_path, new_images, "--cache", tmp_path / "c", "--top-k", "3")
    rows = _rows_csv(r.stdout)
    assert [row["path"] for row in rows] == paths
    for row, p in zip(rows, proba):
        assert row["prediction"] == classes[int(np.argmax(p))]
        assert float(row["probability"]) == pytest.approx(p.max(), abs=1e-5)
        tops = [float(row[f"top{i}_probability"]) for i in (1, 2, 3)]
        assert tops == sorted(tops, reverse=True) and sum(tops) <= 1 + 1e-6
        assert row["top1_class"] == row["prediction"] and len(row["sha256"]) == 64 and row["error"] == ""


def test_jsonl_parses_back_and_matches_csv(model_path, new_images, tmp_path):
    out = tmp_path / "p.jsonl"
    invoke("predict", model_path, new_images, "--format", "jsonl", "-o", out, "--top-k", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    csv_rows = _rows_csv(invoke("predict", model_path, new_images, "--top-k", "2").stdout)
    assert len(rows) == len(csv_rows) == 12
    for j, c in zip(rows, csv_rows):
        assert j["path"] == c["path"] and j["prediction"] == c["prediction"]
        assert [t["probability"] for t in j["top_k"]] == sorted((t["probability"] for t in j["top_k"]), reverse=True)
        assert j["error"] is None


def test_second_predict_with_cache_runs_the_model_zero_times(model_path, new_images, tmp_path):
    model = load(model_path)
    first = predict(model, new_images, cache=tmp_path / "c", write=True)
    assert first.features.stats.new == 12 and first.features.stats.model_batches > 0
    second = predict(model, new_images, cache=tmp_path / "c", write=True)
    assert second.features.stats.new == 0 and second.features.stats.model_batches == 0
    np.testing.assert_allclose(first.proba, second.proba, atol=1e-6)


def test_without_cache_option_nothing_is_written(model_path, new_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke("predict", model_path, new_images)
    assert not (tmp_path / "cache" / "spaces").exists()
    invoke("predict", model_path, new_images, "--cache", "stored")
    assert (tmp_path / "stored" / "spaces").exists()


def test_corrupt_inputs_get_error_rows(model_path, new_images, bad_files, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(new_images, mixed)
    for name in ("empty.jpg", "truncated.png", "notes.jpg"):
        shutil.copy(bad_files.bad[name], mixed / name)
    r = invoke("predict", model_path, mixed)
    rows = _rows_csv(r.stdout)
    assert len(rows) == 15
    errors = {row["path"].rsplit("/", 1)[-1]: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"empty.jpg", "truncated.png", "notes.jpg"}
    assert all(row["prediction"] for row in rows if not row["error"])
    r = invoke("predict", model_path, mixed, "--strict", expect=1)
    assert len(_rows_csv(r.stdout)) == 15  # rows are still written


def test_stdin_paths_and_evaluate(model_path, new_images):
    from click.testing import CliRunner

    from probe.cli import cli

    paths = sorted(str(p) for p in new_images.rglob("*.png"))[:3]
    r = CliRunner().invoke(cli, ["predict", str(model_path), "-"], input="\n".join(paths) + "\n")
    assert r.exit_code == 0, r.output
    assert [row["path"] for row in _rows_csv(r.stdout)] == paths
    r = invoke("predict", str(model_path), str(new_images), "--evaluate")
    assert "accuracy" in r.stderr and "accuracy" not in r.stdout
