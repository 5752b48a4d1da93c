"""Step-level batching for the server: one worker thread runs the engine's continuous denoise loop
(compinv_rt.generate.stepper) and, at every step boundary, admits queued requests and hands out
finished ones. The queue rules (bounded, all-or-none per request, abandoned items dropped) are
batcher.py's."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from compinv_rt.apps.serve.batcher import (
    BatchFailed,
    BatchStats,
    Cancelled,
    Pending,
    QueueFront,
    QueueFull,
    ShuttingDown,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """One step of the loop, for metrics: images in the UNet call, its run time."""

    size: int
    seconds: float
    finished: int = 0  # images that finished with this step


@dataclass(eq=False)
class _Waiting(Pending):
    on_progress: Callable[[int, int], None] | None = None  # (steps done, total), per item
    admitted: float = 0.0  # when it joined the loop


class StepBatcher(QueueFront):
    """Step-level batching: one worker thread runs the engine's continuous denoise loop; at every
    step boundary it admits queued items (as the loop has room), drops items whose client left or
    timed out, and hands out finished ones, so a request starts within one step. Items the loop
    cannot take (`engine.steppable(key)` false: backward guidance, attention capture) run as one
    whole batch of their key between two steps, as `Batcher` runs them.

    `max_wait_s` (--max-wait-ms) applies only to an idle worker (nothing in the loop): the first
    queued item waits up to max_wait_s after its arrival for company, so requests that arrive
    together start at the same step (and a whole batch gets its mates), unless max_batch items are
    already queued or the server is closing. An item is never held back from a running loop: it
    joins at the next step boundary.

    The engine's loop API: steppable(key), room(item), admit(item) -> slot (an exception fails
    that item only), step() -> finished slots, result(slot), drop(slot); slot.done / slot.total.
    Same submit/close/depth/closing as `Batcher`, plus per-item progress callbacks."""

    def __init__(self, engine, max_batch: int, capacity: int, max_wait_s: float = 0.0,
                 on_admit: Callable[[float], None] = lambda waited: None,
                 on_step: Callable[[StepStats], None] = lambda stats: None,
                 on_batch: Callable[[BatchStats], None] = lambda stats: None,
                 on_depth: Callable[[int], None] = lambda depth: None):
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError("max_batch and capacity must be >= 1, max_wait_s >= 0")
        self.engine, self.max_batch, self.capacity = engine, max_batch, capacity
        self.max_wait_s = max_wait_s
        self._on_admit, self._on_step, self._on_batch, self._on_depth = on_admit, on_step, on_batch, on_depth
        self._queue: deque[_Waiting] = deque()
        self._active: list[tuple[_Waiting, Any]] = []  # (item, its slot in the loop)
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._image_seconds = 1.0  # running mean of an image's time in the loop: the Retry-After hint

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="compinv-steps", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop taking work, finish everything queued and running, then stop."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def submit(self, items: Sequence, key: Hashable,
               on_progress: Callable[[int, int, int], None] | None = None) -> list[asyncio.Future]:
        """Queue all of a request's items (all or none); `on_progress(item index, done, total)`
        runs on the event loop after each step of an item. Raises QueueFull or ShuttingDown."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        with self._cv:
            if len(self._queue) + len(items) > self.capacity:
                rounds_ahead = (len(self._queue) + len(items)) / self.max_batch + 1
                raise QueueFull(max(1.0, rounds_ahead * self._image_seconds))
            loop = asyncio.get_running_loop()
            pending = [_Waiting(item, key, loop.create_future(),
                                on_progress=None if on_progress is None else
                                functools.partial(on_progress, k)) for k, item in enumerate(items)]
            self._queue.extend(pending)
            self._cv.notify()
        self._on_depth(len(self._queue))
        return [p.future for p in pending]

    # -- the worker thread -----------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is gone (interpreter shutdown)
            pass

    def _resolve(self, p: Pending, result=None, error: BaseException | None = None) -> None:
        def done():
            if p.future.done():
                return
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(result)
        self._call(done)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._active and not self._closing:
                    self._cv.wait()
                if self._closing and not self._queue and not self._active:
                    return
                self._gather()
            whole = self._admit()
            if whole:
                self._run_whole(whole)
            self._release_abandoned()
            if self._active:
                self._step()

    def _gather(self) -> None:
        """(Lock held.) An idle loop waits for company: until the oldest queued item has waited
        max_wait_s, max_batch items are queued, or the server closes. A running loop never waits."""
        while self._queue and not self._active and not self._closing and len(self._queue) < self.max_batch:
            left = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _admit(self) -> list[_Waiting]:
        """Admit what fits; returns a whole batch of the first non-steppable key, if any."""
        with self._cv:
            queued = [p for p in self._queue if not p.future.done()]
        taken: set[int] = set()
        whole: list[_Waiting] = []
        for p in queued:
            if not self.engine.steppable(p.key):
                if not whole or (p.key == whole[0].key and len(whole) < self.max_batch):
                    whole.append(p)
                    taken.add(id(p))
                continue
            if not self.engine.room(p.item):
                continue
            taken.add(id(p))
            p.admitted = time.monotonic()
            self._on_admit(p.admitted - p.enqueued)
            try:
                self._active.append((p, self.engine.admit(p.item)))
            except Exception as exc:  # this item's request is bad (a layout phrase, say)
                self._resolve(p, error=exc)
        with self._cv:
            self._queue = deque(p for p in self._queue if id(p) not in taken and not p.future.done())
        self._on_depth(len(self._queue))
        return whole

    def _release_abandoned(self) -> None:
        for p, slot in [a for a in self._active if a[0].future.done()]:
            self.engine.drop(slot)  # its client left or timed out: out at this boundary
            self._active.remove((p, slot))

    def _step(self) -> None:
        started, size = time.monotonic(), len(self._active)
        try:
            finished = self.engine.step()
        except Exception as exc:  # a failing step fails the images in the loop, not the server
            log.exception("a denoising step of %d image(s) failed", len(self._active))
            for p, slot in self._active:
                self.engine.drop(slot)
                self._resolve(p, error=BatchFailed(f"{type(exc).__name__}: {exc}"))
            self._active.clear()
            self._on_batch(BatchStats(0, None, [], 0.0, f"{type(exc).__name__}: {exc}"))
            return
        seconds = time.monotonic() - started
        done = {id(s) for s in finished}
        for p, slot in self._active:
            if p.on_progress is not None:
                self._call(p.on_progress, slot.done, slot.total)
        for p, slot in [a for a in self._active if id(a[1]) in done]:
            self._active.remove((p, slot))
            self._image_seconds = 0.8 * self._image_seconds + 0.2 * (time.monotonic() - p.admitted)
            try:
                self._resolve(p, self.engine.result(slot))
            except Exception as exc:
                self._resolve(p, error=exc)
        self._on_step(StepStats(getattr(self.engine, "last_step_size", size), seconds, len(done)))

    def _run_whole(self, batch: list[_Waiting]) -> None:
        started = time.monotonic()
        futures = [p.future for p in batch]
        progress = [p.on_progress for p in batch if p.on_progress is not None]

        def should_stop() -> bool:  # polled by the engine between denoising steps
            return all(f.done() for f in futures)

        def on_step(done: int, total: int) -> None:
            for cb in progress:
                self._call(cb, done, total)

        error = None
        try:
            results = self.engine.run([p.item for p in batch], should_stop, on_step)
        except Cancelled:
            results, error = None, "cancelled"
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            results, error = None, f"{type(exc).__name__}: {exc}"
            for p in batch:
                self._resolve(p, error=BatchFailed(error))
        else:
            for p, r in zip(batch, results):
                self._resolve(p, error=r) if isinstance(r, BaseException) else self._resolve(p, r)
        self._on_batch(BatchStats(len(batch), batch[0].key, [started - p.enqueued for p in batch],
                                  time.monotonic() - started, error))
