"""The batched extraction engine.

    records --hash (memo)--> keys --cache lookup--> misses
    misses --loader.iter_batches (decode + preprocess in threads ahead of the model, or worker processes)--> batches
    batches --runner (probe/runtime.py: eager inference_mode + channels_last + AMP on CUDA, or ONNX Runtime /
              OpenVINO on the CPU)--> features
    features --writer thread--> SegmentWriter (atomic segments) --> cache

Only misses reach the model; a finished run rerun does no model work. Memory stays flat in the number of inputs:
batches stream through, features are written in bounded segments, and :class:`FeatureSet` loads features only
when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections import deque
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .backbones import Backbone, load_backbone
from .cache import SPACE_FILE, FeatureCache, FeatureStore, SpaceNotFoundError
from .defaults import DEFAULT_BACKBONE
from .errors import ProbeError
from .featureset import ExtractStats, Failure, FeatureSet, assemble, record_name
from .options import ExtractOptions
from .loader import iter_batches
from .preprocess import Preprocess
from .space import FeatureSpace
from .sources import MEMO_FILE, HashMemo, Record, hash_files, resolve
from .tuning import TUNING_FILE

log = logging.getLogger(__name__)

UNSET = object()  # "cache not given": the options' (or the options object's own) cache applies


def _cache_root(cache) -> str | None:
    if cache is None:
        return None
    return os.fspath(cache.root if isinstance(cache, FeatureCache) else cache)


def make_options(backbone: str | Backbone | ExtractOptions = DEFAULT_BACKBONE, cache=UNSET,
                 **options) -> ExtractOptions:
    """ExtractOptions from the engine's calling conventions: an options object (plus overrides), or a backbone
    name / loaded Backbone, a cache (path, FeatureCache or None) and option keywords."""
    if cache is not UNSET:
        options["cache"] = _cache_root(cache)
    if isinstance(backbone, ExtractOptions):
        return backbone.replace(**options) if options else backbone
    name = backbone.name if isinstance(backbone, Backbone) else backbone
    return ExtractOptions.from_kwargs(backbone=name, **options)


DEFAULT_CPU_BATCH = 8
DEFAULT_CUDA_BATCH = 128
AUTOTUNE_MIN_INPUTS = 2000  # see _choose_batch_size
#: ``runtime="auto"`` measures the installed runtimes (once per machine, remembered) only for a job at least this
#: large: the one-off export + measurement costs a few seconds, and EfficientNet-Lite0 end to end at 79 img/s eager
#: vs 131 img/s with ONNX Runtime (benchmark 9, 2-core CPU) saves 5 ms per image, so it pays back after ~500-600
#: images. Smaller jobs use the remembered choice, else eager.
RUNTIME_MIN_INPUTS = 500


# -- the data side -------------------------------------------------------------------------------------------


def to_model_input(batch: torch.Tensor, preprocess: Preprocess, device: torch.device, channels_last: bool,
                   non_blocking: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) batch -> normalized float32 (N, 3, H, W) on ``device``.

    The uint8 batch crosses to the device (4x fewer bytes than float32), and the NHWC->NCHW permute is a view
    that is already channels_last in memory, so conv nets need no layout copy. Same arithmetic as
    :meth:`Preprocess.normalize`.
    """
    x = batch.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).float()
    mean, std = _mean_std(preprocess.mean, preprocess.std, device)
    x = x.div_(255).sub_(mean).div_(std)
    return x if channels_last else x.contiguous()


@lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalization constants as (1, 3, 1, 1) tensors on ``device``, made once rather than per batch."""
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def pil_key(image: Image.Image) -> str:
    """Cache key of an in-memory image: sha256 of its mode, size and pixels."""
    h = hashlib.sha256(f"pil:{image.mode}:{image.size}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


# -- device, precision, batch size ---------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_precision(amp: str | bool | None, device: torch.device) -> str:
    """'float32' (no autocast), 'bfloat16' or 'float16'. Default: bf16 AMP on CUDA (fp16 where bf16 is not
    supported), float32 on CPU."""
    if amp in (None, "auto"):
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if amp is True:
        return "bfloat16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "float16"
    table = {False: "float32", "off": "float32", "fp32": "float32", "float32": "float32",
             "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
    if amp not in table:
        raise ProbeError(f"amp={amp!r} is not one of auto, off, bf16, fp16")
    return table[amp]


def default_workers(device: torch.device) -> int:
    """Loader workers: none on a small CPU machine (they would compete with the model for cores), several on GPU."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, max(1, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


