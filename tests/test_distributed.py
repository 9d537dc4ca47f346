"""The Ray Data engine (probe/distributed.py): the same cache as the local engine, resumable, fault tolerant.

One local Ray (2 CPUs, small object store, no dashboard) is shared by the whole module to keep it fast. Skipped
only when the [ray] extra is not installed.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, invoke, make_image, make_image_folder

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install 'probe[ray]')")
pytest.importorskip("ray.data", reason="the [ray] extra is not installed (pip install 'probe[ray]')")

from probe.cache import FeatureCache  # noqa: E402
from probe.distributed import RayExtractor  # noqa: E402
from probe.engine import Extractor  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.ray_workers import CRASH_ONCE_ENV, CacheSink, keys_digest  # noqa: E402
from probe.sources import MEMO_FILE, HashMemo, Record, resolve, sha256_file  # noqa: E402

JOB_TIMEOUT = 240  # seconds: a hung job fails the test instead of hanging the suite


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """40 distinct generated images in three class folders."""
    root = make_image_folder(tmp_path_factory.mktemp("ray") / "images", per_class=13)
    make_image(root / "cat" / "extra.png", seed=999)
    return root


def run_bounded(fn, timeout: float = JOB_TIMEOUT):
    """Run ``fn()`` in a daemon thread; fail (rather than hang) when it takes longer than ``timeout``."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the Ray job did not finish within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def extract_ray(source, cache, **options):
    return run_bounded(lambda: RayExtractor(TINY, cache, **options).extract(resolve(source)))


def segments(cache) -> list[str]:
    return sorted(p.name for p in Path(cache).glob("spaces/*/segments/seg-*.h5"))


@pytest.fixture(scope="module")
def ray_run(local_ray, images, tmp_path_factory):
    """A run on 15 of the images (a partial run) whose backbone actor is killed on its first batch, then the
    rerun on all 40 into the same cache: (partial FeatureSet, full FeatureSet, cache, crash marker)."""
    root = tmp_path_factory.mktemp("ray-cache")
    cache, marker = root / "cache", root / "crashed"
    os.environ[CRASH_ONCE_ENV] = str(marker)  # forwarded to this job's workers by the driver
    try:
        partial = extract_ray([r.path for r in resolve(images)][:15], cache)
    finally:
        del os.environ[CRASH_ONCE_ENV]
    return partial, extract_ray(images, cache), cache, marker


def test_a_worker_killed_once_is_restarted_and_the_run_completes(ray_run):
    partial, _, cache, marker = ray_run
    assert marker.exists()  # an actor really died (os._exit) on its first batch
    assert (partial.stats.new, partial.stats.failed) == (15, 0)
    report = FeatureCache(cache).open(partial.space, create=False).verify()
    assert report.ok and report.rows == report.unique_rows == 40  # nothing lost, nothing written twice


def test_rerun_after_a_partial_run_extracts_only_the_rest(ray_run):
    partial, fs, _, _ = ray_run
    assert (partial.stats.new, partial.stats.cached) == (15, 0)
    assert (fs.stats.new, fs.stats.cached) == (25, 15)


def test_ray_cache_equals_the_local_engines_row_for_row(ray_run, images, tmp_path):
    _, fs, cache, _ = ray_run
    local = Extractor(TINY, tmp_path / "local", progress=False).extract(resolve(images))
    assert len(fs) == len(local) == 40 and not fs.failures
    assert fs.space == local.space and fs.space.id == local.space.id
    assert fs.keys == local.keys and fs.paths == local.paths and fs.labels == local.labels
    ray_store = FeatureCache(cache).open(fs.space, create=False)
    local_store = FeatureCache(tmp_path / "local").open(local.space, create=False)
    assert sorted(ray_store.keys()) == sorted(local_store.keys())
    np.testing.assert_allclose(ray_store.get(local.keys), local_store.get(local.keys), rtol=1e-5, atol=1e-6)
    names = segments(cache)
    assert len(names) > 1 and all("-ray-" in n for n in names)  # several blocks, content-named segments
    report = ray_store.verify()
    assert report.ok and report.rows == report.unique_rows == 40


