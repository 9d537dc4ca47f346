"""The extraction engine (probe/engine.py): batching, content-addressed reuse, crash safety, bad inputs, GPU/AMP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, TINY, invoke, make_image, make_image_folder, probe_command, subprocess_env
from probe.cache import FeatureCache
from probe.engine import Extractor, extract, pil_key, resolve_device, resolve_precision
from probe.featureset import write_run_report
from probe.errors import CacheMismatchError, ProbeError, StrictModeError
from probe.sources import resolve


CPU = dict(device="cpu", workers=0, progress=False)
CPU_ARGS = ("--device", "cpu", "--workers", 0, "--no-progress")


def tiny(cache, **kw) -> Extractor:
    """The tiny test backbone on the CPU (also on a machine with a GPU: these tests compare exact values)."""
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 4)
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return Extractor(TINY, cache, **kw)


class ForwardCounter:
    """Counts forward passes of a module (a forward hook), to check the model really did not run."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        self.handle.remove()


def by_key(fs) -> dict[str, np.ndarray]:
    return dict(zip(fs.keys, fs.features))


# -- 1. batching does not change features --------------------------------------------------------------------


def test_batched_extraction_equals_one_at_a_time(image_folder, tmp_path):
    records = resolve(image_folder)
    batched = tiny(tmp_path / "c8", batch_size=8).extract(records)
    single = tiny(tmp_path / "c1", batch_size=1).extract(records)
    assert batched.stats.model_batches == 3 and single.stats.model_batches == 24
    assert batched.keys == single.keys and len(batched) == 24
    np.testing.assert_allclose(batched.features, single.features, rtol=1e-5, atol=1e-6)
    # ... and both equal the backbone applied directly to one preprocessed image.
    ex = tiny(None)
    x = ex.backbone.preprocess(Image.open(records[5].path).convert("RGB"))
    with torch.inference_mode():
        direct = ex.backbone.features(torch.from_numpy(x)[None]).numpy()[0]
    np.testing.assert_allclose(batched.features[5], direct, rtol=1e-5, atol=1e-6)


def test_features_are_aligned_with_inputs(image_folder, cache_dir):
    fs = extract(image_folder, TINY, cache_dir, batch_size=5, **CPU)
    records = resolve(image_folder)
    assert fs.paths == [r.path for r in records]
    assert list(fs.y) == [r.label for r in records]
    assert fs.indices == list(range(24))
    assert fs.features.shape == (24, 32) and fs.features.dtype == np.float32
    assert fs.space.backbone == TINY and fs.space.dim == 32
    # Reversed input order gives the same features, reversed.
    rev = tiny(cache_dir).extract(list(reversed(records)))
    np.testing.assert_array_equal(rev.features, fs.features[::-1])


def test_worker_processes_give_the_same_features(image_folder, tmp_path):
    records = resolve(image_folder)[:10]
    inline = tiny(tmp_path / "a", workers=0).extract(records)
    workers = tiny(tmp_path / "b", workers=2).extract(records)
    assert workers.stats.workers == 2
    np.testing.assert_allclose(workers.features, inline.features, rtol=1e-6, atol=1e-7)


# -- 2. content addressing -----------------------------------------------------------------------------------


def test_same_bytes_under_two_paths_is_one_row(image_folder, tmp_path, cache_dir):
    src = image_folder / "cat" / "cat_000.png"
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    ex = tiny(cache_dir)
    fs = ex.extract(resolve([image_folder, copy]))
    assert fs.stats.inputs == 25 and fs.stats.unique == 24 and fs.stats.new == 24
    assert len(ex.store) == 24
    assert len(fs) == 25 and fs.keys[0] == fs.keys[-1]
    np.testing.assert_array_equal(fs.features[0], fs.features[-1])
    assert ex.store.verify().rows == 24


def test_editing_one_file_adds_exactly_one_row(image_folder, cache_dir):
    first = tiny(cache_dir).extract(resolve(image_folder))
    edited = image_folder / "dog" / "dog_003.png"
    make_image(edited, seed=4242)
    ex = tiny(cache_dir)
    counter = ForwardCounter(ex.backbone.module)
    second = ex.extract(resolve(image_folder))
    counter.remove()
    assert (second.stats.new, second.stats.cached, second.stats.files_hashed) == (1, 23, 1)
    assert second.stats.model_batches == 1 and counter.calls == 1
    assert len(ex.store) == 25  # the old row stays (append-only); it is simply no longer asked for
    i = second.paths.index(str(edited))
    assert second.keys[i] != first.keys[i]
    assert not np.allclose(second.features[i], first.features[i])
    same = [j for j in range(24) if j != i]
    np.testing.assert_array_equal(second.features[same], first.features[same])


