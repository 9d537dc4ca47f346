"""Inference runtimes: eager PyTorch, ONNX Runtime and OpenVINO behind one interface, and the ONNX export cache.

    runner = make_runner(backbone, "auto", device, precision, cache_root)
    feats = runner(x)          # normalized float32 (N, 3, H, W) tensor -> float32 (N, dim) numpy array

* ``eager``        the backbone's own ``features`` under inference_mode (+ autocast): works for every backbone,
                   device and precision.
* ``onnxruntime``  the backbone exported to ONNX (opset 17, dynamic batch) run by ONNX Runtime's CPU provider.
* ``openvino``     the same ONNX file compiled by OpenVINO for the CPU (PERFORMANCE_HINT=LATENCY, f32).
* ``auto``         on a CPU in float32: the fastest of those installed for (backbone, layer, pooling, input size,
                   threads, batch size), measured once (best of interleaved rounds) and remembered in the tuning
                   memo; eager everywhere else (CUDA keeps eager + AMP: the installed runtimes run on the CPU).

The export covers what ``Backbone.features`` computes, ``layer`` and ``pooling`` included, and is kept in
``<cache>/runtimes/<key>.onnx`` keyed by the weights sha256, backbone, layer, pooling, input size, opset and torch
version, so a second run does not export again. A backbone the exporter cannot handle, or whose exported features
are not equal to eager's within :data:`COSINE_MIN` / :data:`MAX_REL_DIFF`, runs eager (one WARNING line).
Within that tolerance the runtime does not change the feature space; each cache segment records its ``runtime``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, _pool, autocast
from .defaults import RUNTIMES
from .errors import ProbeError
from .files import atomic_path, atomic_write_text
from .tuning import memo_file, read_memo, update_memo

log = logging.getLogger(__name__)

COMPILED = ("onnxruntime", "openvino")  # preference order on a tie
OPSET = 17
EXPORT_FOLDER = "runtimes"
INSTALL_HINT = "pip install 'probe[fast]'"
#: A compiled runtime's features must match eager's to these bounds (per row cosine; max|a-b| / max|a| per batch).
COSINE_MIN = 0.9999
MAX_REL_DIFF = 1e-3
ROUNDS = 2
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


# -- runners -------------------------------------------------------------------------------------------------


class Runner:
    """Turns a normalized float32 (N, 3, H, W) batch into float32 (N, dim) features (numpy).

    ``channels_last`` says which memory layout the runner wants its input in; ``device`` where the input lives."""

    name = "?"
    channels_last = False
    device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    @property
    def version(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.version}>"


class EagerRunner(Runner):
    """Today's path: ``backbone.features`` under inference_mode and autocast for ``precision``."""

    name = "eager"

    def __init__(self, backbone: Backbone, device: torch.device | str = "cpu", precision: str = "float32"):
        self.backbone = backbone
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = backbone.channels_last

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.backbone.features(x).float().cpu().numpy()

    @property
    def version(self) -> str:
        return f"torch {torch.__version__}"


