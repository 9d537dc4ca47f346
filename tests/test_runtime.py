"""Inference runtimes (probe/runtime.py): equal features, the export cache, auto's memo, fallback, mixed spaces.

Tolerance (the one probe enforces, probe.runtime.COSINE_MIN / MAX_REL_DIFF): every row's cosine similarity to
eager PyTorch >= 0.9999 and max|a - b| / max|eager| <= 1e-3 (measured: ~1e-6 for every family here).
"""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY, invoke, make_image_folder
from probe import runtime as rt
from probe.backbones import Backbone, load_backbone, state_sha256
from probe.engine import Extractor
from probe.errors import ProbeError
from probe.preprocess import Preprocess
from probe.sources import resolve

CPU = dict(device="cpu", workers=0, progress=False)
COMPILED = [pytest.param(name, marks=pytest.mark.skipif(not rt.available(name), reason=f"{name} not installed"))
            for name in rt.COMPILED]


def _effnet_available() -> bool:
    try:
        load_backbone("efficientnet-lite0")
    except ProbeError:
        return False
    return True


# Every backbone family the tests can build, plus --layer / --pooling cases.
FAMILIES = [
    pytest.param((TINY, None, None, None), id="tiny"),
    pytest.param((TINY, None, "conv1", "max"), id="tiny-layer-conv1-max"),
    pytest.param(("tv:resnet18", "random", "layer3", "avg"), id="resnet18-layer3-avg", marks=pytest.mark.slow),
    pytest.param(("tv:mobilenet_v3_small", "random", None, None), id="mobilenet_v3_small", marks=pytest.mark.slow),
    pytest.param(("efficientnet-lite0", None, None, None), id="efficientnet-lite0", marks=[
        pytest.mark.slow, pytest.mark.skipif(not _effnet_available(), reason="efficientnet-lite0 not installed")]),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One cache folder per module run: each backbone is exported once and shared by both runtimes."""
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def loaded():
    memo = {}

    def load(spec):
        if spec not in memo:
            name, weights, layer, pooling = spec
            memo[spec] = load_backbone(name, weights, layer, pooling)
        return memo[spec]

    return load


def _batch(bb: Backbone, n: int = 3, seed: int = 1) -> torch.Tensor:
    crop = bb.preprocess.crop
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


def _assert_close(feats, ref):
    cos, rel = rt.feature_agreement(feats, ref)
    assert feats.shape == ref.shape and feats.dtype == np.float32
    assert cos >= rt.COSINE_MIN and rel <= rt.MAX_REL_DIFF, (cos, rel)


@pytest.mark.parametrize("runtime", COMPILED)
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_features_match_eager(family, runtime, loaded, exports):
    bb = loaded(family)
    runner = rt.make_runner(bb, runtime, "cpu", "float32", exports)
    assert runner.name == runtime  # compiled, not a fallback
    x = _batch(bb)
    ref = rt.EagerRunner(bb)(x)
    _assert_close(runner(x), ref)
    _assert_close(runner(x[:1]), ref[:1])  # the batch axis is dynamic


def test_feature_agreement_measures_cosine_and_relative_difference():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert rt.feature_agreement(a, a) == (1.0, 0.0)
    cos, rel = rt.feature_agreement(a + np.float32(0.01), a)
    assert 0.99 < cos < 1.0 and rel == pytest.approx(0.005)
    assert rt.feature_agreement(a[:1], a) == (-1.0, float("inf"))


def test_export_is_cached_across_runners_and_backbone_loads(tmp_path):
    before = rt.EXPORTS
    first = rt.make_runner(load_backbone(TINY), "onnxruntime", "cpu", "float32", tmp_path)
    (onnx,) = (tmp_path / rt.EXPORT_FOLDER).glob("*.onnx")
    mtime = onnx.stat().st_mtime_ns
    second = rt.make_runner(load_backbone(TINY), "openvino" if rt.available("openvino") else "onnxruntime", "cpu",
                            "float32", tmp_path)
    assert rt.EXPORTS == before + 1 and onnx.stat().st_mtime_ns == mtime
    assert first.name == "onnxruntime" and second.name != "eager"
    assert json.loads(onnx.with_suffix(".json").read_text())["backbone"] == TINY
    # Another layer is another export.
    rt.make_runner(load_backbone(TINY, layer="conv1"), "onnxruntime", "cpu", "float32", tmp_path)
    assert rt.EXPORTS == before + 2 and len(list((tmp_path / rt.EXPORT_FOLDER).glob("*.onnx"))) == 2


def test_auto_measures_once_and_remembers_the_choice(tmp_path, monkeypatch, machine_tuning_memo):
    from probe import tuning

    speed = {"eager": 10.0, "onnxruntime": 20.0, "openvino": 30.0}
    calls = []
    monkeypatch.setattr(tuning, "measure_throughput", lambda runner, bs, size: calls.append((runner.name, bs))
                        or speed[runner.name])
    bb = load_backbone(TINY)
    installed = ["eager"] + [n for n in rt.COMPILED if rt.available(n)]
    runner = rt.make_runner(bb, "auto", "cpu", "float32", tmp_path, batch_size=4)
    assert runner.name == installed[-1]
    assert sorted(calls) == sorted([(n, 4) for n in installed] * rt.ROUNDS)
    (entry,) = [v for k, v in json.loads(machine_tuning_memo.read_text()).items() if k.startswith("runtime|")]
    assert entry["runtime"] == installed[-1] and set(entry["images_per_second"]) == set(installed)
    calls.clear()
    again = rt.make_runner(load_backbone(TINY), "auto", "cpu", "float32", tmp_path, batch_size=4)
    assert calls == [] and again.name == installed[-1]
    # The choice is per machine: another cache folder reuses it without measuring.
    other = rt.make_runner(load_backbone(TINY), "auto", "cpu", "float32", tmp_path / "other", batch_size=4)
    assert calls == [] and other.name == installed[-1]
    # Another batch size is another choice; a small run (measure=False) with nothing remembered runs eager.
    assert rt.make_runner(bb, "auto", "cpu", "float32", tmp_path, batch_size=16, measure=False).name == "eager"
    assert calls == []


def test_auto_stays_eager_without_a_cache_on_amp_or_on_cuda(tmp_path, machine_tuning_memo):
    bb = load_backbone(TINY)
    assert rt.make_runner(bb, "auto", "cpu", "float32", None).name == "eager"
    assert rt.make_runner(bb, "auto", "cpu", "bfloat16", tmp_path).name == "eager"
    assert rt.make_runner(bb, "auto", "cuda", "bfloat16", tmp_path).name == "eager"  # no CUDA needed to decide
    assert not machine_tuning_memo.exists()  # nothing was measured


def test_explicit_runtime_errors_are_one_line(monkeypatch):
    with pytest.raises(ProbeError, match="runtime='tensorrt' is not one of auto, eager, onnxruntime, openvino"):
        Extractor(TINY, None, runtime="tensorrt")
    with pytest.raises(ProbeError, match="float32; pass --amp off"):
        rt.check_runtime("onnxruntime", "cpu", "bfloat16")
    with pytest.raises(ProbeError, match="runs on the CPU"):
        rt.check_runtime("openvino", "cuda", "float32")
    monkeypatch.setattr(rt, "available", lambda name: name == "eager")
    with pytest.raises(ProbeError, match=r"needs the package onnxruntime \(pip install 'probe\[fast\]'\)"):
        Extractor(TINY, None, runtime="onnxruntime")
    assert rt.make_runner(load_backbone(TINY), "auto", "cpu", "float32", None).name == "eager"  # auto skips them


class _KthPool(nn.Module):
    """A real op the ONNX exporter cannot handle (aten::kthvalue): the median-ish value of each channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).flatten(2).kthvalue(3, dim=2).values


