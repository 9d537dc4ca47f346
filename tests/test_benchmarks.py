"""Smoke test of benchmarks/: every benchmark runs at toy size and writes the result files the README is built from.

Runs ``benchmarks/run_all.py --scale tiny`` with the test backbone on generated images (so it needs neither
Fashion-MNIST nor pretrained weights) into a temporary folder, and one script on its own. It checks files and
columns, never timings: benchmarks measure, tests assert behaviour.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY, subprocess_env

BENCH = REPO_ROOT / "benchmarks"
MACHINE = {"date", "cpu_count", "cpu_model", "torch_version", "torch_threads", "device", "git_commit", "scale", "data"}
COLUMNS = {
    "throughput": {"backbone", "rep", "images", "batch_size", "workers", "extract_ips", "forward_ips", "ratio",
                   "data_wait_s", "model_s", "write_s", "hash_s", "total_s"},
    "handloop": {"method", "rep", "images", "batch_size", "workers", "ips", "seconds", "speedup"},
    "batch_workers": {"backbone", "rep", "batch_size", "workers", "images", "ips", "default"},
    "refit": {"phase", "wall_s", "extract_s", "hash_s", "files_hashed", "head_fit_s", "ratio"},
    "incremental": {"phase", "files", "wall_s", "new", "cached", "files_hashed", "ratio"},
    "sweep": {"method", "fits", "seconds", "C", "val_accuracy", "test_accuracy", "ratio"},
    "accuracy": {"features", "head", "accuracy", "macro_f1", "ece", "n_train", "n_test"},
    "memory": {"run", "inputs", "dtype", "peak_rss_mb", "bytes_per_row", "test_accuracy", "ratio"},
    "photos": {"measure", "config", "decode", "rep", "images", "ms_per_image", "ips", "ratio", "decode_threads",
               "data_wait_s", "model_s", "max_abs", "mean_abs", "min_cosine"},
    "runtime": {"backbone", "runtime", "rep", "images", "batch_size", "extract_ips", "forward_ips", "ratio", "speedup",
                "predict_ips", "predict_speedup", "setup_s", "data_wait_s", "model_s"},
    "ray": {"engine", "images", "wall_s", "start_s", "job_s", "actors", "ips", "crossover", "estimate_wall_h",
            "decode_s_per_image", "hash_s_per_image"},
    "shift": {"phase", "item", "statistic", "p_value", "accuracy", "seconds", "ratio", "champion_score",
              "challenger_score"},
    "serve": {"backbone", "batching", "rep", "max_batch", "clients", "requests", "failed", "rps", "p50_ms", "p99_ms",
              "mean_batch", "ratio"},
}
TOY = ["--scale", "tiny", "--backbone", TINY, "--speed-backbone", TINY]


def _snapshot(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(PYTHONUNBUFFERED="1", **(env or {})))  # this checkout


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One tiny run of every benchmark, on generated images, into a temporary folder."""
    tmp = tmp_path_factory.mktemp("bench")
    before = _snapshot(BENCH / "results"), _snapshot(BENCH / "README.md")
    proc = _run([BENCH / "run_all.py", *TOY, "--data", "generated", "--out", tmp / "results", "--work", tmp / "work"],
                env={"PROBE_TUNING_FILE": str(tmp / "machine-tuning.json")})  # module scope: before conftest's
    after = _snapshot(BENCH / "results"), _snapshot(BENCH / "README.md")
    return proc, tmp / "results", before, after


@pytest.mark.slow
def test_run_all_writes_every_result_file(toy_run):
    proc, out, _, _ = toy_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, columns in COLUMNS.items():
        rows = _rows(out / f"{name}.csv")
        assert rows, name
        missing = (columns | MACHINE) - set(rows[0])
        assert not missing, f"{name}.csv lacks columns {sorted(missing)}"
        assert {r["data"] for r in rows} == {"generated"}
    run = json.loads((out / "run.json").read_text())
    assert set(run["benchmarks"]) == {"throughput", "handloop", "refit", "incremental", "sweep", "accuracy", "memory",
                                      "photos", "runtime", "ray", "shift", "serve"}
    assert not [name for name, s in run["benchmarks"].items() if "error" in s]


