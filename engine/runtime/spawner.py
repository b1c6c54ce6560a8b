"""The Engine's asyncio clients of the zygote and of each sandbox's control socket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from engine.errors import InvalidArgument
from engine.runtime import protocol

log = logging.getLogger(__name__)

# Seconds to wait for a new supervisor to report that its sandbox is ready.
READY_TIMEOUT = 30.0
# Seconds to wait for a new zygote to import its modules and report ready.
ZYGOTE_START_TIMEOUT = 60.0
# Reaps that no caller asked for are kept for a later reaped_future call.
# Past this many, the oldest are dropped.
MAX_UNCLAIMED_REAPS = 4096


class _Channel:
    """One SOCK_SEQPACKET socket read by the event loop.

    Replies carrying an "id" resolve the future of the request that sent it;
    other messages go to ``on_event``. ``closed`` completes at end of stream.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_event: Callable[[protocol.Message, list[int]], None],
    ) -> None:
        self.sock = sock
        self.on_event = on_event
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[tuple[protocol.Message, list[int]]]] = {}
        self.ids = itertools.count(1)
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            received = protocol.recv(self.sock)
        except protocol.TruncatedMessage as error:
            # The message itself arrived; only its descriptors are gone. The
            # request it answers fails, and the channel stays open.
            future = self.pending.pop(error.message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_exception(error)
            else:
                log.error("dropped a message without its descriptors: %s", error)
            return
        except ConnectionResetError:
            # The peer exited with a message unread, as PID 1 does when it
            # is killed: the same end of stream as a clean close.
            received = None
        except (OSError, ValueError) as error:
            log.error("channel read failed: %s", error)
            received = None
        if received is None:
            self._close()
            return
        message, fds = received
        future = (
            self.pending.pop(message.get("id", -1), None) if "id" in message else None
        )
        if future is not None and not future.done():
            future.set_result((message, fds))
        else:
            self.on_event(message, fds)

    def _close(self) -> None:
        if self.closed.done():
            return
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the peer process exited"))
        self.pending.clear()
        self.closed.set_result(None)

    def send(
        self, message: protocol.Message, fds: list[int] | tuple[int, ...] = ()
    ) -> None:
        if self.closed.done():
            raise ConnectionError("the peer process exited")
        protocol.send(self.sock, message, fds)

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self.closed.done():
            raise ConnectionError("the peer process exited")
        protocol.send_raw(self.sock, data, fds)

    async def request(
        self, message: protocol.Message, fds: list[int] | tuple[int, ...] = ()
    ) -> tuple[protocol.Message, list[int]]:
        return await self.request_encoded(
            lambda request_id: protocol.encode({**message, "id": request_id}), fds
        )

    async def request_encoded(
        self,
        encode: Callable[[int], bytes],
        fds: list[int] | tuple[int, ...] = (),
    ) -> tuple[protocol.Message, list[int]]:
        """Send ``encode(request_id)`` and return the reply with that id."""
        request_id = next(self.ids)
        future = self.loop.create_future()
        self.pending[request_id] = future
        try:
            self.send_raw(encode(request_id), fds)
        except BaseException:
            self.pending.pop(request_id, None)
            raise
        return await future

    def close(self) -> None:
        self._close()


class Spawner:
    """Starts the zygote and requests supervisors from it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: _Channel | None = None
        self.reaped: dict[int, asyncio.Future[int]] = {}
        # Children whose reap no caller will ask for: supervisors that forked
        # a PID 1, and file workers.
        self._forgotten: set[int] = set()

    async def start(self, init_path: str, layers: str) -> None:
        """Start the zygote and wait until it is in its own mount namespace.

        ``init_path`` is the compiled engine-init and ``layers`` the mount
        point of the layer file system, which the zygote keeps mounted.
        """
        ours, theirs = protocol.socketpair()
        os.set_inheritable(theirs.fileno(), True)
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "engine.runtime.zygote",
                    str(theirs.fileno()),
                    init_path,
                    layers,
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            theirs.close()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.channel = _Channel(ours, self._event)
        self.channel.closed.add_done_callback(self._zygote_closed)
        async with asyncio.timeout(ZYGOTE_START_TIMEOUT):
            await asyncio.shield(self._ready)
        if self.channel.closed.done():
            raise OSError(0, "the zygote exited during its start; see its log")
        log.info("zygote started, pid %d", self.process.pid)

    def _zygote_closed(self, _: asyncio.Future[None]) -> None:
        if not self._ready.done():
            self._ready.set_result(None)

    def _event(self, message: protocol.Message, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if message.get("op") == "ready" and not self._ready.done():
            self._ready.set_result(None)
        if message.get("op") != "reaped":
            return
        pid = message["pid"]
        if pid in self._forgotten:
            self._forgotten.discard(pid)
            return
        future = self.reaped_future(pid)
        if not future.done():
            future.set_result(message["status"])
        excess = len(self.reaped) - MAX_UNCLAIMED_REAPS
        if excess > 0:
            for old in list(itertools.islice(self.reaped, excess)):
                if self.reaped[old].done():
                    del self.reaped[old]

    def reaped_future(self, pid: int) -> asyncio.Future[int]:
        """Return a future of the wait status of child ``pid`` of the zygote."""
        return self.reaped.setdefault(pid, asyncio.get_running_loop().create_future())

    def forget_reap(self, pid: int) -> None:
        """Drop the reap of ``pid``, which no caller will ask for."""
        future = self.reaped.pop(pid, None)
        if future is None or not future.done():
            self._forgotten.add(pid)

    async def prefork(
        self, uid_base: int, uid_count: int, cgroup_fds: list[int]
    ) -> tuple[int, socket.socket]:
        """Fork a supervisor into the cgroup of ``cgroup_fds`` and new namespaces.

        Returns its host pid and its control socket; the supervisor then waits
        for ``InitClient.start``.
        """
        assert self.channel is not None, "Spawner.start() was not called"
        request = {"op": "prefork", "uid_base": uid_base, "uid_count": uid_count}
        message, fds = await self.channel.request(request, cgroup_fds)
        if message["op"] != "preforked":
            raise OSError(
                0, f"sandbox supervisor failed to start: {message.get('message')}"
            )
        return message["pid"], socket.socket(fileno=fds[0])

    async def file(
        self,
        init_pidfd: int,
        action: str,
        args: dict[str, Any],
        fds: list[int],
        cgroup_fds: list[int] | tuple[int, ...] = (),
    ) -> int:
        """Start a file operation worker in the sandbox of ``init_pidfd``.

        Returns the worker's host pid. ``fds`` are its result and optional
        data descriptors, and ``cgroup_fds`` the cgroup.procs files that the
        worker joins first, if any.
        """
        assert self.channel is not None, "Spawner.start() was not called"
        request = {
            "op": "file",
            "action": action,
            "args": args,
            "cgroups": len(cgroup_fds),
        }
        message, _ = await self.channel.request(
            request, [init_pidfd, *cgroup_fds, *fds]
        )
        if message["op"] != "started":
            raise OSError(0, f"file worker failed to start: {message.get('message')}")
        return message["pid"]

    def kill(self, pid: int) -> None:
        """SIGKILL a supervisor or file worker of the zygote's."""
        if self.channel is not None and not self.channel.closed.done():
            self.channel.send({"op": "kill", "pid": pid})

    async def close(self) -> None:
        """Close the zygote's socket, so it kills every supervisor, and wait for it."""
        if self.channel is not None:
            self.channel.close()
        if self.process is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.process.wait)
            log.info("zygote exited with status %s", self.process.returncode)


