"""A pool of pre-made, pre-warmed cgroups for new sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections import deque

from engine.errors import EngineError
from engine.runtime import cgroups
from engine.runtime.spawner import Spawner

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 4


class CgroupPool:
    """Keeps ``size`` empty cgroups ready, each already joined once.

    A pooled group is handed to exactly one sandbox. A group whose warming
    failed is destroyed, never handed out.
    """

    def __init__(
        self,
        driver: cgroups.CgroupDriver,
        spawner: Spawner,
        size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.driver = driver
        self.spawner = spawner
        self.size = size
        self.ready: deque[cgroups.Cgroup] = deque()
        self._refill: asyncio.Task[None] | None = None

    def take(self, limits: cgroups.CgroupLimits) -> cgroups.Cgroup | None:
        """Return a warm group with ``limits`` applied, or None if the pool is empty."""
        self.schedule_refill()
        while self.ready:
            group = self.ready.popleft()
            try:
                group.set_limits(limits)
            except EngineError:
                group.destroy()
                raise
            return group
        return None

    def schedule_refill(self) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self.ready) < self.size:
            name = f"pool-{secrets.token_hex(6)}"
            try:
                group = await loop.run_in_executor(
                    None, self.driver.create, name, cgroups.CgroupLimits()
                )
            except EngineError as error:
                log.warning("cgroup pool: cannot create %s: %s", name, error)
                return
            try:
                await self._warm(group)
            except asyncio.CancelledError:
                group.destroy()
                raise
            except (OSError, ConnectionError) as error:
                log.warning("cgroup pool: warming %s failed: %s", name, error)
                await loop.run_in_executor(None, group.destroy)
                return
            self.ready.append(group)

    async def _warm(self, group: cgroups.Cgroup) -> None:
        fds = [
            os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in group.procs_files()
        ]
        try:
            await self.spawner.warm(fds)
        finally:
            for fd in fds:
                os.close(fd)

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        loop = asyncio.get_running_loop()
        while self.ready:
            await loop.run_in_executor(None, self.ready.popleft().destroy)