def test_second_run_extracts_nothing(ray_run, images):
    _, fs, cache, _ = ray_run
    before = segments(cache)
    again = extract_ray(images, cache)
    assert (again.stats.new, again.stats.cached, again.stats.model_batches) == (0, 40, 0)
    assert again.stats.files_hashed == 0  # the driver's hash memo answered
    on_cluster = extract_ray(images, cache, hash_on_cluster=1)  # cluster tasks answer from the same memo rows
    assert (on_cluster.stats.files_hashed, on_cluster.stats.new, on_cluster.keys) == (0, 0, fs.keys)
    assert segments(cache) == before
    np.testing.assert_array_equal(again.features, fs.features)


def test_corrupt_inputs_are_reported_and_do_not_hang_the_job(local_ray, tmp_path, monkeypatch):
    """Also: relative paths work although the workers' working directory is not the driver's (as on a cluster),
    and files are hashed by cluster tasks (hash_on_cluster=1) with the same keys, errors and memo rows."""
    folder = tmp_path / "in"
    for i in range(5):
        make_image(folder / f"ok_{i}.png", seed=i)
    (folder / "notes.jpg").write_text("not an image\n")
    (folder / "truncated.png").write_bytes(make_image(tmp_path / "whole.png", seed=7, size=(64, 64)).read_bytes()[:200])
    (folder / "notes_copy.jpg").write_text("not an image\n")
    monkeypatch.chdir(tmp_path)  # the local Ray's workers keep the directory the cluster started in
    records = [*resolve("in"), Record("in/missing.png")]
    fs = run_bounded(lambda: RayExtractor(TINY, "cache", hash_on_cluster=1).extract(records))
    assert {f.path for f in fs.failures} == {"in/notes.jpg", "in/truncated.png", "in/notes_copy.jpg",
                                             "in/missing.png"}
    assert fs.failures[-1].error.startswith("in/missing.png: cannot read (")
    assert fs.stats.files_hashed == 8
    assert fs.keys == [sha256_file(p) for p in fs.paths]
    memo = HashMemo(tmp_path / "cache" / MEMO_FILE)
    assert len(memo.lookup([str(tmp_path / r.path) for r in records])) == 8
    memo.close()
    failed = {Path(f.path).name: f.error for f in fs.failures}
    assert failed["notes.jpg"].startswith("in/notes.jpg: ") and failed["truncated.png"].startswith("in/truncated.png")
    assert failed["notes_copy.jpg"] == "same bytes as an input that failed to decode"
    assert fs.stats.new == 5 and len(fs) == 5


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_gpu_actors_on_a_cluster_without_gpus_fail_at_once(local_ray, images, tmp_path, amp):
    ex = RayExtractor(TINY, tmp_path / "cache", num_gpus_per_worker=1, amp=amp)
    with pytest.raises(ProbeError, match=r"^num_gpus_per_worker=1, but the Ray cluster has 0 GPUs$"):
        run_bounded(lambda: ex.extract(resolve(images)), timeout=60)


def test_a_retried_write_does_not_publish_the_same_rows_twice(local_ray, tmp_path):
    import pyarrow as pa

    space = Extractor(TINY, tmp_path / "cache", progress=False).space
    store = FeatureCache(tmp_path / "cache").open(space)
    keys = [f"{i:064x}" for i in range(3)]
    block = pa.table({"index": [0, 1, 2], "path": ["a", "b", "c"], "key": keys, "error": ["", "", ""],
                      "features": list(np.ones((3, space.dim), np.float32)), "batch": ["b1"] * 3})
    sink = CacheSink(str(store.path), space.to_dict(), {})
    first = sink.write([block], None)
    retry = sink.write([block], None)
    assert first["segment"].endswith(f"-ray-{keys_digest(keys)}.h5") and not first["skipped"]
    assert retry == {**first, "skipped": True}
    assert segments(tmp_path / "cache") == [first["segment"]]
    assert sink.write([pa.table({})], None)["segment"] is None  # an empty block arrives without columns