class OnnxRuntimeRunner(Runner):
    """An exported backbone run by ONNX Runtime's CPU execution provider (all graph optimizations on)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: ORT's warnings would go to stderr unasked
        # No busy-waiting between batches: a spinning worker steals the core that decodes the next batch (measured
        # on the shared 2-core box: 14 vs 9 img/s for EfficientNet-Lite0 with decoding work between batches).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._version = ort.__version__

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {self.input_name: _as_numpy(x)})[0]
        return np.asarray(out, dtype=np.float32)

    @property
    def version(self) -> str:
        return f"onnxruntime {self._version}"


class OpenVinoRunner(Runner):
    """An exported backbone compiled by OpenVINO for the CPU: latency hint (measured fastest here at every batch
    size), f32 inference precision (no silent bf16), as many threads as torch uses."""

    name = "openvino"

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None,
                 compiled_cache: str | os.PathLike | None = None):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                  "INFERENCE_PRECISION_HINT": "f32"}
        if compiled_cache is not None:  # OpenVINO's own cache of compiled models: a faster start the next time
            config["CACHE_DIR"] = str(compiled_cache)
        self.compiled = _ov_core().compile_model(str(onnx_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: one batch at a time
        self._version = ov.__version__.split("-")[0]

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with self.lock:
            out = self.request.infer({0: _as_numpy(x)})[0]
        return np.array(out, dtype=np.float32)  # a copy: the request's buffer is reused by the next batch

    @property
    def version(self) -> str:
        return f"openvino {self._version}"


_CORE = None


def _ov_core():
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().contiguous().numpy()


def available(runtime: str) -> bool:
    """Whether the package behind a compiled runtime is installed (eager always is)."""
    if runtime == "eager":
        return True
    return importlib.util.find_spec(_PACKAGES[runtime]) is not None


# -- export --------------------------------------------------------------------------------------------------


class _Features(nn.Module):
    """``Backbone.features`` as a plain module the ONNX exporter can trace.

    For a ``layer`` the forward hook records the layer's output instead of stopping the forward pass (the
    exception the eager path uses cannot be traced); the layers after it do not feed the output, so the exporter
    drops them from the graph."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.net = backbone.module
        self.target = backbone._target
        self.pooling = backbone.pooling

    def forward(self, x):
        if self.target is None:
            return _pool(self.net(x), self.pooling)
        captured = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)

        handle = self.target.register_forward_hook(hook)
        try:
            self.net(x)
        finally:
            handle.remove()
        return _pool(captured[0], self.pooling)


def export_key(backbone: Backbone) -> dict:
    """Everything the exported graph depends on."""
    return {
        "backbone": backbone.name, "weights_sha256": backbone.weights_sha256, "layer": backbone.layer,
        "pooling": backbone.pooling, "input_size": backbone.preprocess.crop, "opset": OPSET,
        "torch": torch.__version__, "exporter": "torchscript",
    }