def _unexportable() -> Backbone:
    net = _KthPool().eval().requires_grad_(False)
    pre = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    return Backbone("test:kth-pool", net, pre, 4, state_sha256(net))


@pytest.mark.parametrize("runtime", COMPILED)
def test_unexportable_backbone_falls_back_to_eager_with_one_warning(runtime, tmp_path, caplog, capfd):
    bb = _unexportable()
    with caplog.at_level(logging.WARNING, logger="probe"):
        runner = rt.make_runner(bb, runtime, "cpu", "float32", tmp_path)
    assert runner.name == "eager"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot be exported" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage() and "kthvalue" in warnings[0].getMessage()
    assert capfd.readouterr().out == ""  # the exporter's graph dump does not reach stdout
    x = _batch(bb)
    np.testing.assert_array_equal(runner(x), rt.EagerRunner(bb)(x))
    # The failure is remembered: no second export attempt.
    before = rt.EXPORTS
    assert rt.make_runner(bb, runtime, "cpu", "float32", tmp_path).name == "eager" and rt.EXPORTS == before


def test_auto_on_an_unexportable_backbone_remembers_eager(tmp_path, caplog, machine_tuning_memo):
    bb = _unexportable()
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert rt.make_runner(bb, "auto", "cpu", "float32", tmp_path).name == "eager"
    memo = json.loads(machine_tuning_memo.read_text())
    assert [v["runtime"] for k, v in memo.items() if k.startswith("runtime|")] == ["eager"]