class Extractor:
    """A loaded backbone on a device plus a feature cache: turns inputs into features, extracting only misses.

    Built from :class:`~probe.options.ExtractOptions` (or the same names as keywords:
    ``Extractor("efficientnet-lite0", "cache", batch_size=8)``). Reuse one Extractor for many calls (the model is
    loaded once). ``write=False`` computes misses in memory and writes nothing (the cache is still read).
    ``backbone`` may also be an already loaded :class:`~probe.backbones.Backbone`. ``runtime`` (auto, eager,
    onnxruntime, openvino) picks what runs the backbone (:mod:`probe.runtime`); it does not change the feature space.
    """

    def __init__(self, backbone: str | Backbone | ExtractOptions = DEFAULT_BACKBONE, cache=UNSET, **options):
        from .runtime import check_runtime

        loaded = backbone if isinstance(backbone, Backbone) else None
        self.options = opts = make_options(backbone, cache, **options)  # validated before any side effect
        self.device = resolve_device(opts.device)
        self.precision = resolve_precision(opts.amp, self.device)
        self.runtime = check_runtime(opts.runtime, self.device, self.precision)
        self._runner = None
        self.backbone = (loaded or load_backbone(opts.backbone, opts.weights, opts.layer, opts.pooling)).with_decode(
            opts.decode)
        self.backbone.to(self.device)
        self.space = self.backbone.feature_space(dtype=opts.dtype, precision=self.precision)
        self.cache = FeatureCache(opts.cache) if opts.cache is not None else None
        self.write = opts.write and self.cache is not None
        self.read_only: str | None = None  # why rows cannot be written here (a read-only cache folder), if so
        self.store = self._open_store()
        self.batch_size = opts.batch_size
        self.workers = default_workers(self.device) if opts.workers is None else opts.workers
        self.threads = opts.threads  # decode threads next to the model (None: loader.default_threads())
        self.max_pixels = opts.max_pixels
        self.segment_rows = opts.segment_rows
        self.progress = opts.progress

    def _open_store(self) -> FeatureStore | None:
        if self.cache is None:
            return None
        if self.write:
            try:
                store = self.cache.open(self.space)
                self.cache.check_writable(self.space)
                return store
            except ProbeError as e:
                if not (self.cache.spaces_dir / self.space.id / SPACE_FILE).is_file():
                    raise  # nothing to read either: creating the space failed
                # A shared, read-only cache: reading works; only a run that must store new rows fails (below).
                self.read_only = str(e)
        try:
            return self.cache.open(self.space, create=False)
        except SpaceNotFoundError:
            return None  # nothing cached for this space yet, and we may not create it
        # A damaged or mismatched cache is not "nothing cached": those errors reach the caller.

    # -- public ------------------------------------------------------------------------------------------

    def extract(self, inputs: Sequence[Record | str | os.PathLike | Image.Image], strict: bool = False,
                extract_missing: bool = True) -> FeatureSet:
        """Features for ``inputs`` (records, paths or PIL images), in order; failures are reported, not raised
        (``strict=True`` raises StrictModeError after the run, with everything extracted kept).
        ``extract_missing=False`` refuses to run the model: every input must already be cached."""
        t_start = time.perf_counter()
        records = [r if isinstance(r, Record) else Record(r if isinstance(r, Image.Image) else str(r)) for r in inputs]
        stats = ExtractStats(inputs=len(records), workers=self.workers, device=str(self.device), precision=self.precision)
        keys, failures = self._keys(records, stats)
        with self.store.lock() if self.store is not None else contextlib.nullcontext():
            return self._extract(records, keys, failures, stats, t_start, strict, extract_missing)

    def _extract(self, records, keys, failures, stats, t_start, strict, extract_missing) -> FeatureSet:
        ok_idx = [i for i, k in enumerate(keys) if k is not None]
        unique = list(dict.fromkeys(keys[i] for i in ok_idx))
        stats.unique = len(unique)
        if self.store is not None:
            self.store.refresh()
            todo = self.store.missing(unique)  # verifies the segments that hold these rows: damaged = missing
        else:
            todo = unique
        stats.cached = stats.unique - len(todo)
        memory: dict[str, np.ndarray] = {}  # features computed but not written (write=False)
        if todo and self.write and self.read_only:
            raise ProbeError(f"{len(todo)} of {stats.unique} inputs are not cached and cannot be stored: "
                             f"{self.read_only}")
        if todo and not extract_missing:
            raise ProbeError(
                f"{len(todo)} of {stats.unique} inputs are not in the cache ({self.space.backbone}, space "
                f"{self.space.id}); run `probe extract` on them first, or allow extraction"
            )
        if todo:
            first = {}
            for i in ok_idx:
                first.setdefault(keys[i], i)
            bad = self._run_model([first[k] for k in todo], records, keys, stats, memory)
            failures.extend(Failure(i, record_name(records[i]), err) for i, err in bad)
            bad_keys = {keys[i] for i, _ in bad}
        else:
            bad_keys = set()
        return assemble(records, keys, failures, bad_keys, stats, self.space, self.store, t_start=t_start,
                        strict=strict, memory=memory)

    # -- steps -------------------------------------------------------------------------------------------

    def _keys(self, records: list[Record], stats: ExtractStats) -> tuple[list[str | None], list[Failure]]:
        t = time.perf_counter()
        keys: list[str | None] = [None] * len(records)
        failures: list[Failure] = []
        file_idx = [i for i, r in enumerate(records) if not isinstance(r.path, Image.Image)]
        for i, r in enumerate(records):
            if isinstance(r.path, Image.Image):
                keys[i] = pil_key(r.path)
        if file_idx:
            # write=False writes nothing: no cache folder or memo is created (an existing memo is used and kept);
            # a read-only cache's memo is opened read-only.
            memo = HashMemo.open(self.cache.root / MEMO_FILE, create=self.write) if self.cache is not None else None
            try:
                res = hash_files([records[i].path for i in file_idx], memo)
            finally:
                if memo is not None:
                    memo.close()
            for j, i in enumerate(file_idx):
                keys[i] = res.keys[j]
                if j in res.errors:
                    failures.append(Failure(i, records[i].path, res.errors[j]))
            stats.files_hashed = res.read
        stats.seconds["hash"] = time.perf_counter() - t
        return keys, failures

    def _choose_runner(self, n: int):
        """The runner, made once (``auto`` measures once per machine; a small run does not measure)."""
        if self._runner is not None:
            return self._runner
        from .runtime import make_runner

        # Like the hash memo, write=False creates no cache folder: exports and choices need an existing one.
        root = self.cache.root if self.cache is not None and (self.write or self.cache.root.exists()) else None
        default = DEFAULT_CUDA_BATCH if self.device.type == "cuda" else DEFAULT_CPU_BATCH
        runner = make_runner(self.backbone, self.runtime, self.device, self.precision, root,
                             batch_size=self.batch_size or default, measure=n >= RUNTIME_MIN_INPUTS)
        if not (self.runtime == "auto" and n < RUNTIME_MIN_INPUTS and runner.name == "eager"):
            self._runner = runner  # a small run's eager is provisional: a large one may still measure
        return runner

    def _choose_batch_size(self, n: int, runner) -> int:
        if self.batch_size is not None:
            return self.batch_size
        default = DEFAULT_CUDA_BATCH if self.device.type == "cuda" else DEFAULT_CPU_BATCH
        from .tuning import remembered_batch_size, tuned_batch_size

        # The memo is per machine (tuning.memo_file()); a cache folder's own tuning.json is an older memo.
        # Tuning costs about as much as extracting 150-450 images with EfficientNet-Lite0 on the 2-core CPU
        # (measured) and gains little over batch 8 there (4-16 ran alike), so it runs only for jobs big enough to
        # amortize it (AUTOTUNE_MIN_INPUTS); smaller ones use what this machine remembers, or the default.
        legacy = [self.cache.root / TUNING_FILE] if self.cache is not None else []
        if n < AUTOTUNE_MIN_INPUTS or not self.write:
            return remembered_batch_size(self.backbone, self.device, self.precision, legacy, runner) or default
        return tuned_batch_size(self.backbone, self.device, self.precision, None, default, runner, also=legacy)

    def _run_model(self, todo: list[int], records: list[Record], keys: list[str | None], stats: ExtractStats,
                   memory: dict[str, np.ndarray]):
        t = time.perf_counter()
        runner = self._choose_runner(len(todo))
        bs = self._choose_batch_size(len(todo), runner)
        # One-off: export (once per cache), runtime choice and batch size (once per device, in tuning.json), building
        # the runner (once per process).
        stats.seconds["tune"] = time.perf_counter() - t
        stats.batch_size = bs
        stats.runtime = runner.name
        cuda = self.device.type == "cuda"
        loader = iter_batches([records[i].path for i in todo], self.backbone.preprocess, bs, self.max_pixels,
                              threads=self.threads, workers=self.workers)
        failed: list[tuple[int, str]] = []
        writer = _WriterThread(self.store, self.segment_rows, self.space, runner) if self.write else None
        bar = tqdm(total=len(todo), unit="img", desc="extract", disable=_bar_disabled(self.progress), leave=False)
        recent: deque = deque(maxlen=8)  # (inputs, data wait, wall) of the last batches: the bar's current pace
        try:
            t = time.perf_counter()
            for idx, batch, bad in loader:
                now = time.perf_counter()
                stats.seconds["data_wait"] += now - t
                wait, t0 = now - t, t
                failed.extend((todo[i], err) for i, err in bad)
                if batch is not None:
                    batch = torch.from_numpy(batch).pin_memory() if cuda else torch.from_numpy(batch)
                    x = to_model_input(batch, self.backbone.preprocess, self.device, runner.channels_last, cuda)
                    feats = runner(x)
                    stats.model_batches += 1
                    if not np.isfinite(feats).all():
                        rows_bad = ~np.isfinite(feats).all(axis=1)
                        for j in np.flatnonzero(rows_bad):
                            failed.append((todo[int(idx[j])], f"{record_name(records[todo[int(idx[j])]])}: non-finite features"))
                        keep = np.flatnonzero(~rows_bad)
                        idx, feats = idx[keep], feats[keep]
                    row_keys = [keys[todo[int(i)]] for i in idx]
                    if writer is not None:
                        writer.put(row_keys, feats, [record_name(records[todo[int(i)]]) for i in idx])
                    else:
                        memory.update(zip(row_keys, feats))
                    stats.new += len(row_keys)
                if stats.model_batches % 16 == 0:
                    _release_free_memory()
                t = time.perf_counter()
                stats.seconds["model"] += t - now
                bar.update(len(idx) + len(bad))
                recent.append((len(idx) + len(bad), wait, t - t0))
                bar.set_postfix(cached=stats.cached, failed=len(failed) + stats.failed, **pace(recent), refresh=False)
        finally:
            bar.close()
            if writer is not None:
                stats.seconds["write"] = writer.close()
                self.store.refresh()
        return failed


