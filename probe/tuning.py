"""Batch-size auto-tuning: time the runner's forward pass at a few batch sizes on this device, keep the fastest.

GPU-style batch sizes are wrong on a CPU (measured: EfficientNet-Lite0 on 2 cores ran faster at batch 4-16 than
at 32), so the choice is made per (backbone, device, threads, precision, torch version) and remembered in the
cache folder, costing a few seconds once. The runtime choice (probe/runtime.py) is remembered in the same memo.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .backbones import Backbone
from .files import atomic_write_text

log = logging.getLogger(__name__)

CPU_CANDIDATES = (1, 4, 8, 16, 32)
CUDA_CANDIDATES = (32, 64, 128, 256)
ROUNDS = 2
TUNING_FILE = "tuning.json"  # the memo's name in the cache folder


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


def read_memo(path: str | os.PathLike) -> dict:
    """The tuning memo (batch sizes and runtime choices); empty when missing or unreadable."""
    try:
        memo = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def update_memo(path: str | os.PathLike, key: str, value: dict) -> None:
    """Remember ``value`` under ``key`` (read, update, atomic replace)."""
    memo = read_memo(path)
    memo[key] = value
    atomic_write_text(path, json.dumps(memo, indent=2))


def tuned_batch_size(backbone: Backbone, device: torch.device, precision: str, memo_path: str | os.PathLike,
                     default: int, runner=None) -> int:
    """The fastest batch size for ``runner`` (default: eager PyTorch), measured once and remembered."""
    if runner is None:
        from .runtime import EagerRunner

        runner = EagerRunner(backbone, device, precision)
    key = "|".join(
        [backbone.name, backbone.layer, str(backbone.preprocess.crop), str(device), precision,
         str(torch.get_num_threads()), torch.__version__, runner.name]
    )
    memo = read_memo(memo_path)
    if key in memo:
        return int(memo[key]["batch_size"])
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
    update_memo(memo_path, key, {"batch_size": best, "images_per_second": {str(k): v for k, v in rates.items()}})
    return best