def export_path(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """``<folder>/<first 16 hex digits of the export key's sha256>.onnx``."""
    canonical = json.dumps(export_key(backbone), sort_keys=True, separators=(",", ":"))
    return Path(folder) / f"{hashlib.sha256(canonical.encode()).hexdigest()[:16]}.onnx"


class ExportError(Exception):
    """The exporter could not handle the backbone (not a ProbeError: callers fall back to eager)."""


EXPORTS = 0  # how many exports this process ran (the export cache's tests count them)


def export_onnx(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """The backbone (layer and pooling included) as an ONNX file in ``folder``, exported once per key.

    The file is written atomically, with a ``.json`` description of its key next to it. A failed export is
    remembered as ``<key>.failed`` (so it is not retried) and raised as :class:`ExportError`."""
    global EXPORTS
    path = export_path(backbone, folder)
    failed = path.with_suffix(".failed")
    if path.is_file():
        return path
    if failed.is_file():
        raise ExportError(failed.read_text().strip())
    if next(backbone.module.parameters(), torch.empty(0)).device.type != "cpu":
        raise ExportError("the backbone is not on the CPU")
    crop = backbone.preprocess.crop
    example = torch.randn(2, 3, crop, crop)
    t = time.perf_counter()
    EXPORTS += 1
    try:
        with atomic_path(path) as tmp, _quiet(), torch.no_grad():
            _torch_export(_Features(backbone).eval(), example, tmp)
    except Exception as e:  # the exporter raises many types (UnsupportedOperatorError, RuntimeError, ...)
        reason = _one_line(f"{type(e).__name__}: {e}")
        atomic_write_text(failed, reason + "\n")
        raise ExportError(reason) from e
    atomic_write_text(path.with_suffix(".json"), json.dumps(export_key(backbone), indent=2, sort_keys=True) + "\n")
    log.info("exported %s to %s in %.1f s", backbone.name, path, time.perf_counter() - t)
    return path


def _torch_export(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    kwargs = dict(opset_version=OPSET, input_names=["input"], output_names=["features"],
                  dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}}, do_constant_folding=True)
    try:  # the TorchScript exporter: handles these models more robustly than the dynamo one (torch >= 2.5)
        torch.onnx.export(module, (example,), str(path), dynamo=False, **kwargs)
    except TypeError as e:
        if "dynamo" not in str(e):
            raise
        torch.onnx.export(module, (example,), str(path), **kwargs)  # torch < 2.5: TorchScript is the only one


@contextlib.contextmanager
def _quiet():
    """Silence the exporter: its warnings, and the graph dump it writes to file descriptor 1 on failure (stdout
    belongs to the CLI: `probe predict` writes its CSV there)."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- choosing a runner ---------------------------------------------------------------------------------------


def check_runtime(runtime: str, device: torch.device | str = "cpu", precision: str = "float32") -> str:
    """``runtime`` when it can run here; a one-line ProbeError otherwise (unknown name, package missing, a
    compiled runtime asked for on a GPU or with AMP). ``auto`` is always valid: it skips what is not installed."""
    device = torch.device(device)
    if runtime not in RUNTIMES:
        raise ProbeError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime in COMPILED:
        if not available(runtime):
            raise ProbeError(f"runtime {runtime!r} needs the package {_PACKAGES[runtime]} ({INSTALL_HINT})")
        if device.type != "cpu":
            raise ProbeError(f"runtime {runtime!r} runs on the CPU; pass --device cpu (or --runtime eager)")
        if precision != "float32":
            raise ProbeError(f"runtime {runtime!r} computes in float32; pass --amp off (or --runtime eager)")
    return runtime


def make_runner(backbone: Backbone, runtime: str = "auto", device: torch.device | str = "cpu",
                precision: str = "float32", cache_root: str | os.PathLike | None = None, *,
                batch_size: int = 8, measure: bool = True) -> Runner:
    """The runner for ``runtime`` (auto, eager, onnxruntime, openvino).

    An explicit compiled runtime needs its package (else a ProbeError with the install hint), the CPU and float32;
    a failed export or a result unequal to eager falls back to eager with one warning. ``auto`` measures the
    installed runtimes once per (backbone, layer, pooling, input size, threads, batch size) and remembers the
    fastest in the tuning memo under ``cache_root``; with ``measure=False`` (a small run) and nothing remembered
    yet, or without a cache folder, it runs eager."""
    device = torch.device(device)
    check_runtime(runtime, device, precision)
    if runtime == "eager":
        return EagerRunner(backbone, device, precision)
    if runtime != "auto":
        with _export_folder(cache_root) as folder:
            return _compiled_or_eager(backbone, runtime, folder, remember=cache_root is not None)
    candidates = [r for r in COMPILED if available(r)]
    if device.type != "cpu" or precision != "float32" or cache_root is None or not candidates:
        return EagerRunner(backbone, device, precision)
    key = _memo_key(backbone, device, batch_size)
    memo = memo_file()  # per machine: the choice depends on the machine, not on the cache folder
    chosen = read_memo(memo).get(key, {}).get("runtime")
    folder = Path(cache_root) / EXPORT_FOLDER
    if chosen is not None:
        return _compiled_or_eager(backbone, chosen, folder) if chosen != "eager" else EagerRunner(backbone, device)
    if not measure:
        return EagerRunner(backbone, device, precision)
    runners: list[Runner] = [EagerRunner(backbone, device)]
    for name in candidates:
        r = _compiled_or_eager(backbone, name, folder)
        if r.name != "eager":
            runners.append(r)
        elif export_path(backbone, folder).with_suffix(".failed").exists():
            break  # the export failed: no compiled runtime can run this backbone
    rates = measure_runners(runners, backbone.preprocess.crop, batch_size)
    best = max(runners, key=lambda r: rates[r.name])
    log.info("runtime choice for %s (batch %d, %d threads): %s -> %s", backbone.name, batch_size,
             torch.get_num_threads(), {k: round(v, 1) for k, v in rates.items()}, best.name)
    update_memo(memo, key, {"runtime": best.name, "images_per_second": rates})
    return best


def measure_runners(runners: list[Runner], input_size: int, batch_size: int) -> dict[str, float]:
    """Images per second of each runner at ``batch_size``: the best of :data:`ROUNDS` interleaved rounds
    (interference from other processes only ever slows a measurement down)."""
    from .tuning import measure_throughput

    rates: dict[str, float] = {}
    for _ in range(ROUNDS):
        for r in runners:
            rates[r.name] = max(rates.get(r.name, 0.0), measure_throughput(r, batch_size, input_size))
    return rates


def _compiled_or_eager(backbone: Backbone, runtime: str, folder: Path, remember: bool = True) -> Runner:
    """A compiled runner checked against eager on a seeded batch; eager (one warning) when that fails.

    Made once per loaded backbone, runtime and export folder in a process: Extractors sharing a Backbone (the
    Python API, benchmarks, a server) share the compiled model too, as they share the torch module."""
    if not remember:
        return _build(backbone, runtime, folder)
    made = backbone.__dict__.setdefault("_runners", {})
    key = (runtime, str(Path(folder).resolve()))
    if key not in made:
        made[key] = _build(backbone, runtime, folder)
    return made[key]


def _build(backbone: Backbone, runtime: str, folder: Path) -> Runner:
    eager = EagerRunner(backbone, "cpu")
    try:
        path = export_onnx(backbone, folder)
    except ExportError as e:
        log.warning("%s cannot be exported to ONNX (%s); running eager PyTorch instead of %s",
                    backbone.name, e, runtime)
        return eager
    try:
        if runtime == "onnxruntime":
            runner = OnnxRuntimeRunner(path)
        else:
            runner = OpenVinoRunner(path, compiled_cache=folder / "openvino")
        cos, rel = compare(runner, eager, backbone.preprocess.crop)
    except Exception as e:  # a runtime that cannot load or run the graph
        log.warning("%s: %s cannot run the exported model (%s); running eager PyTorch", backbone.name, runtime,
                    _one_line(f"{type(e).__name__}: {e}", 160))
        return eager
    if cos < COSINE_MIN or rel > MAX_REL_DIFF:
        log.warning("%s: %s features differ from eager PyTorch (cosine %.6f, max relative difference %.2g); "
                    "running eager PyTorch", backbone.name, runtime, cos, rel)
        return eager
    return runner


def compare(runner: Runner, reference: Runner, input_size: int, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """(lowest per-row cosine, max|a-b| / max|b|) of two runners on a seeded random batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, input_size, input_size, generator=g)
    a, b = runner(x), reference(x.contiguous(memory_format=torch.channels_last) if reference.channels_last else x)
    return feature_agreement(a, b)


