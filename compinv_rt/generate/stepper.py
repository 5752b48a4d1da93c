"""Step-level (iteration-level) batching: one continuous denoise loop that takes new tasks and
lets finished ones go at every step boundary.

    loop = StepLoop(session, max_batch=8)
    slot = loop.admit(task)              # CompinvError for a bad request; loop.room(task) first
    while loop.active:
        for slot in loop.step():         # one UNet call per image size that has samples
            image = slot.image           # GeneratedImage (or slot.error: its CompinvError)
    loop.drop(slot)                      # a cancelled task leaves at the next boundary

Each slot carries its own step index, scheduler, text states, guidance scale and attention bias
(`GenerationSession.start`), so tasks with different guidance scales, step counts, samplers and
concepts share a UNet call. Tasks of different image sizes cannot: each size has its own group,
stepped in turn. With `fixed=True` every UNet call has 2 x max_batch rows (padded), so an image's
bits do not depend on what else is in the loop or when it joined (compinv_rt.sampling.rows).
Backward guidance and attention capture stay on the whole-batch path (`session.steppable`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from compinv_rt.core.errors import CompinvError

if TYPE_CHECKING:
    from compinv_rt.generate.session import GeneratedImage, GenerationSession, Started, Task


@dataclass(eq=False)
class Slot:
    """One task in the loop; `owner` is the caller's (a server's pending request)."""

    started: Started
    owner: object = None
    image: GeneratedImage | None = None
    error: CompinvError | None = None
    peak: int = 0  # the most images in one of its UNet calls

    @property
    def done(self) -> int:
        return self.started.sample.done

    @property
    def total(self) -> int:
        return self.started.sample.total


@dataclass(frozen=True)
class StepStats:
    """One step of one size group, for metrics."""

    size: int  # images in the UNet call
    seconds: float


@dataclass
class _Group:
    slots: list[Slot] = field(default_factory=list)


class StepLoop:
    def __init__(self, session: GenerationSession, max_batch: int, fixed: bool = True,
                 on_step: Callable[[StepStats], None] = lambda stats: None):
        self.session, self.max_batch, self.fixed = session, max_batch, fixed
        self.on_step = on_step
        self._groups: dict[tuple[int, int], _Group] = {}
        self._turn = 0  # round robin over the size groups

    @property
    def active(self) -> list[Slot]:
        return [s for g in self._groups.values() for s in g.slots]

    def unet(self, size: tuple[int, int]):
        """The backend of one size; one graph for all (the guided profile: 2 x max_batch rows)."""
        from compinv_rt.sampling.rows import FixedRows

        backend = self.session.unet(*size, True)
        return FixedRows(backend, 2 * self.max_batch) if self.fixed else backend

    def room(self, task: Task) -> bool:
        """Is there a free place for `task` in its size group."""
        size = self.session.check(task.request).size
        return len(self._groups.get(size, _Group()).slots) < self.max_batch

    def admit(self, task: Task, owner: object = None) -> Slot:
        size = self.session.check(task.request).size
        slot = Slot(self.session.start(task, self.unet(size)), owner)
        self._groups.setdefault(size, _Group()).slots.append(slot)
        return slot

    def drop(self, slot: Slot) -> None:
        for g in self._groups.values():
            if slot in g.slots:
                g.slots.remove(slot)

    def step(self) -> list[Slot]:
        """One step of the next size group with samples; returns its slots that finished (with
        their image or error), already out of the loop."""
        from compinv_rt.sampling.rows import step_rows

        sizes = [k for k, g in self._groups.items() if g.slots]
        if not sizes:
            return []
        size = sizes[self._turn % len(sizes)]
        self._turn += 1
        group, unet = self._groups[size], self.unet(size)
        for slot in group.slots:
            slot.peak = max(slot.peak, len(group.slots))
        started = time.perf_counter()
        with torch.inference_mode():
            step_rows(unet, [s.started.sample for s in group.slots])
        self.on_step(StepStats(len(group.slots), time.perf_counter() - started))
        finished = [s for s in group.slots if s.started.sample.finished]
        group.slots = [s for s in group.slots if not s.started.sample.finished]
        for slot in finished:
            try:
                slot.image = self.session.finish(slot.started, unet)
            except CompinvError as exc:
                slot.error = exc
        return finished

    def run(self, tasks: list[Task], join_at: dict[int, int] | None = None) -> list[GeneratedImage]:
        """All `tasks`' images, in order; task k joins once `join_at[k]` steps have run (default
        0: at once, as room allows). For tests and offline callers; errors are raised."""
        join_at = join_at or {}
        waiting, slots, steps = list(range(len(tasks))), {}, 0
        while waiting or self.active:
            for k in [k for k in waiting if join_at.get(k, 0) <= steps]:
                if self.room(tasks[k]):  # asked at each admission: the ones before take places
                    slots[k] = self.admit(tasks[k])
                    waiting.remove(k)
            for slot in self.step():
                if slot.error is not None:
                    raise slot.error
            steps += 1
        return [slots[k].image for k in range(len(tasks))]  # type: ignore[misc]
