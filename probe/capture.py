"""Traffic capture: which inputs a served model saw, and when (torch-free).

``probe serve --capture`` stores the features of every served input in the model's feature space of the cache
(through the extraction engine, so as crash-safe as extraction) and appends one line per input to

    <cache>/served/<model-name>.jsonl     {"time": ISO-8601 UTC, "key": sha256, "space": space id, "version": n}

Each line is one ``write`` on a file opened with ``O_APPEND``, so concurrent writers never interleave inside a
line; a crash can at worst leave a partial *last* line, which :func:`served_keys` skips. The features are
written before their lines, so every logged key has a row in the cache.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import ProbeError

log = logging.getLogger(__name__)

SERVED_DIR = "served"
SERVED = "served"  #: the word that stands for captured traffic where a data source is expected (`probe drift`)


def served_log_path(cache: str | os.PathLike, model_name: str) -> Path:
    """``<cache>/served/<model-name>.jsonl`` (the name reduced to a safe file name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"
    return Path(cache) / SERVED_DIR / f"{safe}.jsonl"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class ServedLog:
    """Appends served keys to a model's log, one ``os.write`` per line."""

    def __init__(self, cache: str | os.PathLike, model_name: str):
        self.path = served_log_path(cache, model_name)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def append(self, keys: Iterable[str], space: str, version=None) -> None:
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            t = _now()
            for key in keys:
                line = json.dumps({"time": t, "key": key, "space": space, "version": version}) + "\n"
                os.write(self._fd, line.encode())

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _parse_time(value) -> dt.datetime:
    t = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def served_records(cache: str | os.PathLike, model_name: str) -> list[dict]:
    """Every well-formed line of a model's served log, in order (a malformed line, e.g. a torn last line
    after a crash, is skipped with a warning). No log yet: an empty list."""
    path = served_log_path(cache, model_name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError("no key")
        except ValueError:
            log.warning("%s:%d: skipping a malformed line", path, n)
            continue
        out.append(rec)
    return out


def served_keys(cache: str | os.PathLike, model_name: str, since=None, space: str | None = None) -> list[str]:
    """Distinct cache keys of inputs served by ``model_name`` (first-seen order), optionally only those served at
    or after ``since`` (a datetime or ISO string; naive means UTC) and only those in feature space ``space``."""
    start = None if since is None else _parse_time(since)
    keys: dict[str, None] = {}
    for rec in served_records(cache, model_name):
        if space is not None and rec.get("space") != space:
            continue
        if start is not None:
            try:
                if _parse_time(rec.get("time")) < start:
                    continue
            except (TypeError, ValueError):
                continue
        keys.setdefault(rec["key"], None)
    return list(keys)


@dataclass
class ServedFeatures:
    """Captured traffic as drift's ``current_features``: keys, display names, features (read from the cache)."""

    keys: list[str]
    paths: list[str]
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def served_model_name(model_ref, model) -> str:
    """The name a server logs traffic under: the registry name, or the model file's stem."""
    registry = (getattr(model, "meta", None) or {}).get("registry") or {}
    return registry.get("name") or Path(str(model_ref)).stem


def served_features(cache: str | os.PathLike, model, model_name: str, since=None) -> ServedFeatures:
    """Features of the inputs ``model_name`` served (``probe serve --capture``) in ``model``'s feature space,
    read from the cache: nothing is re-extracted."""
    from .cache import FeatureCache

    space_id = model.backbone_["space_digest"][:16]
    keys = served_keys(cache, model_name, since=since, space=space_id)
    if not keys:
        raise ProbeError(f"{served_log_path(cache, model_name)}: no captured traffic of {model_name!r} in feature "
                         f"space {space_id} (serve the model with `probe serve --capture --cache {cache}`)")
    fc = FeatureCache(cache)
    store = fc.open_path(fc.find(space_id))
    try:
        present = [k for k in keys if k in store]
        if len(present) < len(keys):
            log.warning("%d served keys have no features in %s (removed from the cache?); using the other %d",
                        len(keys) - len(present), cache, len(present))
        if not present:
            raise ProbeError(f"{cache}: none of the {len(keys)} served inputs of {model_name!r} has features cached")
        return ServedFeatures(present, [f"served:{k[:16]}" for k in present], store.get(present))
    finally:
        store.close()