def feature_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(lowest per-row cosine similarity, max|a-b| / max|b|) of two (N, dim) feature matrices."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return -1.0, float("inf")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), 1.0)
    scale = np.abs(b).max()
    rel = np.abs(a - b).max() / scale if scale > 0 else float(np.abs(a - b).max())
    return float(cos.min()), float(rel)


@contextlib.contextmanager
def _export_folder(cache_root):
    """``<cache>/runtimes``, or a temporary folder for the runner's lifetime when there is no cache."""
    if cache_root is not None:
        yield Path(cache_root) / EXPORT_FOLDER
        return
    with tempfile.TemporaryDirectory(prefix="probe-export-") as tmp:
        yield Path(tmp)  # ONNX Runtime and OpenVINO hold the model in memory once loaded


# -- the memo of auto's choices (shared with the batch-size tuning) ------------------------------------------


def _memo_key(backbone: Backbone, device: torch.device, batch_size: int) -> str:
    versions = [f"{name} {_package_version(name)}" for name in COMPILED if available(name)]
    return "|".join(["runtime", backbone.name, backbone.weights_sha256[:16], backbone.layer, backbone.pooling,
                     str(backbone.preprocess.crop), str(device), f"{torch.get_num_threads()} threads",
                     f"batch {batch_size}", f"torch {torch.__version__}", *versions])


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"