def test_cli_extract_engine_ray(ray_run, images, tmp_path):
    """The CLI reaches the Ray engine (a job through the CLI runs in the batch-scoring test below)."""
    _, fs, cache, _ = ray_run
    res = run_bounded(lambda: invoke("extract", images, "--engine", "ray", "-b", TINY, "--cache", cache,
                                     "--report", tmp_path / "report.json"))
    assert f"space {fs.space.id}" in res.output and "0 new, 40 cached, 0 failed" in res.output
    assert '"cached": 40' in (tmp_path / "report.json").read_text()


def test_cli_rejects_engine_options_that_do_not_apply(tmp_path):
    res = invoke("extract", tmp_path, "--address", "auto", "-b", TINY, expect=2)
    assert "--address apply only to --engine ray" in res.output
    res = invoke("extract", tmp_path, "--engine", "ray", "--device", "cpu", "-b", TINY, expect=1)
    assert res.output.strip() == (
        "Error: device and workers do not apply to the Ray engine (use num_gpus_per_worker, actors)")


def test_engine_ray_without_the_extra_says_how_to_install_it(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    res = invoke("extract", images, "--engine", "ray", "-b", TINY, "--cache", tmp_path / "c", expect=1)
    assert res.output.strip() == "Error: --engine ray needs Ray Data: pip install 'probe[ray]'"
    assert not (tmp_path / "c").exists()



@pytest.fixture(scope="module")
def model_path(ray_run, images, tmp_path_factory):
    """A model trained (local engine) on the features the Ray run cached: same space, nothing to extract."""
    import probe

    out = tmp_path_factory.mktemp("ray-model") / "model.probe"
    res = probe.fit(images, backbone=TINY, cache=ray_run[2], value=1.0, output=out)
    assert res.metrics["inputs_extracted"] == 0
    return res.path


def test_batch_scoring_writes_blocks_and_a_manifest_and_resumes(local_ray, images, model_path, tmp_path):
    import json

    from probe.model import load
    from probe.prediction import predict, write_predictions

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ("predict", model_path, images, "--engine", "ray", "-o", out, "--block-rows", 16, "--cache", cache)
    res = run_bounded(lambda: invoke(*args))
    assert "3 blocks: 3 written, 0 already there; 0 inputs failed" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    files = [b["file"] for b in manifest["blocks"]]
    assert [(b["first_index"], b["inputs"], b["failed"]) for b in manifest["blocks"]] == [(0, 16, 0), (16, 16, 0),
                                                                                         (32, 8, 0)]
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["manifest.json"])
    # The blocks, in order, hold exactly the rows a local `probe predict` gives.
    local = predict(load(model_path), images, cache=cache)
    buf = io.StringIO()
    write_predictions(local, buf)
    header, *rows = buf.getvalue().splitlines()
    got = [line for f in files for line in (out / f).read_text().splitlines()[1:]]
    assert got == rows and all((out / f).read_text().splitlines()[0] == header for f in files)
    # A rerun writes nothing; a lost block is written again, alone, without extracting anything.
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    res = invoke(*args)
    assert "3 blocks: 0 written, 3 already there" in res.output
    (out / files[1]).unlink()
    res = run_bounded(lambda: invoke(*args))
    assert "3 blocks: 1 written, 2 already there" in res.output
    assert (out / files[1]).read_text().splitlines()[1:] == rows[16:32]
    assert {f: (out / f).stat().st_mtime_ns for f in (files[0], files[2])} == {f: stamps[f] for f in (files[0], files[2])}


def test_batch_scoring_needs_an_output_folder(model_path, images):
    res = invoke("predict", model_path, images, "--engine", "ray", expect=2)
    assert "give -o DIR" in res.output
    res = invoke("predict", model_path, images, "--block-rows", 5, expect=2)
    assert "--block-rows apply only to --engine ray" in res.output