def test_rerun_of_a_finished_extraction_runs_no_model_and_reads_no_file(image_folder, cache_dir):
    first = tiny(cache_dir).extract(resolve(image_folder))
    assert first.stats.new == 24 and first.stats.files_hashed == 24
    for ex in (tiny(cache_dir), tiny(cache_dir, batch_size=1)):  # a fresh process would build a new Extractor
        counter = ForwardCounter(ex.backbone.module)
        again = ex.extract(resolve(image_folder))
        again.features  # noqa: B018 - loading features from the cache must not need the model either
        counter.remove()
        assert again.stats.model_batches == 0 and again.stats.new == 0 and counter.calls == 0
        assert again.stats.cached == 24 and again.stats.files_hashed == 0
        np.testing.assert_array_equal(again.features, first.features)


def test_touching_mtime_rehashes_but_adds_no_row(image_folder, cache_dir):
    tiny(cache_dir).extract(resolve(image_folder))
    touched = image_folder / "fish" / "fish_001.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    ex = tiny(cache_dir)
    again = ex.extract(resolve(image_folder))
    assert again.stats.files_hashed == 1
    assert again.stats.new == 0 and again.stats.model_batches == 0
    assert len(ex.store) == 24 and len(ex.store.segment_files()) == 1


def test_in_memory_images_are_keyed_by_pixels(cache_dir, tmp_path):
    a = Image.fromarray(np.full((20, 30, 3), 90, np.uint8))
    b = a.copy()
    path = tmp_path / "a.png"
    a.save(path)
    ex = tiny(cache_dir)
    fs = ex.extract([a, b, path])
    assert fs.keys[0] == fs.keys[1] == pil_key(a) != fs.keys[2]
    assert fs.paths[:2] == ["<image>", "<image>"]
    assert fs.stats.unique == 2 and len(ex.store) == 2
    np.testing.assert_allclose(fs.features[0], fs.features[2], rtol=1e-5, atol=1e-6)  # same pixels


# -- 3. crash safety -----------------------------------------------------------------------------------------


