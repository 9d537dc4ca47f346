"""Batch-size auto-tuning: time the runner's forward pass at a few batch sizes on this device, keep the fastest.

GPU-style batch sizes are wrong on a CPU (measured: EfficientNet-Lite0 on 2 cores ran faster at batch 4-16 than
at 32), so the choice is made per (backbone, device, threads, precision, torch version, runtime) and remembered
per machine in a user-level file (:func:`memo_file`: the platform's user cache folder, e.g.
``~/.cache/probe/tuning.json``), shared by every cache folder: the few seconds of tuning are paid once per
machine, not once per cache folder. The runtime choice (probe/runtime.py) is remembered in the same memo. A
``tuning.json`` inside a cache folder (where earlier versions kept the memo) is still read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .backbones import Backbone
from .errors import ProbeError
from .files import atomic_write_text

log = logging.getLogger(__name__)

#: Environment variables naming the per-machine memo: the file itself, or a folder that holds ``tuning.json``.
ENV_FILE = "PROBE_TUNING_FILE"
ENV_HOME = "PROBE_HOME"
MEMO_NAME = TUNING_FILE = "tuning.json"  # also the name of the older per-cache-folder memo

CPU_CANDIDATES = (1, 4, 8, 16, 32)
CUDA_CANDIDATES = (32, 64, 128, 256)
ROUNDS = 2


def measure_throughput(runner, batch_size: int, input_size: int, min_seconds: float = 0.3,
                       max_iters: int = 5) -> float:
    """Images per second of ``runner`` (a :class:`probe.runtime.Runner`) on random input at ``batch_size``
    (after one warm-up)."""
    fmt = torch.channels_last if runner.channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, input_size, input_size, device=runner.device).contiguous(memory_format=fmt)
    runner(x)
    _sync(runner.device)
    t0 = time.perf_counter()
    iters = 0
    while iters < max_iters and (iters == 0 or time.perf_counter() - t0 < min_seconds):
        runner(x)
        iters += 1
    _sync(runner.device)
    return iters * batch_size / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memo_file() -> Path:
    """The per-machine memo: ``$PROBE_TUNING_FILE``, else ``$PROBE_HOME/tuning.json``, else ``tuning.json`` in
    the platform's user cache folder (``platformdirs.user_cache_dir("probe")``)."""
    if os.environ.get(ENV_FILE):
        return Path(os.environ[ENV_FILE])
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]) / MEMO_NAME
    import platformdirs

    return Path(platformdirs.user_cache_dir("probe")) / MEMO_NAME


def read_memo(path: str | os.PathLike) -> dict:
    """A tuning memo (batch sizes and runtime choices); empty when missing or unreadable."""
    try:
        memo = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def update_memo(path: str | os.PathLike, key: str, value: dict) -> None:
    """Remember ``value`` under ``key`` (re-read, update, atomic replace). A memo that cannot be written (a
    read-only home) is logged, not raised: it only costs measuring again next time."""
    path = Path(path)
    memo = read_memo(path)  # re-read: another process may have added entries meanwhile
    memo[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(memo, indent=2))
    except (OSError, ProbeError) as e:  # ProbeError: atomic_path refused the target or the folder
        log.warning("cannot remember the choice in %s (%s)", path, e)


def memo_key(backbone: Backbone, device: torch.device, precision: str, runtime: str = "eager") -> str:
    return "|".join(
        [backbone.name, backbone.layer, str(backbone.preprocess.crop), str(device), precision,
         str(torch.get_num_threads()), torch.__version__, runtime]
    )


def remembered_batch_size(backbone: Backbone, device: torch.device, precision: str,
                          also: Sequence[str | os.PathLike] = (), runner=None) -> int | None:
    """The batch size remembered for this (backbone, device, threads, precision, torch, runtime) in the
    per-machine memo, or else in one of the ``also`` memos (a cache folder's ``tuning.json``)."""
    key = memo_key(backbone, device, precision, runner.name if runner is not None else "eager")
    return _remembered(key, [memo_file(), *map(Path, also)])


def _remembered(key: str, paths: Sequence[Path]) -> int | None:
    for path in paths:
        entry = read_memo(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("batch_size"), int) and entry["batch_size"] >= 1:
            return entry["batch_size"]
    return None


def tuned_batch_size(backbone: Backbone, device: torch.device, precision: str,
                     memo_path: str | os.PathLike | None, default: int, runner=None,
                     also: Sequence[str | os.PathLike] = ()) -> int:
    """The fastest batch size for ``runner`` (default: eager PyTorch): remembered, or measured now and remembered.
    ``memo_path`` None: the per-machine memo (:func:`memo_file`), also reading ``also``; a path: that file only."""
    if runner is None:
        from .runtime import EagerRunner

        runner = EagerRunner(backbone, device, precision)
    paths = [memo_file(), *map(Path, also)] if memo_path is None else [Path(memo_path)]
    key = memo_key(backbone, device, precision, runner.name)
    found = _remembered(key, paths)
    if found is not None:
        return found
    candidates = list(CUDA_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES)
    rates: dict[int, float] = {}
    # Interleaved rounds, best rate per candidate: interference from other processes only ever slows a
    # measurement down, so the maximum is the robust estimate (one round picked batch 8 over 4 here, by noise).
    for _ in range(ROUNDS):
        for bs in list(candidates):
            try:
                rates[bs] = max(rates.get(bs, 0.0), measure_throughput(runner, bs, backbone.preprocess.crop))
            except torch.OutOfMemoryError:
                candidates = [c for c in candidates if c < bs]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not rates:
        return default
    best = max(rates, key=rates.get)
    log.info("batch-size tuning for %s (%s) on %s: %s -> %d", backbone.name, runner.name, device,
             {k: round(v, 1) for k, v in rates.items()}, best)
    update_memo(paths[0], key, {"batch_size": best, "images_per_second": {str(k): v for k, v in rates.items()}})
    return best
