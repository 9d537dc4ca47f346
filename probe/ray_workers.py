"""What runs in Ray worker processes for the distributed engine (probe/distributed.py drives them).

    hash_batch      stat + sha256 a block of files (hash_files with the driver's memo rows for them)
    decode_batch    decode + resize/crop a block of files to uint8 crops; failures are rows with an error
    BackboneActor   one model load per actor; checks it computes the driver's feature space; runs batches
    CacheSink       a Ray Datasink: each write task publishes one segment named by its keys (never twice)

Everything here is importable by reference on the workers (module-level), takes plain data, and reports a bad
input as a row, never as a task error.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .backbones import load_backbone
from .cache import FeatureStore
from .engine import resolve_precision
from .errors import ProbeError
from .sources import hash_files
from .space import FeatureSpace

try:  # the sink must subclass Ray's; without the extra the module still imports (and says how to install it)
    from ray.data import Datasink as _Datasink
except ImportError:  # pragma: no cover - exercised only without the [ray] extra
    _Datasink = object

#: Test hook: when set to a file path, the first backbone actor to see a batch creates that file and exits
#: abruptly (os._exit), as a killed worker would. Forwarded to the workers by the driver.
CRASH_ONCE_ENV = "PROBE_RAY_CRASH_ONCE"


def segment_name(keys: Sequence[str]) -> str:
    """The content name of a Ray segment: ``seg-<t>-ray-<first 24 hex digits of sha256 of its sorted keys>.h5``.

    ``<t>`` (time.time_ns, 20 digits) keeps name order close to creation order, like every segment; a sink task
    looks for ``seg-*-ray-<digest>.h5`` before writing, so the same rows are never published twice."""
    return f"seg-{time.time_ns():020d}-ray-{keys_digest(keys)}.h5"


def keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]


class _BlockMemo:
    """The hash memo as :func:`hash_files` sees it in a cluster task: the driver's rows for this block's files;
    rows it would store are collected and sent back to the driver."""

    def __init__(self, known: dict[str, tuple[int, int, str]]):
        self.known = known
        self.fresh: dict[str, tuple[int, int]] = {}

    def lookup(self, paths):
        return {p: self.known[p] for p in paths if p in self.known}

    def store(self, rows):
        self.fresh.update((path, (size, mtime)) for path, size, mtime, _ in rows)


def hash_batch(batch: dict) -> dict:
    """Keys of one block of files (stat + sha256 where the driver's memo has no matching row)."""
    files = [str(p) for p in batch.get("file", ())]
    names = [str(p) for p in batch.get("path", ())]
    known = {f: (int(sz), int(mt), str(k)) for f, sz, mt, k in zip(
        files, batch.get("known_size", ()), batch.get("known_mtime_ns", ()), batch.get("known_key", ())) if k}
    memo = _BlockMemo(known)
    res = hash_files(files, memo)
    errors = []
    for j in range(len(files)):
        err = res.errors.get(j, "")
        errors.append(names[j] + err[len(files[j]):] if err.startswith(files[j]) else err)  # as the user named it
    fresh = [memo.fresh.get(f) for f in files]
    return {"index": batch.get("index", np.zeros(0, np.int64)), "key": np.asarray([k or "" for k in res.keys], object),
            "error": np.asarray(errors, object), "size": np.asarray([f[0] if f else -1 for f in fresh], np.int64),
            "mtime_ns": np.asarray([f[1] if f else -1 for f in fresh], np.int64)}


def gpu_precision(amp) -> str:
    """The compute precision the local engine picks for ``amp`` on this worker's GPU."""
    import torch

    return resolve_precision(amp, torch.device("cuda"))


def decode_batch(batch: dict, preprocess, max_pixels: int) -> dict:
    """Decode + resize/crop each path to uint8 (crop, crop, 3); a failure is a row with ``error`` set."""
    from .loader import load_item

    n = len(batch.get("index", ()))
    crop = preprocess.crop
    images = np.zeros((n, crop, crop, 3), dtype=np.uint8)
    errors = [""] * n
    files = [str(p) for p in batch.get("file", ())]
    names = [str(p) for p in batch.get("path", ())]
    for j in range(n):
        arr, err = load_item(files[j], preprocess, max_pixels)
        if err is None:
            images[j] = arr
        else:  # name the input as the user gave it, as the local engine does
            errors[j] = names[j] + err[len(files[j]):] if err.startswith(files[j]) else err
    return {"index": batch.get("index", np.zeros(0, np.int64)), "path": batch.get("path", np.zeros(0, object)),
            "key": batch.get("key", np.zeros(0, object)), "image": images, "error": np.asarray(errors, dtype=object)}


class BackboneActor:
    """One model load per actor; checks it computes the driver's feature space, then runs batches."""

    def __init__(self, spec: dict):
        import torch

        from .engine import resolve_device

        self.device = resolve_device("cuda" if spec["gpu"] else "cpu")
        self.precision = spec["precision"]
        self.backbone = load_backbone(spec["backbone"], spec["weights"], spec["layer"], spec["pooling"]).with_decode(
            spec.get("decode"))
        self.backbone.to(self.device)
        space = self.backbone.feature_space(dtype=spec["dtype"], precision=self.precision)
        if space.digest != spec["digest"]:
            raise ProbeError(
                f"Ray worker on {os.uname().nodename}: {spec['backbone']} loads a different feature space than the "
                f"driver's (is the same probe / weights file installed on every node?)"
            )
        from .runtime import make_runner

        # The runtime as the local engine runs it; without a cache folder here, auto stays eager.
        self.runner = make_runner(self.backbone, spec.get("runtime", "eager"), self.device, self.precision, None)
        self.calls = 0
        self.tag = f"{os.uname().nodename}-{os.getpid()}-{time.time_ns()}"
        self._torch = torch

    def __call__(self, batch: dict) -> dict:
        from .engine import to_model_input

        torch = self._torch
        _maybe_crash()
        n = len(batch.get("index", ()))
        dim = self.backbone.dim
        feats = np.zeros((n, dim), dtype=np.float32)
        errors = np.asarray(batch.get("error", np.zeros(0, object)), dtype=object).copy()
        ok = np.flatnonzero(errors == "") if n else np.zeros(0, np.int64)
        self.calls += 1
        if len(ok):
            x = to_model_input(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])), self.backbone.preprocess,
                               self.device, self.runner.channels_last, self.device.type == "cuda")
            feats[ok] = self.runner(x)
            finite = np.isfinite(feats).all(axis=1)
            for j in ok[~finite[ok]]:
                errors[j] = f"{batch['path'][j]}: non-finite features"
                feats[j] = 0.0
        return {"index": batch.get("index", np.zeros(0, np.int64)), "path": batch.get("path", np.zeros(0, object)),
                "key": batch.get("key", np.zeros(0, object)), "error": errors, "features": feats,
                "batch": np.asarray([f"{self.tag}-{self.calls}"] * n, dtype=object)}


