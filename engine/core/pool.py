"""A pool of preforked sandbox supervisors, each in a cgroup of its own.

Creating a sandbox starts with its slowest steps: a new cgroup, a fork from
the zygote, the first move into a v1 memory cgroup (8 to 15 ms in the kernel,
measured on Linux 6.18, because it waits for an RCU grace period) and the
unshare of seven namespaces. A supervisor that has done all of that, but has
not seen a spec yet, is the same for every sandbox, so the pool makes them
ahead of demand and hands each one to exactly one sandbox. Slots for
networked sandboxes also get their veth pair, address and default route
here, so that creating such a sandbox only adds its nftables chain.
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

from engine.core.network import Attachment, Network
from engine.errors import EngineError, FailedPrecondition
from engine.runtime import cgroups, protocol
from engine.runtime.spawner import Spawner

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 8
# A pooled group gets the least CPU time under contention, so that setting up
# sandboxes ahead of demand never slows the requests of running ones; the
# Engine gives a group the default weight when a request takes it.
POOLED_LIMITS = cgroups.CgroupLimits(cpu_weight=1)


@dataclass(eq=False)
class Slot:
    """A preforked supervisor, its cgroup, its control socket and its veth pair.

    ``attachment`` is None for a loopback-only slot.
    """

    cgroup: cgroups.Cgroup
    pid: int
    control: socket.socket
    attachment: Attachment | None = None


class SupervisorPool:
    """Preforked supervisors of two kinds: with a veth pair, and loopback only.

    A kind is filled ahead of demand once it was first requested, or from the
    start for the kinds passed to ``schedule_refill``.
    """

    def __init__(
        self,
        driver: cgroups.CgroupDriver,
        spawner: Spawner,
        uid_base: int,
        uid_count: int,
        size: int = DEFAULT_POOL_SIZE,
        network: Network | None = None,
    ) -> None:
        self.driver = driver
        self.spawner = spawner
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.size = size
        self.network = network
        # Keyed by whether the slots have a veth pair.
        self.ready: dict[bool, deque[Slot]] = {False: deque(), True: deque()}
        self._refill: dict[bool, asyncio.Task[None] | None] = {False: None, True: None}
        # Removals of slots whose make failed or was cancelled.
        self._cleanups: set[asyncio.Future[None]] = set()
        self._closed = False

    async def take(self, network: bool = False) -> Slot:
        """Return a ready slot of that kind, making one now if there is none.

        A pooled slot whose supervisor has died (its control socket reads end
        of stream) is discarded, never handed out.
        """
        self.schedule_refill(network)
        ready = self.ready[network]
        while ready:
            slot = ready.popleft()
            if _alive(slot):
                return slot
            log.warning(
                "supervisor pool: discarding slot %d: its supervisor or veth is gone",
                slot.pid,
            )
            await self.discard(slot)
        return await self.make(network)

    async def make(self, network: bool = False) -> Slot:
        """Create a cgroup, fork a supervisor into it and, if asked, add a veth pair."""
        loop = asyncio.get_running_loop()
        name = f"sandbox-{secrets.token_hex(6)}"
        # A mkdir per hierarchy and one write, 0.25 ms median, made on the
        # loop because a thread hop cost the daemon more CPU than that.
        # NOTE: mkdir waits for the kernel's cgroup_mutex. A move into a v1
        # memory cgroup can hold it across an RCU grace period, so the loop
        # stalls for milliseconds now and then: p99 6.5 ms with 4 clients
        # creating and terminating back to back on a 2-core VM.
        group = self.driver.create(name, POOLED_LIMITS)
        slot: Slot | None = None
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
            slot = Slot(group, pid, control)
            if network:
                await self._attach(slot)
        except (Exception, asyncio.CancelledError):
            # Not on GeneratorExit: a loop that is being torn down runs no
            # more awaits, and the next start sweeps what is left.
            await self._clean_up_failed(loop, group, slot)
            raise
        return slot

    async def _clean_up_failed(
        self,
        loop: asyncio.AbstractEventLoop,
        group: cgroups.Cgroup,
        slot: Slot | None,
    ) -> None:
        """Remove what a failed or cancelled make left, once and only once.

        The cleanup runs as a task of its own that close() waits for, so a
        second cancellation neither interrupts it nor starts another removal
        of the same cgroup beside it.
        """
        try:
            if slot is not None:
                cleanup = asyncio.ensure_future(self.discard(slot))
            else:
                cleanup = asyncio.ensure_future(
                    loop.run_in_executor(None, group.destroy)
                )
        except RuntimeError:
            # The loop is shutting down and runs no executor jobs any more.
            if slot is not None:
                slot.control.close()
            group.destroy()
            return
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanup_done)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(cleanup)

    def _cleanup_done(self, task: asyncio.Future[None]) -> None:
        self._cleanups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor pool: cleanup failed: %s", task.exception())

    async def _attach(self, slot: Slot) -> None:
        if self.network is None:
            raise FailedPrecondition("networking is disabled in this engine")
        loop = asyncio.get_running_loop()
        slot.attachment = await loop.run_in_executor(
            None, self.network.attach, slot.pid
        )

    def schedule_refill(self, network: bool = False) -> None:
        """Refill one kind of slot in a burst once it is half empty.

        A move into a v1 cgroup holds a global lock across an RCU grace period
        unless another move happened a moment before, and every fork on the
        host waits for that lock. Bursts of back-to-back moves pay the grace
        period once per burst, not once per sandbox.
        """
        if self._closed or self.size <= 0 or len(self.ready[network]) > self.size // 2:
            return
        if network and self.network is None:
            return
        task = self._refill[network]
        if task is None or task.done():
            self._refill[network] = asyncio.create_task(self._fill(network))

    async def _fill(self, network: bool) -> None:
        ready = self.ready[network]
        while len(ready) < self.size and not self._closed:
            try:
                slot = await self.make(network)
            except (EngineError, OSError, ConnectionError) as error:
                log.warning("supervisor pool: refill failed: %s", error)
                return
            if self._closed:
                await self.discard(slot)
                return
            ready.append(slot)

    async def discard(self, slot: Slot) -> None:
        """Stop an unused slot's supervisor, remove its veth pair and its cgroup."""
        # A supervisor that reads end of stream instead of a spec exits.
        slot.control.close()
        zygote = self.spawner.channel
        # A zygote that has died never reports the supervisor as reaped.
        if zygote is not None and not zygote.closed.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.spawner.reaped_future(slot.pid)
        self.spawner.reaped.pop(slot.pid, None)
        loop = asyncio.get_running_loop()
        if slot.attachment is not None and self.network is not None:
            attachment, slot.attachment = slot.attachment, None
            try:
                await loop.run_in_executor(None, self.network.detach, attachment)
            except OSError as error:
                log.error(
                    "supervisor pool: veth %s not removed: %s",
                    attachment.host_ifname,
                    error,
                )
        await loop.run_in_executor(None, slot.cgroup.destroy)

    def slots(self) -> list[Slot]:
        """Return every pooled slot, networked or not."""
        return [slot for ready in self.ready.values() for slot in ready]

    def refilling(self) -> bool:
        """Return True while a refill of either kind is in progress."""
        return any(
            task is not None and not task.done() for task in self._refill.values()
        )

    async def close(self) -> None:
        self._closed = True
        for task in self._refill.values():
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        for ready in self.ready.values():
            while ready:
                slot = ready.popleft()
                try:
                    await self.discard(slot)
                except (EngineError, OSError) as error:
                    # The next start's sweep removes what is left.
                    log.error(
                        "supervisor pool: slot %d not removed: %s", slot.pid, error
                    )


def _alive(slot: Slot) -> bool:
    """Return False if the slot's supervisor or its veth pair is gone.

    A pooled supervisor sends nothing unprompted, so a readable control
    socket means end of stream. if_nametoindex is one ioctl, cheap enough
    for the creation path.
    """
    try:
        if protocol.wait_readable(slot.control, 0):
            return False
    except (OSError, ValueError):
        return False
    if slot.attachment is not None:
        try:
            socket.if_nametoindex(slot.attachment.host_ifname)
        except OSError:
            return False
    return True
