"""What an extraction run returns, with no torch import: the features of its inputs (:class:`FeatureSet`), its
counters and time split (:class:`ExtractStats`), the inputs that failed (:class:`Failure`) and the JSON run report.

Prediction, training and reporting code reads these without paying for torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .cache import FeatureStore
from .errors import ProbeError, StrictModeError
from .files import atomic_write_text
from .space import FeatureSpace

#: Where `probe extract` writes its run report inside the cache folder unless told otherwise.
RUN_REPORT_FILE = "last-extract.json"


@dataclass
class Failure:
    index: int  # position in the run's inputs
    path: str
    error: str


@dataclass
class ExtractStats:
    inputs: int = 0
    unique: int = 0
    cached: int = 0
    new: int = 0
    failed: int = 0
    files_hashed: int = 0  # files actually read for hashing (memo misses)
    model_batches: int = 0  # forward passes run; 0 on a fully cached run
    batch_size: int = 0
    workers: int = 0
    device: str = "cpu"
    precision: str = "float32"
    runtime: str = ""  # what computed the new features (eager, onnxruntime, openvino); "" when no model ran
    seconds: dict = field(
        default_factory=lambda: dict.fromkeys(("hash", "tune", "data_wait", "model", "write", "total"), 0.0))

    def summary(self) -> str:
        s = self.seconds
        return (
            f"{self.inputs} inputs ({self.unique} unique): {self.new} new, {self.cached} cached, {self.failed} failed | "
            f"{s['total']:.1f}s total: hash {s['hash']:.1f}s, "
            + (f"setup (runtime, batch-size tuning) {s['tune']:.1f}s, " if s["tune"] >= 0.05 else "")
            + f"waiting for data {s['data_wait']:.1f}s, "
            f"model {s['model']:.1f}s, writing {s['write']:.1f}s | batch {self.batch_size}, workers {self.workers}, "
            f"{self.device}/{self.precision}" + (f", {self.runtime}" if self.runtime else "")
        )


@dataclass
class FeatureSet:
    """The features of a run's successfully decoded inputs, aligned with their keys, paths and labels.

    ``features`` is loaded from the cache (in this order) on first access.
    """

    keys: list[str]
    paths: list[str]
    labels: list[str | None]
    indices: list[int]  # position of each row in the run's inputs
    failures: list[Failure]
    stats: ExtractStats
    space: FeatureSpace
    store: FeatureStore | None = field(default=None, repr=False)
    memory: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def features(self) -> np.ndarray:
        out = np.empty((len(self.keys), self.space.dim), dtype=np.float32)
        from_store = [i for i, k in enumerate(self.keys) if k not in self.memory]
        if from_store:
            out[from_store] = self.store.get([self.keys[i] for i in from_store])
        for i, k in enumerate(self.keys):
            if k in self.memory:
                out[i] = self.memory[k]
        return out

    @property
    def y(self) -> np.ndarray:
        missing = [p for p, lab in zip(self.paths, self.labels) if lab is None]
        if missing:
            raise ProbeError(f"{len(missing)} inputs have no label (e.g. {missing[0]}); use class folders or a label column")
        return np.asarray(self.labels, dtype=object)


def write_run_report(path: str | os.PathLike, fs: FeatureSet) -> Path:
    """A machine-readable JSON summary of a run (counts, timings, every failure), written atomically."""
    body = {
        "space": fs.space.id,
        "backbone": fs.space.backbone,
        "stats": asdict(fs.stats),
        "failures": [asdict(f) for f in fs.failures],
    }
    return atomic_write_text(path, json.dumps(body, indent=2) + "\n")


def record_name(record) -> str:
    """How an input is named in results and messages: its path, or ``<image>`` for an in-memory image."""
    return record.path if isinstance(record.path, (str, os.PathLike)) else "<image>"


def assemble(records, keys: list, failures: list[Failure], bad_keys: set, stats: ExtractStats, space: FeatureSpace,
             store: FeatureStore | None, *, t_start: float, strict: bool = False, memory: dict | None = None,
             engine: str = "extract") -> FeatureSet:
    """The FeatureSet of a run (local or distributed): every input sharing a failed input's key failed too (same
    bytes), failures sorted by input, the stats finished; ``strict`` raises StrictModeError after all of that,
    with everything extracted kept."""
    import logging
    import time

    rows, reported = [], {f.index for f in failures}
    for i, k in enumerate(keys):
        if k is None:
            continue
        if k in bad_keys:
            if i not in reported:
                failures.append(Failure(i, record_name(records[i]), "same bytes as an input that failed to decode"))
        else:
            rows.append(i)
    failures.sort(key=lambda f: f.index)
    stats.failed = len(failures)
    stats.seconds["total"] = time.perf_counter() - t_start
    logging.getLogger("probe.engine").info("%s: %s", engine, stats.summary())
    fs = FeatureSet(keys=[keys[i] for i in rows], paths=[record_name(records[i]) for i in rows],
                    labels=[records[i].label for i in rows], indices=rows, failures=failures, stats=stats,
                    space=space, store=store, memory=memory or {})
    if strict and failures:
        raise StrictModeError(f"{len(failures)} of {len(records)} inputs failed (first: {failures[0].error}); "
                              "everything else was extracted and cached")
    return fs
