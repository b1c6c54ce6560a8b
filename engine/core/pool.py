"""A pool of preforked sandbox supervisors, each in a cgroup of its own.

Creating a sandbox starts with its slowest steps: a new cgroup, a fork from
the zygote, the first move into a v1 memory cgroup (8 to 15 ms in the kernel,
measured on Linux 6.18, because it waits for an RCU grace period) and the
unshare of seven namespaces. A supervisor that has done all of that, but has
not seen a spec yet, is the same for every sandbox, so the pool makes them
ahead of demand and hands each one to exactly one sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import deque
from dataclasses import dataclass

from engine.errors import EngineError
from engine.runtime import cgroups
from engine.runtime.spawner import Spawner

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 8


@dataclass(eq=False)
class Slot:
    """A preforked supervisor, its cgroup and its control socket."""

    cgroup: cgroups.Cgroup
    pid: int
    control: socket.socket


class SupervisorPool:
    def __init__(
        self,
        driver: cgroups.CgroupDriver,
        spawner: Spawner,
        uid_base: int,
        uid_count: int,
        size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.driver = driver
        self.spawner = spawner
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.size = size
        self.ready: deque[Slot] = deque()
        self._refill: asyncio.Task[None] | None = None
        self._closed = False

    async def take(self) -> Slot:
        """Return a ready slot, making one now if the pool is empty."""
        self.schedule_refill()
        if self.ready:
            return self.ready.popleft()
        return await self.make()

    async def make(self) -> Slot:
        """Create a cgroup and fork a supervisor into it."""
        loop = asyncio.get_running_loop()
        name = f"sandbox-{secrets.token_hex(6)}"
        group = await loop.run_in_executor(
            None, self.driver.create, name, cgroups.CgroupLimits()
        )
        try:
            paths = group.procs_files()
            fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in paths]
            try:
                pid, control = await self.spawner.prefork(
                    self.uid_base, self.uid_count, fds
                )
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            try:
                await asyncio.shield(loop.run_in_executor(None, group.destroy))
            except (RuntimeError, asyncio.CancelledError):
                # The loop is shutting down and runs no executor jobs any more.
                group.destroy()
            raise
        return Slot(group, pid, control)

    def schedule_refill(self) -> None:
        """Refill the pool in a burst once it is half empty.

        A move into a v1 cgroup holds a global lock across an RCU grace period
        unless another move happened a moment before, and every fork on the
        host waits for that lock. Bursts of back-to-back moves pay the grace
        period once per burst, not once per sandbox.
        """
        if self._closed or self.size <= 0 or len(self.ready) > self.size // 2:
            return
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        while len(self.ready) < self.size and not self._closed:
            try:
                slot = await self.make()
            except (EngineError, OSError, ConnectionError) as error:
                log.warning("supervisor pool: refill failed: %s", error)
                return
            if self._closed:
                await self.discard(slot)
                return
            self.ready.append(slot)

    async def discard(self, slot: Slot) -> None:
        """Stop an unused slot's supervisor and remove its cgroup."""
        # A supervisor that reads end of stream instead of a spec exits.
        slot.control.close()
        zygote = self.spawner.channel
        # A zygote that has died never reports the supervisor as reaped.
        if zygote is not None and not zygote.closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.spawner.reaped_future(slot.pid), 5.0)
        self.spawner.reaped.pop(slot.pid, None)
        await asyncio.get_running_loop().run_in_executor(None, slot.cgroup.destroy)

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        while self.ready:
            await self.discard(self.ready.popleft())
