"""Decode + resize + crop ahead of the model: inputs -> batches of uint8 crops, in input order.

    items --thread pool (decode, resize, crop; Pillow releases the GIL)--> bounded read-ahead --> batches

:func:`iter_batches` is the data side of the extraction engine. Every input becomes either a uint8
``(crop, crop, 3)`` array or a one-line failure message naming it; batches keep the input order and cover
``batch_size`` consecutive inputs each (failures included), so memory stays flat in the number of inputs.

Threads, not processes, by default. Measured on the 2-core CPU box with EfficientNet-Lite0 eager and 48 3000x2000
quality-90 JPEGs (benchmarks/bench_photos.py, 3 interleaved runs; preliminary: the box was shared with heavy
other load, load average ~10, so wall-clock rates swung 2-5x between runs; CPU times are the solid part):
decoding + resizing costs ~13-18 CPU ms per image with reduced decoding (43-72 exact), the forward pass ~26-40 CPU
ms per image in one torch thread. Decoding in the model's thread adds its whole cost to every batch (data wait
4.1 s of 29 s); one decode thread overlaps it with the forward pass (data wait 0.6 s). Since decoding and the
model share the cores, no pipeline can exceed model / (model + decode) ~ 0.6-0.7 of the forward-only rate on 2
cores. A second decode thread did not help on 2 cores (median 1.5 vs 2.9 img/s for one), hence
``DECODE_THREADS = 1`` on small machines. Lowering torch's threads by one next to the decode thread was 2-8x
faster in every run under that load (torch's two OpenMP threads stall when the decode thread or another process
takes one of their cores), but it is not measured on a quiet machine and would slow model-bound runs (small
PNGs, where the decode thread idles), so torch's threads are left alone: to be measured on a quiet machine.
Worker *processes* (``workers > 0``, torch's DataLoader) remain the default with CUDA, where many cores feed a
GPU and the GIL-holding parts of decoding (the Python around Pillow's calls, EXIF handling) could limit threads;
that case is not measured here (no GPU on this machine).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .errors import ImageDecodeError
from .preprocess import DEFAULT_MAX_PIXELS, Preprocess

#: Decode threads next to the model on machines with up to 4 cores (measured on 2 cores, see above).
DECODE_THREADS = 1

Batch = tuple[np.ndarray, "np.ndarray | None", list[tuple[int, str]]]


def default_threads() -> int:
    """Decode threads next to the model: 1 on small machines, up to 4 with more cores."""
    cores = os.cpu_count() or 1
    return DECODE_THREADS if cores <= 4 else min(4, cores // 4)


def load_item(item: str | os.PathLike | bytes | Image.Image, preprocess: Preprocess,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """One input -> (uint8 crop, None) or (None, a one-line message naming the input). Never raises for a bad
    input: a decoder bug must not kill the run either, it is reported like any other failure."""
    try:
        return preprocess.load(item, max_pixels), None
    except ImageDecodeError as e:
        msg = str(e)
        if msg.startswith("<image>:") and not isinstance(item, Image.Image):
            msg = f"{item}{msg[len('<image>'):]}"
        return None, msg
    except Exception as e:  # noqa: BLE001 - reported per input, see above
        return None, f"{item}: {type(e).__name__}: {e}"


def collate(results: Sequence[tuple[int, np.ndarray | None, str | None]]) -> Batch:
    """[(index, crop or None, message or None)] -> (indices of the crops, stacked crops or None, failures)."""
    ok = [(i, a) for i, a, _ in results if a is not None]
    failed = [(i, err) for i, a, err in results if a is None]
    if not ok:
        return np.empty(0, dtype=np.int64), None, failed
    return np.asarray([i for i, _ in ok], dtype=np.int64), np.stack([a for _, a in ok]), failed


def iter_batches(items: Sequence, preprocess: Preprocess, batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None, workers: int = 0, read_ahead: int | None = None) -> Iterator[Batch]:
    """Yield ``(indices, uint8 (n, crop, crop, 3) array or None, [(index, message)])`` per ``batch_size``
    consecutive items, in order. Indices are positions in ``items``.

    ``threads`` decode threads run up to ``read_ahead`` items (default: two batches) ahead of the consumer;
    ``threads=0`` decodes in the calling thread. ``workers > 0`` uses that many worker processes instead
    (torch's DataLoader). Closing the generator early cancels what was not started.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if workers > 0:
        yield from _process_batches(items, preprocess, batch_size, max_pixels, workers)
        return
    threads = default_threads() if threads is None else threads
    if threads == 0:
        for start in range(0, len(items), batch_size):
            yield collate([(i, *load_item(items[i], preprocess, max_pixels))
                           for i in range(start, min(start + batch_size, len(items)))])
        return
    read_ahead = max(read_ahead or 2 * batch_size, threads)
    pending: deque = deque()
    done: list = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probe-decode") as pool:
        try:
            submitted = 0
            for _ in range(len(items)):
                while submitted < len(items) and len(pending) < read_ahead:
                    pending.append((submitted, pool.submit(load_item, items[submitted], preprocess, max_pixels)))
                    submitted += 1
                i, future = pending.popleft()
                done.append((i, *future.result()))
                if len(done) == batch_size:
                    yield collate(done)
                    done = []
            if done:
                yield collate(done)
        finally:
            for _, future in pending:
                future.cancel()


class _Dataset:
    """Map-style dataset for torch's DataLoader (worker processes): item i -> (i, crop or None, message)."""

    def __init__(self, items, preprocess, max_pixels):
        self.items, self.preprocess, self.max_pixels = items, preprocess, max_pixels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return (i, *load_item(self.items[i], self.preprocess, self.max_pixels))


def _process_batches(items, preprocess, batch_size, max_pixels, workers) -> Iterator[Batch]:
    from torch.utils.data import DataLoader

    loader = DataLoader(_Dataset(items, preprocess, max_pixels), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate, prefetch_factor=4)
    yield from loader
