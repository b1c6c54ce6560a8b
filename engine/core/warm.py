"""Warm sandboxes: sandboxes set up ahead of demand, for the shapes in use.

Most of a sandbox's setup does not depend on the request, only on its
*shape*: the image, the memory limit (which sizes /tmp and /dev/shm), the
working directory and whether it has a network interface. A warm sandbox has
all of that done: its writable layer, its cgroup, its namespaces, its
mounted root and a ready PID 1. Creating a sandbox of that shape then only
applies what the request adds (cgroup limits, the disk limit and the
network policy) and records it. A warm sandbox runs no code of any request
before a create takes it, and ``take`` removes it from the pool, so no two
creates get the same one (tests/unit/test_warm_pool.py).

The pool keeps up to ``size`` sandboxes of each of the ``MAX_SHAPES`` shapes
that were set up on request last, and refills a shape in the background once
no sandbox of it was taken for ``REFILL_DELAY`` seconds, so that a refill
does not compete with a burst of creates or with the first exec in a new
sandbox. The supervisor pool also gives pooled sandboxes the least CPU weight
until they are taken. A shape whose setup failed on request is never kept warm.
A sandbox with volumes or bucket mounts has no shape: those mounts are made
during setup, so such a sandbox is always set up on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.config import DEFAULT_WARM_POOL_SIZE
from engine.core.models import SandboxSpec
from engine.errors import EngineError

log = logging.getLogger(__name__)

# Shapes kept warm at once; requesting another one drops the oldest.
MAX_SHAPES = 2
# Seconds after the last take of a shape before its refill starts.
REFILL_DELAY = 0.1

T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    """What a sandbox's setup depends on; equal shapes get equal setups."""

    image: str
    memory_mib: int | None
    workdir: str
    network: bool

    @classmethod
    def of(cls, spec: SandboxSpec) -> Shape | None:
        """Return the shape of ``spec``, or None if it cannot be set up early."""
        if spec.volumes or spec.cloud_buckets:
            return None
        return cls(spec.image, spec.memory_mib, spec.workdir, not spec.block_network)

    def spec(self) -> SandboxSpec:
        """Return a spec of this shape, with the default settings otherwise."""
        return SandboxSpec(
            image=self.image,
            memory_mib=self.memory_mib,
            workdir=self.workdir,
            block_network=not self.network,
        )


class WarmPool(Generic[T]):
    """Sandboxes set up ahead of demand, by shape.

    ``prepare`` sets up one sandbox of a shape and ``discard`` releases one
    that is no longer wanted or whose check failed; ``alive`` is that check.
    """

    def __init__(
        self,
        prepare: Callable[[Shape], Awaitable[T]],
        discard: Callable[[T], Awaitable[None]],
        alive: Callable[[T], bool],
        size: int = DEFAULT_WARM_POOL_SIZE,
    ) -> None:
        self.size = size
        self._prepare = prepare
        self._discard = discard
        self._alive = alive
        # Shapes in the order they were last requested, oldest first.
        self._shapes: OrderedDict[Shape, deque[T]] = OrderedDict()
        self._refills: dict[Shape, asyncio.Task[None]] = {}
        self._timers: dict[Shape, asyncio.TimerHandle] = {}
        self._discards: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return sum(len(ready) for ready in self._shapes.values())

    def refilling(self) -> bool:
        """Return True while a shape is being refilled or waits to be."""
        return bool(self._timers) or any(
            not task.done() for task in self._refills.values()
        )

    def items(self) -> list[T]:
        """Return every warm sandbox, of every shape."""
        return [item for ready in self._shapes.values() for item in ready]

    def want(self, shape: Shape) -> None:
        """Keep ``shape`` warm from now on; call it once a setup of it succeeded."""
        if self._closed or self.size <= 0:
            return
        if shape in self._shapes:
            self._shapes.move_to_end(shape)
        else:
            self._shapes[shape] = deque()
            self._drop_old_shapes()
        self._schedule_refill(shape)

    async def take(self, shape: Shape) -> T | None:
        """Return a warm sandbox of ``shape``, or None if there is none.

        A shape that is kept warm becomes the most recently requested one and
        is refilled in the background.
        """
        ready = self._shapes.get(shape)
        if self._closed or ready is None:
            return None
        self._shapes.move_to_end(shape)
        taken = None
        while ready and taken is None:
            item = ready.popleft()
            if self._alive(item):
                taken = item
            else:
                log.warning("warm pool: discarding a sandbox whose PID 1 is gone")
                self._discard_later(item)
        self._schedule_refill(shape)
        return taken

    def evict(self, item: T) -> None:
        """Discard ``item`` if it is still warm, because it failed its check."""
        for ready in self._shapes.values():
            if item in ready:
                ready.remove(item)
                self._discard_later(item)
                return

    def _drop_old_shapes(self) -> None:
        while len(self._shapes) > MAX_SHAPES:
            shape, ready = self._shapes.popitem(last=False)
            refill = self._refills.pop(shape, None)
            if refill is not None:
                refill.cancel()
            timer = self._timers.pop(shape, None)
            if timer is not None:
                timer.cancel()
            log.info("warm pool: no longer keeping %s warm", shape)
            while ready:
                self._discard_later(ready.popleft())

    def _schedule_refill(self, shape: Shape) -> None:
        """Start refilling ``shape`` REFILL_DELAY seconds after the last call."""
        task = self._refills.get(shape)
        if task is not None and not task.done():
            return
        timer = self._timers.pop(shape, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[shape] = loop.call_later(REFILL_DELAY, self._start_refill, shape)

    def _start_refill(self, shape: Shape) -> None:
        self._timers.pop(shape, None)
        if not self._closed and shape in self._shapes:
            self._refills[shape] = asyncio.create_task(self._refill(shape))

    async def _refill(self, shape: Shape) -> None:
        while not self._closed:
            ready = self._shapes.get(shape)
            if ready is None or len(ready) >= self.size:
                return
            try:
                item = await self._prepare(shape)
            except (EngineError, OSError, ConnectionError) as error:
                log.warning("warm pool: setting up %s failed: %s", shape, error)
                return
            ready = self._shapes.get(shape)
            if ready is None or self._closed:
                # The shape was dropped while this sandbox was set up.
                await self._discard(item)
                return
            ready.append(item)

    def _discard_later(self, item: T) -> None:
        task = asyncio.create_task(self._discard(item))
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    async def close(self) -> None:
        """Stop refilling and discard every warm sandbox."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        refills = list(self._refills.values())
        for task in refills:
            task.cancel()
        for task in refills:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._refills.clear()
        items = self.items()
        self._shapes.clear()
        await asyncio.gather(
            *(self._discard(item) for item in items),
            *self._discards,
            return_exceptions=True,
        )
