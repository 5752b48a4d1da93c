"""Dynamic batching: requests wait a few milliseconds so that compatible ones share a UNet batch.

The batcher knows nothing about diffusion: it queues opaque items with a batch key, forms batches
of at most `max_batch` items of one key (the most common key first, for full batches, but never
past an item that has waited too long), and runs each batch with `run(items, should_stop)` on one
worker thread (the engine is not thread-safe and one batch at a time keeps the device full).
Results and errors go back to each item's future; a failing batch fails only its own items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# An item that has waited this many (mean) batch run times beyond max_wait is served next.
STARVATION_BATCHES = 4


class QueueFull(Exception):
    """The bounded queue cannot take the request: answered 503 with Retry-After."""

    def __init__(self, retry_after: float):
        super().__init__(f"the queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class Cancelled(Exception):
    """Raised inside a running batch when every one of its items was abandoned by its client."""


@dataclass(eq=False)
class Pending:
    item: object
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics."""

    size: int
    key: Hashable
    waited: list[float]  # seconds each item spent queued
    seconds: float  # run time of the batch
    error: str | None = None


class QueueFront:
    """What the app asks of either batcher: is it stopping, how many images wait."""

    _closing: bool
    _queue: Sized

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def depth(self) -> int:
        return len(self._queue)


class Batcher(QueueFront):
    def __init__(self, run: Callable[[Sequence, Callable[[], bool]], list], max_batch: int,
                 max_wait_s: float, capacity: int,
                 on_batch: Callable[[BatchStats], None] = lambda stats: None,
                 on_depth: Callable[[int], None] = lambda depth: None):
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError("max_batch and capacity must be >= 1, max_wait_s >= 0")
        self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.capacity = capacity
        self._on_batch, self._on_depth = on_batch, on_depth
        self._queue: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compinv-batch")
        self._batch_seconds = 1.0  # running mean of a batch's run time: the Retry-After hint

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="compinv-batcher")

    async def close(self) -> None:
        """Stop taking work, finish everything already queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)

    # -- submitting ------------------------------------------------------------------------
    def submit(self, items: Sequence, key: Hashable) -> list[asyncio.Future]:
        """Queue all of a request's items (all or none). Raises QueueFull or ShuttingDown."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if len(self._queue) + len(items) > self.capacity:
            batches_ahead = (len(self._queue) + len(items)) / self.max_batch + 1
            raise QueueFull(max(1.0, batches_ahead * self._batch_seconds))
        loop = asyncio.get_running_loop()
        pending = [Pending(item, key, loop.create_future()) for item in items]
        self._queue.extend(pending)
        self._on_depth(len(self._queue))
        self._wake.set()
        return [p.future for p in pending]

    # -- the worker ------------------------------------------------------------------------
    def _drop_abandoned(self) -> None:
        if any(p.future.done() for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.future.done())
            self._on_depth(len(self._queue))

    def _ready(self) -> list[Pending] | None:
        """The next batch, or None to keep waiting. An item that has waited several batch times
        beyond max_wait goes first, so a rare key never starves (checked before full batches:
        under load another key always has a full batch). Otherwise a full batch of any key goes
        at once, and once the oldest item has waited max_wait, the key with the most waiting
        items goes (fuller batches, more images/s)."""
        self._drop_abandoned()
        if not self._queue:
            return None
        groups: dict = {}
        for p in self._queue:
            groups.setdefault(p.key, []).append(p)
        full = [g for g in groups.values() if len(g) >= self.max_batch]
        oldest = self._queue[0]
        waited = time.monotonic() - oldest.enqueued
        if waited > self.max_wait_s + STARVATION_BATCHES * self._batch_seconds:
            chosen = groups[oldest.key]
        elif full:
            chosen = full[0]
        elif waited < self.max_wait_s and not self._closing:
            return None
        else:
            chosen = max(groups.values(), key=len)  # ties: the older key (dicts keep order)
        batch = chosen[: self.max_batch]
        taken = set(map(id, batch))
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        self._on_depth(len(self._queue))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._ready()
            if batch is None:
                if self._closing and not self._queue:
                    return
                self._wake.clear()
                timeout = None
                if self._queue:
                    timeout = max(0.0, self._queue[0].enqueued + self.max_wait_s - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._execute(loop, batch)

    async def _execute(self, loop, batch: list[Pending]) -> None:
        started = time.monotonic()
        futures = [p.future for p in batch]

        def abandoned() -> bool:  # polled by the engine between denoising steps
            return all(f.done() for f in futures)

        error = None
        try:
            results = await loop.run_in_executor(
                self._pool, self._run, [p.item for p in batch], abandoned)
            if len(results) != len(batch):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(batch)} items")
        except Cancelled:
            results, error = None, "cancelled"
        except Exception as exc:  # a failing batch fails its requests, not the server
            log.exception("batch of %d failed", len(batch))
            results, error = None, f"{type(exc).__name__}: {exc}"
            for f in futures:
                if not f.done():
                    f.set_exception(BatchFailed(error))
        else:
            for f, r in zip(futures, results):
                if f.done():
                    continue
                if isinstance(r, BaseException):  # this item's request was bad, not the batch
                    f.set_exception(r)
                else:
                    f.set_result(r)
        seconds = time.monotonic() - started
        if error is None:  # a batch that failed or stopped early says nothing of the wait ahead
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self._on_batch(BatchStats(len(batch), batch[0].key,
                                  [started - p.enqueued for p in batch], seconds, error))


class BatchFailed(Exception):
    """The batch holding this item raised: the request gets a 500 with this message."""
