"""The dynamic batcher: gathers inputs of concurrent requests into one model batch, off the event loop.

    request -> submit(items) --queue--> collector task: first item, then more until max_batch items
               or max_wait after the first --> run_batch(items) on ONE worker thread --> futures resolved

While a batch runs, new requests queue up, so under load the next batch forms without waiting at all. The
collector waits (up to ``max_wait``) only for requests it knows are on their way: those announced with
:meth:`Batcher.expecting` (the server announces a request while it reads and decodes it). So a lone request on an
idle server runs at once, and concurrent requests still meet in one batch. ``run_batch`` returns one result per item (a
value or an exception for that item); if it raises, every item of the batch gets that error and the collector
carries on: a failing batch never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


@dataclass
class BatcherStats:
    batches: int = 0  # run_batch calls
    items: int = 0  # inputs that went through them
    largest: int = 0  # the largest batch so far
    busy_s: float = 0.0  # time spent in run_batch

    def to_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0,
                "busy_s": round(self.busy_s, 3)}


class Batcher:
    """Runs ``run_batch(list_of_items) -> list_of_results`` on one worker thread, batching concurrent submits.

    Create it, then ``await start()`` inside the event loop and ``await stop()`` on shutdown.
    """

    def __init__(self, run_batch: Callable[[list], Sequence[Any]], max_batch: int = 16, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatcherStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="probe-model")
        self._stats_lock = threading.Lock()
        self.pending = 0  # requests announced by expecting() that have not submitted yet

    @contextlib.contextmanager
    def expecting(self):
        """Announce a request that will submit soon (while it is read and decoded): batches wait for it."""
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(), name="probe-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._worker.shutdown(wait=True)

    async def submit(self, items: Sequence) -> list:
        """Results for ``items`` (in order); raises the first item's exception if any item failed."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures):
            self._queue.put_nowait((item, fut))
        try:
            return list(await asyncio.gather(*futures))
        finally:  # on a timeout or disconnect, items still queued are dropped by the collector
            for fut in futures:
                fut.cancel()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if self.pending <= 0:
                    break  # nobody else is on the way: waiting would only add latency
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # abandoned by their request
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._worker, self._timed, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except Exception as e:  # noqa: BLE001 - the collector must survive any batch failure
                log.exception("batch of %d failed", len(items))
                results = [e] * len(items)
            for (_, fut), res in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _timed(self, items: list) -> Sequence:
        t = time.perf_counter()
        try:
            return self.run_batch(items)
        finally:
            with self._stats_lock:
                self.stats.batches += 1
                self.stats.items += len(items)
                self.stats.largest = max(self.stats.largest, len(items))
                self.stats.busy_s += time.perf_counter() - t