class _WriterThread:
    """Hands feature batches to the cache on a background thread so disk I/O overlaps compute."""

    def __init__(self, store: FeatureStore, segment_rows: int, space: FeatureSpace, runner):
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        meta = {"probe_version": _probe_version(), "torch_version": torch.__version__, "runtime": runner.name,
                "runtime_version": runner.version}
        self.writer = store.writer(rows_per_segment=segment_rows, meta=meta)
        self.busy = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="probe-cache-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                break
            if self.error is not None:
                continue
            t = time.perf_counter()
            try:
                self.writer.add(*item)
            except BaseException as e:  # surfaced in the main thread by put()/close()
                self.error = e
            self.busy += time.perf_counter() - t

    def put(self, keys, feats, paths):
        if self.error is not None:
            raise ProbeError(f"writing the feature cache failed: {self.error}") from self.error
        self.queue.put((keys, feats, paths))

    def close(self) -> float:
        """Flush what was computed (also after an error or interrupt) and return the seconds spent writing."""
        self.queue.put(None)
        self.thread.join()
        if self.error is None:
            t = time.perf_counter()
            self.writer.close()
            self.busy += time.perf_counter() - t
        else:
            raise ProbeError(f"writing the feature cache failed: {self.error}") from self.error
        return self.busy


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc): per-batch buffers of varying sizes otherwise fragment the
    heap and peak RSS creeps up with the number of inputs."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def pace(recent) -> dict[str, str]:
    """The progress bar's view of the last batches: images/s and the share of time spent waiting for decoded
    data (a high share means decoding, not the model, limits the run)."""
    n, wait, wall = (sum(r[k] for r in recent) for k in range(3))
    if wall <= 0:
        return {}
    return {"img/s": f"{n / wall:.1f}", "data wait": f"{wait / wall:.0%}"}


def _bar_disabled(progress: bool | None) -> bool | None:
    if progress is None:
        return None  # tqdm: show on a terminal only
    return not progress


def _probe_version() -> str:
    from . import __version__

    return __version__


def extract(source, backbone: str | Backbone | ExtractOptions = DEFAULT_BACKBONE, cache=UNSET, *,
            strict: bool = False, **options) -> FeatureSet:
    """Extract features of a folder / CSV / file list into the cache and return them as a FeatureSet.

    ``options`` are the fields of :class:`~probe.options.ExtractOptions` (or pass one as ``backbone``).
    """
    opts = make_options(backbone, cache, **options)  # validated before the inputs are listed
    records = resolve(source)
    extractor = Extractor(backbone, cache, **options) if isinstance(backbone, Backbone) else Extractor(opts)
    return extractor.extract(records, strict=strict)