class InitClient:
    """The Engine's end of one sandbox's control socket.

    The supervisor uses it during setup and hands it to the sandbox's PID 1,
    which serves exec, kill and terminate on it.
    """

    def __init__(
        self, sock: socket.socket, on_exit: Callable[[int, int], None]
    ) -> None:
        self.on_exit = on_exit
        self.ready: asyncio.Future[protocol.Message] = (
            asyncio.get_running_loop().create_future()
        )
        # PID 1's host pid and a pidfd of it, from the supervisor's "init"
        # message. The owner of this client closes the pidfd.
        self.pid = 0
        self.pidfd: int | None = None
        self._forked: asyncio.Future[None] = self.ready.get_loop().create_future()
        # True once the spec went out. Until then the supervisor waits for
        # it, and closing the socket makes it exit.
        self.started = False
        # Done once PID 1 has sent SIGKILL to every other process, or closed.
        self.killed: asyncio.Future[None] = self.ready.get_loop().create_future()
        self.channel = _Channel(sock, self._event)
        self.channel.closed.add_done_callback(self._closed)

    def _event(self, message: protocol.Message, fds: list[int]) -> None:
        op = message.get("op")
        if op == "init" and len(fds) == 1 and self.pidfd is None:
            self.pid, self.pidfd = message["pid"], fds.pop()
            self._forked.set_result(None)
        for fd in fds:
            os.close(fd)
        if op in ("ready", "failed") and not self.ready.done():
            self.ready.set_result(message)
        elif op == "killed" and not self.killed.done():
            self.killed.set_result(None)
        elif op == "exit":
            self.on_exit(message["pid"], message["status"])
        elif op == "started":
            self._kill_unclaimed(message["pid"])

    def _kill_unclaimed(self, pid: int) -> None:
        """SIGKILL the group of a process whose exec request was cancelled.

        PID 1's reply comes here when its caller stopped waiting, such as a Run
        cancelled by its client's hangup. PID 1 starts the process anyway, and
        without this kill it would run untracked and past its timeout until
        the sandbox ends.
        """
        log.info(
            "sending SIGKILL to process group %d in the sandbox whose PID 1 is"
            " host pid %d: its exec request was cancelled before PID 1 replied",
            pid,
            self.pid,
        )
        with contextlib.suppress(ConnectionError, OSError):
            self.kill(pid, signal.SIGKILL)

    def _closed(self, _: asyncio.Future[None]) -> None:
        if not self.ready.done():
            self.ready.set_result(
                {"op": "failed", "message": "the supervisor exited during setup"}
            )
        if not self._forked.done():
            self._forked.set_result(None)
        if not self.killed.done():
            self.killed.set_result(None)

    @property
    def closed(self) -> asyncio.Future[None]:
        return self.channel.closed

    async def start(self, spec: dict[str, Any]) -> None:
        """Send the sandbox's spec and wait until its PID 1 is ready."""
        self.started = True
        self.channel.send_raw(protocol.encode_start(spec))
        # Python 3.11's wait_for returns the result and drops a cancellation
        # that lands in the loop iteration in which the result arrives, so
        # a cancelled create would carry on. asyncio.timeout re-raises it.
        async with asyncio.timeout(READY_TIMEOUT):
            message = await asyncio.shield(self.ready)
        if message["op"] != "ready":
            if message.get("invalid"):
                raise InvalidArgument(str(message.get("message")))
            raise OSError(0, f"sandbox setup failed: {message.get('message')}")
        # The supervisor sends "init" after its fork and PID 1 sends "ready"
        # after its setup, so either may come first.
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.shield(self._forked)
        if self.pidfd is None:
            raise OSError(0, "sandbox setup failed: the supervisor sent no PID 1")

    async def exec(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        nofile: int,
        stdio: list[int],
    ) -> int:
        """Start a process; return its pid in the sandbox, or raise OSError."""
        message, _ = await self.channel.request_encoded(
            lambda request_id: protocol.encode_exec(request_id, argv, env, cwd, nofile),
            stdio,
        )
        if message["op"] != "started":
            raise OSError(
                message.get("errno", 0), message.get("message", "exec failed")
            )
        return message["pid"]

    def kill(self, pid: int, signal: int, *, group: bool = True) -> None:
        self.channel.send_raw(protocol.encode_kill(pid, signal, group))

    def terminate(self) -> None:
        """Ask PID 1 to end the sandbox, or a supervisor without a spec to exit."""
        if self.channel.closed.done():
            return
        if self.started:
            self.channel.send_raw(protocol.encode_terminate())
        else:
            self.channel.close()