def test_sigkill_mid_extraction_then_rerun_equals_an_uninterrupted_run(tmp_path):
    # 300 images written 4 rows per segment, 2 per batch: the run is killed long before it finishes.
    n = 300
    folder = make_image_folder(tmp_path / "many", per_class=n // 3)
    killed_cache = tmp_path / "killed"
    proc = subprocess.Popen(
        probe_command("extract", folder, "-b", TINY, "--cache", killed_cache, "--segment-rows", 4,
                      "--batch-size", 2, "--workers", 0, "--no-progress", "--device", "cpu"),
        env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(killed_cache.glob("spaces/*/segments/seg-*.h5")):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)  # no-op if it already exited: then the assertion below fails
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way (exit {proc.returncode}): {err}"

    # After the kill: only complete segments are visible, and the cache verifies.
    (space_dir,) = (killed_cache / "spaces").iterdir()
    store = FeatureCache(killed_cache).open_path(space_dir)
    survived = len(store)
    assert 0 < survived < n and survived % 4 == 0
    assert store.verify().ok
    store.close()
    invoke("cache", "verify", "--cache", killed_cache)

    # Rerun: extracts exactly the missing rows (batch size does not change features; see the batching test).
    report = tmp_path / "rerun.json"
    invoke("extract", folder, "-b", TINY, "--cache", killed_cache, "--batch-size", 16, *CPU_ARGS,
           "--report", report)
    stats = json.loads(report.read_text())["stats"]
    assert (stats["cached"], stats["new"], stats["failed"]) == (survived, n - survived, 0)

    reference = extract(folder, TINY, tmp_path / "reference", batch_size=16, **CPU)
    store = FeatureCache(killed_cache).open_path(space_dir)
    assert store.space == reference.space
    assert sorted(store.keys()) == sorted(reference.keys) and len(store) == n
    np.testing.assert_allclose(store.get(reference.keys), reference.features, rtol=1e-5, atol=1e-6)
    verified = store.verify()
    assert verified.ok and verified.rows == verified.unique_rows == n  # no row written twice
    store.close()
    invoke("cache", "verify", "--cache", killed_cache)

    # compact removes whatever the killed process left half-written, and keeps every value.
    invoke("cache", "compact", "--cache", killed_cache)
    assert not list(space_dir.glob("segments/.tmp-*"))
    store = FeatureCache(killed_cache).open_path(space_dir)
    np.testing.assert_allclose(store.get(reference.keys), reference.features, rtol=1e-5, atol=1e-6)
    store.close()


# -- 4. the feature space guards the cache -------------------------------------------------------------------


def test_options_that_change_features_change_the_space(cache_dir):
    base = tiny(cache_dir)
    f16 = tiny(cache_dir, dtype="float16")
    layer = tiny(cache_dir, layer="conv1", pooling="max")
    ids = {base.space.id, f16.space.id, layer.space.id}
    assert len(ids) == 3
    assert {p.name for p in (cache_dir / "spaces").iterdir()} == ids
    assert f16.store.space.dtype == "float16"


def test_decode_option_is_its_own_space_and_png_features_do_not_change(image_folder, cache_dir):
    records = resolve(image_folder)[:6]
    exact = tiny(cache_dir)
    reduced = tiny(cache_dir, decode="reduced")
    assert exact.backbone.preprocess.decode == "exact" and "decode" not in exact.space.preprocess
    assert reduced.space.preprocess["decode"] == "reduced" and reduced.space.id != exact.space.id
    a, b = exact.extract(records), reduced.extract(records)
    assert b.stats.new == 6  # never answered from the exact space
    np.testing.assert_array_equal(a.features, b.features)  # PNGs decode bitwise the same either way
    with pytest.raises(ValueError, match="decode='fast'"):
        tiny(cache_dir, decode="fast")


def test_cli_decode_option_and_the_model_decodes_as_it_was_trained(image_folder, tmp_path):
    from probe.model import load

    cache = tmp_path / "cache"
    out = invoke("extract", image_folder, "--backbone", TINY, "--cache", cache, "--decode", "reduced", *CPU_ARGS)
    (space_json,) = (cache / "spaces").glob("*/space.json")
    assert json.loads(space_json.read_text())["preprocess"]["decode"] == "reduced"
    assert "24 new" in out.output
    invoke("fit", image_folder, "--backbone", TINY, "--cache", cache, "--decode", "reduced", "--C", 1,
           "--val-split", 0, "-o", tmp_path / "m.probe", *CPU_ARGS)
    model = load(tmp_path / "m.probe")
    assert model.backbone_["preprocess"]["decode"] == "reduced"
    ex = model.extractor(cache, device="cpu", progress=False)
    assert ex.backbone.preprocess.decode == "reduced" and ex.space.digest == model.backbone_["space_digest"]
    fs = model.features(resolve(image_folder)[:3], cache=cache, device="cpu", progress=False)
    assert fs.stats.cached == 3 and fs.stats.new == 0  # read from the reduced space it was trained on


def test_a_model_trained_with_exact_decoding_keeps_it_when_the_default_changes(image_folder, tmp_path,
                                                                               monkeypatch):
    import dataclasses

    from probe import backbones
    from probe.model import load

    records = resolve(image_folder)
    invoke("fit", image_folder, "--backbone", TINY, "--cache", tmp_path / "cache", "--C", 1, "--val-split", 0,
           "-o", tmp_path / "m.probe", *CPU_ARGS)
    model = load(tmp_path / "m.probe")
    assert "decode" not in model.backbone_["preprocess"]  # as models saved before the field existed
    spec = backbones._REGISTRY[TINY]

    def build_reduced(weights):
        net, pre, digest, path = spec.build(weights)
        return net, dataclasses.replace(pre, decode="reduced"), digest, path

    monkeypatch.setitem(backbones._REGISTRY, TINY, dataclasses.replace(spec, build=build_reduced))
    assert backbones.load_backbone(TINY).preprocess.decode == "reduced"
    fs = model.features(records, cache=tmp_path / "cache", device="cpu", progress=False)
    assert fs.stats.cached == len(records)  # still the exact space it was trained on
    assert model.extractor(tmp_path / "cache", device="cpu", progress=False).backbone.preprocess.decode == "exact"


def test_pretrained_backbones_default_to_reduced_decoding():
    from probe.backbones import DEFAULT_DECODE, _tv_preprocess, _tv_weights_enum

    assert DEFAULT_DECODE == "reduced"
    assert _tv_preprocess(_tv_weights_enum("resnet18")).decode == "reduced"
    assert Extractor(TINY, None).backbone.preprocess.decode == "exact"  # the test backbone decodes exactly


def test_float16_cache_round_trips(image_folder, tmp_path):
    records = resolve(image_folder)[:6]
    f32 = tiny(tmp_path / "a").extract(records)
    f16 = tiny(tmp_path / "b", dtype="float16").extract(records)
    np.testing.assert_allclose(f16.features, f32.features, rtol=2e-3, atol=1e-3)
    assert f16.store.verify().ok


def test_foreign_segment_stops_extraction(image_folder, tmp_path):
    records = resolve(image_folder)[:4]
    ex = tiny(tmp_path / "cache")
    ex.extract(records)
    other = tiny(tmp_path / "cache", layer="conv1")  # another space in the same cache
    seg = ex.store.segment_files()[0]
    shutil.copy(seg, other.store.segments_dir / seg.name)
    with pytest.raises(CacheMismatchError) as info:
        tiny(tmp_path / "cache", layer="conv1").extract(records)
    assert info.value.field == "layer"
    result = invoke("extract", image_folder, "-b", TINY, "--layer", "conv1", "--cache", tmp_path / "cache",
                    "--batch-size", 4, *CPU_ARGS, expect=1)
    assert "layer" in result.output and "Traceback" not in result.output


# -- 5. bad inputs -------------------------------------------------------------------------------------------


def test_bad_files_are_reported_and_never_cached(bad_files, cache_dir):
    ex = tiny(cache_dir, max_pixels=bad_files.max_pixels)
    records = resolve(bad_files.dir)
    fs = ex.extract(records)
    failed = {Path(f.path).name for f in fs.failures}
    assert failed == set(bad_files.bad)
    assert {Path(p).name for p in fs.paths} == set(bad_files.good)
    for f in fs.failures:
        assert f.path in f.error
        assert records[f.index].path == f.path
    assert fs.stats.failed == len(bad_files.bad) and fs.stats.new == len(bad_files.good)
    assert len(ex.store) == len(bad_files.good)
    assert np.isfinite(fs.features).all()
    # Nothing bad was cached, so a rerun tries the bad ones again (and fails the same way) and nothing else.
    again = ex.extract(records)
    assert {Path(f.path).name for f in again.failures} == failed
    assert again.stats.new == 0 and again.stats.cached == len(bad_files.good)


def test_duplicates_of_a_bad_file_fail_too(bad_files, cache_dir, tmp_path):
    twin = tmp_path / "twin.png"
    shutil.copy(bad_files.bad["truncated.png"], twin)
    fs = tiny(cache_dir).extract([bad_files.bad["truncated.png"], twin, bad_files.good["one_pixel.png"]])
    assert [f.index for f in fs.failures] == [0, 1]
    assert "truncated" in fs.failures[0].error and "same bytes" in fs.failures[1].error
    assert fs.indices == [2]


def test_strict_raises_after_keeping_the_good_rows(bad_files, cache_dir):
    ex = tiny(cache_dir, max_pixels=bad_files.max_pixels)
    with pytest.raises(StrictModeError, match=f"{len(bad_files.bad)} of {len(bad_files.all)} inputs failed"):
        ex.extract(resolve(bad_files.dir), strict=True)
    assert len(ex.store) == len(bad_files.good)


def test_cli_bad_files_exit_codes_and_report(bad_files, cache_dir, tmp_path):
    args = ["extract", bad_files.dir, "-b", TINY, "--cache", cache_dir, "--max-pixels", bad_files.max_pixels,
            "--batch-size", 4, *CPU_ARGS]
    result = invoke(*args)
    for name in bad_files.bad:
        assert f"failed: {bad_files.bad[name]}" in result.output
    default_report = json.loads((cache_dir / "last-extract.json").read_text())
    assert {Path(f["path"]).name for f in default_report["failures"]} == set(bad_files.bad)

    report_path = tmp_path / "reports" / "run.json"
    result = invoke(*args, "--strict", "--report", report_path, expect=1)
    assert "--strict" in result.output and "Traceback" not in result.output
    report = json.loads(report_path.read_text())
    assert report["backbone"] == TINY and len(report["space"]) == 16
    assert {Path(f["path"]).name for f in report["failures"]} == set(bad_files.bad)
    assert all(f["path"] in f["error"] for f in report["failures"])
    assert report["stats"]["failed"] == len(bad_files.bad) and report["stats"]["cached"] == len(bad_files.good)
    (store,) = FeatureCache(cache_dir).stores()
    assert len(store) == len(bad_files.good)
    store.close()


# -- modes of the engine -------------------------------------------------------------------------------------


def test_write_false_computes_in_memory_and_writes_nothing(image_folder, tmp_path):
    cache = tmp_path / "never-created"
    fs = tiny(cache, write=False).extract(resolve(image_folder)[:5])
    assert fs.features.shape == (5, 32) and fs.stats.new == 5
    assert not cache.exists()
    # With an existing cache: cached rows are read, new ones stay in memory.
    records = resolve(image_folder)
    tiny(tmp_path / "c").extract(records[:3])
    ex = tiny(tmp_path / "c", write=False)
    fs = ex.extract(records[:6])
    assert fs.stats.cached == 3 and fs.stats.new == 3
    assert len(ex.store) == 3
    ref = tiny(tmp_path / "d").extract(records[:6])
    np.testing.assert_allclose(fs.features, ref.features, rtol=1e-5, atol=1e-6)


def test_no_cache_at_all(image_folder):
    fs = tiny(None).extract(resolve(image_folder)[:3])
    assert fs.features.shape == (3, 32) and fs.store is None


def test_extract_missing_false_refuses_to_run_the_model(image_folder, cache_dir):
    records = resolve(image_folder)
    tiny(cache_dir).extract(records[:4])
    assert len(tiny(cache_dir).extract(records[:4], extract_missing=False)) == 4
    with pytest.raises(ProbeError, match="2 of 6 inputs are not in the cache"):
        tiny(cache_dir).extract(records[:6], extract_missing=False)


def test_unlabelled_inputs_have_no_y(tmp_path, cache_dir):
    make_image(tmp_path / "a.png", seed=0)
    fs = tiny(cache_dir).extract([tmp_path / "a.png"])
    assert fs.labels == [None]
    with pytest.raises(ProbeError, match="no label"):
        fs.y


def _fake_tuning(monkeypatch, threshold=64) -> list[int]:
    """Count tuning runs (batch sizes measured) instead of timing the model; batch 16 wins."""
    from probe import engine, tuning

    calls: list[int] = []
    monkeypatch.setattr(engine, "AUTOTUNE_MIN_INPUTS", threshold)
    monkeypatch.setattr(tuning, "measure_throughput",
                        lambda runner, bs, size: calls.append(bs) or {8: 50.0, 16: 80.0}.get(bs, 10.0))
    return calls


def test_batch_size_autotuning_is_remembered_per_machine(tmp_path, monkeypatch, machine_tuning_memo):
    from probe import tuning

    calls = _fake_tuning(monkeypatch)
    folder = make_image_folder(tmp_path / "imgs", per_class=22)  # 66 inputs: enough to tune (threshold 64)
    fs = extract(folder, TINY, tmp_path / "cache", **CPU)
    assert fs.stats.batch_size == 16 and calls == list(tuning.CPU_CANDIDATES) * tuning.ROUNDS
    assert tuning.memo_file() == machine_tuning_memo
    (entry,) = json.loads(machine_tuning_memo.read_text()).values()
    assert entry["batch_size"] == 16
    assert not (tmp_path / "cache" / "tuning.json").exists()  # per machine, not per cache folder
    calls.clear()
    # A second, empty cache folder on the same machine: no tuning run there.
    more = make_image_folder(tmp_path / "more", per_class=22, seed=50_000)
    fs = extract(more, TINY, tmp_path / "other-cache", **CPU)
    assert calls == [] and fs.stats.batch_size == 16 and fs.stats.new == 66
    assert fs.stats.seconds["tune"] < 1.0
    few = extract(folder, TINY, tmp_path / "cache", write=False, **CPU)
    assert few.stats.model_batches == 0  # fully cached: nothing to tune for
    assert extract(folder, TINY, tmp_path / "third", batch_size=3, **CPU).stats.batch_size == 3  # still overrides


def test_small_jobs_do_not_tune_but_use_what_the_machine_remembers(tmp_path, monkeypatch, machine_tuning_memo):
    from probe.engine import DEFAULT_CPU_BATCH

    calls = _fake_tuning(monkeypatch, threshold=10)
    small = make_image_folder(tmp_path / "small", per_class=2)  # 6 inputs: below the threshold
    fs = extract(small, TINY, tmp_path / "a", **CPU)
    assert calls == [] and fs.stats.batch_size == DEFAULT_CPU_BATCH and not machine_tuning_memo.exists()
    big = make_image_folder(tmp_path / "big", per_class=4, seed=777)  # 12 inputs: tunes, once
    assert extract(big, TINY, tmp_path / "b", **CPU).stats.batch_size == 16 and calls
    calls.clear()
    fs = extract(make_image_folder(tmp_path / "small2", per_class=2, seed=999), TINY, tmp_path / "c", **CPU)
    assert calls == [] and fs.stats.batch_size == 16


def test_a_cache_folders_old_tuning_memo_is_still_read(tmp_path, monkeypatch):
    from probe import tuning

    calls = _fake_tuning(monkeypatch, threshold=10)
    ex = tiny(tmp_path / "cache", batch_size=None)
    key = tuning.memo_key(ex.backbone, ex.device, ex.precision)
    (tmp_path / "cache" / "tuning.json").write_text(json.dumps({key: {"batch_size": 5}}))
    fs = ex.extract(resolve(make_image_folder(tmp_path / "imgs", per_class=4)))
    assert calls == [] and fs.stats.batch_size == 5


def test_an_unwritable_machine_memo_does_not_fail_the_run(tmp_path, monkeypatch):
    calls = _fake_tuning(monkeypatch, threshold=10)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PROBE_TUNING_FILE", str(blocker / "tuning.json"))  # its parent is a file
    fs = extract(make_image_folder(tmp_path / "imgs", per_class=4), TINY, tmp_path / "cache", **CPU)
    assert fs.stats.batch_size == 16 and calls and fs.stats.new == 12


def test_machine_memo_location(tmp_path, monkeypatch):
    import platformdirs

    from probe import tuning

    monkeypatch.setenv("PROBE_TUNING_FILE", str(tmp_path / "x.json"))
    monkeypatch.setenv("PROBE_HOME", str(tmp_path / "home"))
    assert tuning.memo_file() == tmp_path / "x.json"
    monkeypatch.delenv("PROBE_TUNING_FILE")
    assert tuning.memo_file() == tmp_path / "home" / "tuning.json"
    monkeypatch.delenv("PROBE_HOME")
    assert tuning.memo_file() == Path(platformdirs.user_cache_dir("probe")) / "tuning.json"


def test_device_and_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == "float32"
    assert resolve_precision("auto", cpu) == "float32"
    assert resolve_precision("off", cpu) == "float32"
    assert resolve_precision("bf16", cpu) == "bfloat16"
    assert resolve_precision("fp16", cpu) == "float16"
    with pytest.raises(ProbeError, match="amp='fp8'"):
        resolve_precision("fp8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device(None) == cpu
        with pytest.raises(ProbeError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ProbeError, match="batch_size=0"):
        Extractor(TINY, None, batch_size=0)


def test_write_run_report(image_folder, cache_dir, tmp_path):
    fs = tiny(cache_dir).extract(resolve(image_folder)[:2])
    path = write_run_report(tmp_path / "sub" / "r.json", fs)
    body = json.loads(path.read_text())
    assert body["space"] == fs.space.id and body["stats"]["new"] == 2 and body["failures"] == []
    assert set(body["stats"]["seconds"]) == {"hash", "tune", "data_wait", "model", "write", "total"}
    assert not list(path.parent.glob(".tmp-*"))


# -- GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_amp_features_are_close_to_cpu_float32(image_folder, tmp_path, workers):
    records = resolve(image_folder)
    cpu = tiny(tmp_path / "cpu", device="cpu", amp="off", batch_size=8, workers=workers).extract(records)
    ex = tiny(tmp_path / "gpu", device="cuda", batch_size=8, workers=workers)  # amp auto: bf16 (or fp16)
    gpu = ex.extract(records)  # pinned host memory + non_blocking copies on this path
    assert gpu.stats.device.startswith("cuda") and gpu.stats.model_batches == 3
    assert gpu.space.precision in ("bfloat16", "float16") and gpu.space.id != cpu.space.id
    assert gpu.keys == cpu.keys
    np.testing.assert_allclose(gpu.features, cpu.features, rtol=5e-2, atol=2e-2)
    fp32 = tiny(tmp_path / "gpu32", device="cuda", amp="off", batch_size=8, workers=workers).extract(records)
    np.testing.assert_allclose(fp32.features, cpu.features, rtol=1e-3, atol=1e-4)
    again = ex.extract(records)
    assert again.stats.model_batches == 0
    np.testing.assert_array_equal(again.features, gpu.features)