@pytest.mark.parametrize("runtime", COMPILED)
def test_runtime_unequal_to_eager_is_refused(runtime, tmp_path, caplog, monkeypatch):
    cls = rt.OnnxRuntimeRunner if runtime == "onnxruntime" else rt.OpenVinoRunner
    call = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, x: call(self, x) * 1.01)  # 1 % off: over the tolerance
    with caplog.at_level(logging.WARNING, logger="probe"):
        runner = rt.make_runner(load_backbone(TINY), runtime, "cpu", "float32", tmp_path)
    assert runner.name == "eager"
    assert "differ from eager" in caplog.text


def _segment_runtimes(store) -> list[str]:
    out = []
    for p in store.segment_files():
        with h5py.File(p, "r") as f:
            out.append(str(f.attrs["runtime"]))
    return out


@pytest.mark.parametrize("runtime", COMPILED)
def test_space_filled_by_two_runtimes_verifies_clean(runtime, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    records = resolve(folder)
    eager = Extractor(TINY, tmp_path / "cache", runtime="eager", **CPU)
    first = eager.extract(records[:6])
    other = Extractor(TINY, tmp_path / "cache", runtime=runtime, **CPU)
    topped = other.extract(records)
    assert other.space == eager.space  # the runtime is not part of the feature space
    assert topped.stats.new == len(records) - 6 and topped.stats.cached == 6 and topped.stats.runtime == runtime
    assert first.stats.runtime == "eager" and runtime in topped.stats.summary()
    assert other.store.verify().ok
    assert sorted(_segment_runtimes(other.store)) == sorted(["eager", runtime])
    # The rows the compiled runtime wrote equal what eager computes for them.
    fresh = Extractor(TINY, None, runtime="eager", **CPU).extract(records[6:])
    _assert_close(topped.features[6:], fresh.features)


def test_small_auto_run_is_eager_and_a_large_one_measures(tmp_path, monkeypatch, machine_tuning_memo):
    from probe import engine, tuning

    monkeypatch.setattr(engine, "RUNTIME_MIN_INPUTS", 64)
    monkeypatch.setattr(tuning, "measure_throughput", lambda runner, bs, size: 100.0 if runner.name == "eager" else 1.0)
    folder = make_image_folder(tmp_path / "imgs", per_class=24)  # 72 inputs: 67 new ones are enough to measure
    records = resolve(folder)
    ex = Extractor(TINY, tmp_path / "cache", batch_size=8, **CPU)
    small = ex.extract(records[:5])
    assert small.stats.runtime == "eager" and not machine_tuning_memo.exists()
    large = ex.extract(records)
    assert large.stats.runtime == "eager"  # measured fastest by the patched measurement
    memo = json.loads(machine_tuning_memo.read_text())
    assert [v["runtime"] for k, v in memo.items() if k.startswith("runtime|")] == ["eager"]


@pytest.mark.parametrize("runtime", COMPILED)
def test_cli_extract_and_predict_with_a_runtime(runtime, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "cache"
    out = invoke("extract", folder, "--backbone", TINY, "--cache", cache, "--device", "cpu", "--runtime", runtime,
                 "--no-progress").output
    assert f"cpu/float32, {runtime}" in out
    report = json.loads((cache / "last-extract.json").read_text())
    assert report["stats"]["runtime"] == runtime
    model = tmp_path / "m.probe"
    invoke("fit", folder, "--backbone", TINY, "--cache", cache, "--device", "cpu", "--runtime", runtime,
           "--val-split", "0", "--C", "1", "-o", model)
    new = make_image_folder(tmp_path / "new", per_class=2, seed=777)
    pred = invoke("predict", model, new, "--cache", tmp_path / "pcache", "--device", "cpu", "--runtime", runtime)
    lines = pred.output.strip().splitlines()
    assert lines[0].startswith("path,sha256,prediction") and len(lines) == 1 + 6


def test_cli_runtime_without_its_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "available", lambda name: name == "eager")
    folder = make_image_folder(tmp_path / "imgs", per_class=1)
    res = invoke("extract", folder, "--backbone", TINY, "--cache", tmp_path / "c", "--device", "cpu",
                 "--runtime", "openvino", expect=1)
    assert res.output.strip() == "Error: runtime 'openvino' needs the package openvino (pip install 'probe[fast]')"
