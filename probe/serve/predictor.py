"""What the server predicts with: the model now served, where it comes from, and one batch's predictions.

A *model source* says which version is current (cheaply, polled) and loads it:

    FileSource(path)          a ``.probe`` file; replacing the file (atomically) is a new version
    RegistrySource(ref, reg)  ``NAME`` / ``NAME@champion`` / ``NAME@3`` in the model registry

:class:`Predictor` holds the :class:`ServedModel` (model + its Extractor) behind one reference. ``refresh()``
loads a new version on the caller's thread and swaps the reference in one assignment; a batch reads the
reference once when it starts, so batches in flight finish on the model they started with and no request fails
during a swap. Features come from the model's own :class:`~probe.engine.Extractor`, so they are computed exactly
as ``probe predict`` computes them (and, with capture on, stored in the cache as extraction stores them).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..capture import ServedLog
from ..errors import ImageDecodeError, ProbeError
from ..model import ProbeModel, load
from ..prediction import ranked_classes
from ..sources import sha256_file

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    model: ProbeModel
    name: str  # registry name, or the file's stem
    version: Any  # registry version number; None for a plain file
    ident: str  # what the source compares to detect a new version
    info: dict = field(default_factory=dict)  # where it came from: path, sha256, reference, registry status...
    extractor: Any = None
    loaded_at: float = field(default_factory=time.time)


class ModelSource(Protocol):
    def identity(self) -> str:
        """A cheap identity of the version now current (polled)."""

    def load(self) -> ServedModel:
        """Load the current version."""


class FileSource:
    """A ``.probe`` file; a new file put in its place (rename) is picked up as a new version."""

    def __init__(self, path: str | os.PathLike, *, trust: bool = False):
        self.path = Path(path)
        self.trust = trust

    def identity(self) -> str:
        try:
            st = self.path.stat()
        except OSError as e:
            raise ProbeError(f"{self.path}: cannot read the model file ({e.strerror or e})") from e
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def load(self) -> ServedModel:
        ident = self.identity()
        model = load(self.path, trust=self.trust)
        sha = sha256_file(self.path)
        return ServedModel(model, self.path.stem, None, ident, {"path": str(self.path), "sha256": sha})


class RegistrySource:
    """A registry reference (``NAME``, ``NAME@champion``, ``NAME@3``): follows promotions and rollbacks."""

    def __init__(self, ref: str, registry=None, *, trust: bool = False):
        from ..registry import Registry

        self.ref = ref
        self.registry = registry if isinstance(registry, Registry) else Registry(registry) if registry else Registry()
        self.trust = trust

    def _resolve(self):
        return self.registry.resolve(self.ref)

    def identity(self) -> str:
        mv = self._resolve()
        return f"{mv.name}:{mv.version}:{mv.sha256}"

    def load(self) -> ServedModel:
        from ..registry import load_model

        mv = self._resolve()
        model = load_model(mv.ref, registry=self.registry, trust=self.trust)  # pinned: NAME@VERSION, sha256 checked
        lineage = {k: getattr(mv, k, None) for k in ("parent", "created", "user", "host", "n_train", "keys_digest",
                                                     "sources", "gate")}
        info = {"reference": self.ref, "ref": mv.ref, "registry": str(self.registry.root), "path": str(mv.path),
                "sha256": mv.sha256, "status": mv.status, "is_champion": mv.is_champion, "lineage": lineage}
        return ServedModel(model, mv.name, mv.version, f"{mv.name}:{mv.version}:{mv.sha256}", info)


def ranked(proba: np.ndarray, classes: list[str]) -> list[dict]:
    """Every class with its probability, most probable first (ties in class order), as JSON objects."""
    return [{"class": c, "probability": p} for c, p in ranked_classes(proba, classes)]


class Predictor:
    """The served model and the function the batcher runs on its worker thread."""

    def __init__(self, source: ModelSource, *, cache=None, capture: bool = False, max_pixels: int | None = None,
                 extract_options: dict | None = None):
        if capture and cache is None:
            raise ProbeError("traffic capture needs a feature cache (--cache DIR)")
        self.source = source
        self.cache = cache
        self.capture = capture
        self.max_pixels = max_pixels
        self.extract_options = dict(extract_options or {})
        self.swaps = 0
        self.model_batches = 0  # forward passes of the backbone (Extractor stats)
        self._logs: dict[str, ServedLog] = {}
        self._swap_lock = threading.Lock()
        self._failed_ident: str | None = None
        self.current: ServedModel = self._prepare(source.load())

    # -- loading and swapping --------------------------------------------------------------------------------

    def _prepare(self, served: ServedModel, previous: ServedModel | None = None) -> ServedModel:
        """Attach an Extractor; a new version on the same feature space reuses the loaded backbone."""
        if previous is not None and previous.model.backbone_ == served.model.backbone_:
            served.extractor = previous.extractor
            return served
        # The forward passes use the engine's own batch size for the device (unless given): a gathered batch
        # larger than what the device runs best is split, as `probe predict` would split it.
        options = dict(self.extract_options)
        options.setdefault("workers", 0)  # decoding already happened in the server's thread pool
        options.setdefault("progress", False)
        if self.max_pixels is not None:
            options.setdefault("max_pixels", self.max_pixels)
        ex = served.model.extractor(self.cache, write=self.capture, **options)
        if ex.batch_size is None:  # the device's default, never the one-off tuning run (it would write the cache)
            from ..engine import DEFAULT_CPU_BATCH, DEFAULT_CUDA_BATCH

            ex.batch_size = DEFAULT_CUDA_BATCH if ex.device.type == "cuda" else DEFAULT_CPU_BATCH
        served.extractor = ex
        return served

    def refresh(self) -> bool:
        """Load and swap in the source's current version if it changed; True when a swap happened. A version
        that fails to load is logged once and the current model keeps serving."""
        with self._swap_lock:
            ident = self.source.identity()
            if ident == self.current.ident or ident == self._failed_ident:
                return False
            old = self.current
            try:
                new = self._prepare(self.source.load(), old)
            except Exception as e:  # noqa: BLE001 - a bad new version must not take the service down
                log.error("cannot load the new model version (%s): %s; still serving %s version %s",
                          ident, e, old.name, old.version)
                self._failed_ident = ident
                return False
            if new.ident == old.ident:
                return False
            self.current = new  # one reference assignment: batches read it once when they start
            self._failed_ident = None
            self.swaps += 1
            log.info("now serving %s version %s (was %s)", new.name, new.version, old.version)
            return True

    # -- one batch ---------------------------------------------------------------------------------------

    def run_batch(self, images: list) -> list:
        """Predictions for decoded PIL images: one dict (or ImageDecodeError) per image, with every class
        ranked by probability and the model name and version that made it."""
        served = self.current
        ex = served.extractor
        fs = ex.extract(images, strict=False)
        self.model_batches += fs.stats.model_batches
        classes = [str(c) for c in served.model.classes_]
        out: list = [None] * len(images)
        for f in fs.failures:
            out[f.index] = ImageDecodeError(f.error)
        if len(fs):
            proba = served.model.predict_proba_features(fs.features)
            for j, i in enumerate(fs.indices):
                order = ranked(proba[j], classes)
                out[i] = {"class": order[0]["class"], "probability": order[0]["probability"], "ranked": order,
                          "key": fs.keys[j], "model": served.name, "version": served.version}
            if self.capture:
                self._log(served).append(fs.keys, ex.space.id, served.version)
                # Each captured batch is a new segment, read back once: close the handles so that a long-running
                # server does not keep one open file per batch it ever served.
                ex.store.close()
        return [r if r is not None else ImageDecodeError("<image>: no result") for r in out]

    def _log(self, served: ServedModel) -> ServedLog:
        lg = self._logs.get(served.name)
        if lg is None:
            lg = self._logs[served.name] = ServedLog(self.cache, served.name)
        return lg

    def close(self) -> None:
        for lg in self._logs.values():
            lg.close()