@pytest.mark.slow
def test_run_all_rows_are_complete(toy_run):
    _, out, _, _ = toy_run
    grid = _rows(out / "batch_workers.csv")
    assert {(r["batch_size"], r["workers"]) for r in grid if r["workers"] != "forward only"} == {
        (str(b), str(w)) for b in (1, 4, 8, 16, 32) for w in (0, 1, 2)}
    assert len({(r["batch_size"], r["workers"]) for r in grid if r["default"] == "yes"}) == 1
    accuracy = _rows(out / "accuracy.csv")
    assert [(r["features"], r["head"]) for r in accuracy] == [
        (TINY, "logreg"), (TINY, "linear-svm"), (TINY, "ridge"), (TINY, "knn"), ("raw pixels", "logreg")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in accuracy)
    refit = _rows(out / "refit.csv")
    assert all(r["files_hashed"] == "0" for r in refit if r["phase"] == "hash: memo hit")
    assert any(int(r["files_hashed"]) > 0 for r in refit if r["phase"] == "hash: fresh memo")
    memory = _rows(out / "memory.csv")
    assert {r["dtype"] for r in memory if r["run"].startswith("extract")} == {"float32", "float16"}
    photos = _rows(out / "photos.csv")
    medians = [r for r in photos if r["rep"] == "median"]
    assert {r["decode"] for r in medians if r["measure"] == "decode"} == {"exact", "reduced"}
    assert len([r for r in medians if r["measure"] == "extract" and r["default"] == "yes"]) == 1
    assert all(int(r["new"]) == int(r["images"]) == 6 for r in photos if r["measure"] == "extract")
    reduced = next(r for r in medians if r["measure"] == "decode" and r["decode"] == "reduced")
    assert float(reduced["min_cosine"]) > 0.9 and float(reduced["mean_abs"]) < 5
    ray = _rows(out / "ray.csv")
    assert [(r["engine"], r["images"]) for r in ray if r["engine"] in ("local", "ray")] == [("local", "8"), ("ray", "8")]
    assert all(r["new"] == "8" for r in ray if r["engine"] in ("local", "ray"))
    assert [r["workers"] for r in ray if r["engine"] == "estimate"] == ["1", "8", "64"]
    assert len([r for r in ray if r["engine"] == "crossover"]) == 1
    shift = _rows(out / "shift.csv")
    assert {r["phase"] for r in shift} >= {"drift: no shift", "drift: shift", "gate", "accuracy on shifted test",
                                           "time", "ratio"}
    assert {r["item"] for r in shift if r["phase"] == "drift: shift"} == {
        "mmd", "classifier", "predicted_labels", "confidence"}
    assert all(0.0 < float(r["p_value"]) <= 1.0 for r in shift if r["phase"].startswith("drift"))
    assert next(r for r in shift if r["phase"] == "gate")["item"] in ("promoted", "rejected", "no-drift")
    serve = _rows(out / "serve.csv")
    assert {(r["batching"], r["clients"]) for r in serve} == {
        (b, str(c)) for b in ("on", "off", "ratio on / off") for c in (1, 8, 32)}
    assert all(r["failed"] == "0" and int(r["requests"]) > 0 for r in serve if r["batching"] in ("on", "off"))


@pytest.mark.slow
def test_run_all_builds_readme_and_plot(toy_run):
    _, out, _, _ = toy_run
    readme = (out / "README.md").read_text()
    for title in ("1. Extraction throughput", "2. probe.extract vs the hand-written loop", "3. Refit from cache",
                  "4. Incremental extraction", "5. Regularization sweep", "6. Linear-probe accuracy",
                  "7. Memory and storage", "8. Camera-sized JPEGs", "9. Inference runtimes", "10. Distributed extraction",
                  "11. Data shift", "12. Serving: dynamic batching", "## Summary"):
        assert title in readme
    assert "failed in the last run" not in readme
    assert (out / "throughput_vs_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_toy_run_leaves_committed_results_alone(toy_run):
    _, _, before, after = toy_run
    assert before == after


@pytest.mark.slow
def test_report_rebuilds_readme_from_result_files(toy_run, tmp_path):
    _, out, _, _ = toy_run
    readme = tmp_path / "README.md"
    proc = _run([BENCH / "report.py", "--out", out, "--readme", readme], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 5. Regularization sweep" in readme.read_text()


@pytest.mark.slow
def test_script_runs_alone_and_falls_back_to_generated_images(tmp_path):
    """A benchmark script on its own; ``--data auto`` without Fashion-MNIST uses generated images."""
    empty = tmp_path / "no-fashion-mnist"
    empty.mkdir()
    proc = _run([BENCH / "bench_incremental.py", *TOY, "--data", "auto", "--out", tmp_path / "results",
                 "--work", tmp_path / "work"], env={"PROBE_FASHION_MNIST": str(empty)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "results" / "incremental.csv")
    assert {r["data"] for r in rows} == {"generated"}
    assert (COLUMNS["incremental"] | MACHINE) <= set(rows[0])
    ratio = next(r for r in rows if r["phase"].startswith("ratio"))
    assert 0 < float(ratio["ratio"])


def test_project_readme_results_match_the_result_files():
    """README.md's results table is generated from benchmarks/results/ (report.update_project_readme)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import report

    readme = (REPO_ROOT / "README.md").read_text()
    assert report.results_block() in readme
    assert "| 1 throughput |" in report.results_block()