def _maybe_crash() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


class _SegmentPublisher(FeatureStore):
    """A write-only view of a feature space for a sink task: publishes segments, never indexes the others (a
    sink task on a cache of thousands of segments must not open them all after each write)."""

    def refresh(self) -> None:
        pass


class CacheSink(_Datasink):
    """Writes each write task's rows as one cache segment named by its keys (see :func:`segment_name`);
    collects failures and published segment names on the driver."""

    def __init__(self, space_dir: str, space: dict, meta: dict):
        self.space_dir = space_dir
        self.space = space
        self.meta = meta
        self.failures: dict[int, str] = {}
        self.segments: list[str] = []
        self.skipped = 0
        self.batches: set[str] = set()

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        keys, paths, feats, failures, batches = [], [], [], [], set()
        for block in blocks:
            acc = BlockAccessor.for_block(block)
            if acc.num_rows() == 0:
                continue  # empty blocks arrive without columns
            b = acc.to_batch_format("numpy")
            batches.update(str(x) for x in b["batch"])
            err = b["error"]
            failures.extend((int(b["index"][j]), str(err[j])) for j in range(len(err)) if err[j])
            ok = np.flatnonzero(err == "")
            keys.extend(str(b["key"][j]) for j in ok)
            paths.extend(str(b["path"][j]) for j in ok)
            f = b["features"]
            feats.append(np.asarray(np.stack(f) if f.dtype == object else f, dtype=np.float32)[ok])
        out = {"segment": None, "skipped": False, "failures": failures, "batches": sorted(batches)}
        if not keys:
            return out
        store = _SegmentPublisher(Path(self.space_dir), FeatureSpace.from_dict(self.space), scan=False)
        with store.lock():  # shared, like every writer: an exclusive compact/rm on this node waits
            existing = sorted(store.segments_dir.glob(f"seg-*-ray-{keys_digest(keys)}.h5"))
            if existing:  # a retried write whose first attempt was published: never publish the same rows twice
                out.update(segment=existing[0].name, skipped=True)
                return out
            path = store.write_segment(keys, np.concatenate(feats), paths, meta=self.meta, name=segment_name(keys))
        out["segment"] = path.name
        return out

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.failures.update(dict(r["failures"]))
            self.batches.update(r["batches"])
            if r["segment"]:
                self.segments.append(r["segment"])
                self.skipped += bool(r["skipped"])
