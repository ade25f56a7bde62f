"""Dynamic batching: concurrent requests whose options match decode in one engine call.

    batcher = Batcher(run, max_batch=16, max_wait_s=0.010, max_queue=256, on_batch=record)
    await batcher.start()
    results = await batcher.submit(key, rows)      # one result per row, in order
    await batcher.close()                          # finishes what is queued, then stops

A request is a list of rows (one prompt and seed per image, one image and question per answer) and a ``key``: the
options every row of an engine call shares (steps, guidance, ...). The oldest queued request opens a batch and
fixes its key; younger requests with the same key join it in arrival order while the batch has room for all their
rows (``max_batch`` rows; a request larger than that runs alone) and the oldest has waited less than
``max_wait_s``. Requests with other keys wait for a later batch, which they open in their turn, so no key starves
another. ``run(key, rows)`` is called on one worker thread (the pipeline serialises its engine anyway) and must
return one result per row; since every row carries its own seed and the engine's outputs for a row do not depend
on its neighbours, a request's result is the same alone and in any batch.

Back-pressure: at most ``max_queue`` rows wait; ``submit`` beyond that raises ``QueueFull`` at once (the server
answers 429). After ``close()`` begins, ``submit`` raises ``Closed`` (503) and everything already queued still
runs to the end.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """More rows are waiting than the server accepts."""


class Closed(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class _Request:
    key: Hashable
    rows: Sequence
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What one engine call did, for metrics: rows, requests, seconds queued per request, seconds run, and its
    results (None when it failed)."""

    key: Hashable
    rows: int
    requests: int
    queued_s: list[float]
    run_s: float
    results: list | None


class Batcher:
    def __init__(self, run: Callable[[Hashable, list], list], *, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[BatchStats], None] | None = None, executor: ThreadPoolExecutor | None = None):
        if max_batch < 1 or max_queue < 1 or not max_wait_s >= 0:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1, "
                             f"max_wait_s={max_wait_s} >= 0")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._own_executor = executor is None  # an executor passed in is shared, and its owner shuts it down
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastface-batch")
        self._pending: deque[_Request] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def queued_rows(self) -> int:
        return sum(len(r.rows) for r in self._pending)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="fastface-batcher")

    async def submit(self, key: Hashable, rows: Sequence) -> list:
        if self._closing:
            raise Closed("the server is shutting down")
        if self._task is None:
            raise RuntimeError("Batcher.start() has not run")
        if not rows:
            return []
        if self.queued_rows + len(rows) > self.max_queue:
            raise QueueFull(f"{self.queued_rows} rows are queued (at most {self.max_queue}); retry later")
        request = _Request(key, rows, asyncio.get_running_loop().create_future())
        self._pending.append(request)
        self._wake.set()
        return await request.future

    async def close(self) -> None:
        """Stop taking work, finish every queued request, stop the loop."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._fill(self._pending[0])
            batch = self._take(self._pending[0].key)
            await self._execute(batch)

    async def _fill(self, first: _Request) -> None:
        """Wait until the batch ``first`` opens is full or ``first`` has waited ``max_wait_s``."""
        while not self._closing:
            if self._rows_of(first.key) >= self.max_batch:
                return
            left = first.arrived + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=left)
            except asyncio.TimeoutError:
                return

    def _rows_of(self, key) -> int:
        return sum(len(r.rows) for r in self._pending if r.key == key)

    def _take(self, key) -> list[_Request]:
        """The oldest request, then each younger one of its key that still fits, in arrival order."""
        batch, rows, keep = [], 0, deque()
        for request in self._pending:
            if request.key == key and (not batch or rows + len(request.rows) <= self.max_batch):
                batch.append(request)
                rows += len(request.rows)
            else:
                keep.append(request)
        self._pending = keep
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        rows = [row for request in batch for row in request.rows]
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        results = None
        try:
            results = await loop.run_in_executor(self._executor, self.run, batch[0].key, rows)
            if len(results) != len(rows):
                raise RuntimeError(f"batch run returned {len(results)} results for {len(rows)} rows")
        except Exception as exc:  # every request of the batch gets the error; the loop goes on
            results = None
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        finally:
            if self.on_batch is not None:
                self.on_batch(BatchStats(batch[0].key, len(rows), len(batch), [start - r.arrived for r in batch],
                                         time.monotonic() - start, results))
        i = 0
        for request in batch:
            n = len(request.rows)
            if not request.future.done():  # a client that went away cancelled its future
                request.future.set_result(results[i : i + n])
            i += n
