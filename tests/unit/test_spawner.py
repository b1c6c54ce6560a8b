"""The Engine's socket clients over real socket pairs, with no process behind them."""

from __future__ import annotations

import asyncio
import os
import resource

import pytest

from engine.runtime import protocol, spawner
from engine.runtime.spawner import InitClient


async def _cancel_as_ready_arrives() -> tuple[asyncio.Task[None], bool]:
    ours, theirs = protocol.socketpair()
    client = InitClient(ours, lambda pid, status: None)
    try:
        task = asyncio.create_task(client.start({"sandbox_id": "sb-test"}))
        await asyncio.sleep(0)
        assert protocol.recv(theirs) is not None
        # The ready message resolves the future in this iteration, and the
        # cancellation is queued behind the callbacks that it schedules: the
        # ordering in which Python 3.11's wait_for drops the cancellation.
        client.ready.set_result({"op": "ready"})
        asyncio.get_running_loop().call_soon(task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return task, True
        return task, False
    finally:
        client.channel.close()
        theirs.close()


def test_start_keeps_cancellation_with_ready() -> None:
    task, raised = asyncio.run(_cancel_as_ready_arrives())
    assert raised
    assert task.cancelled()


async def _ready_then_return(init_first: bool) -> tuple[int, bool]:
    ours, theirs = protocol.socketpair()
    client = InitClient(ours, lambda pid, status: None)
    pidfd = os.pidfd_open(os.getpid())
    try:
        task = asyncio.create_task(client.start({"sandbox_id": "sb-test"}))
        await asyncio.sleep(0)
        messages = [
            ({"op": "init", "pid": os.getpid()}, [pidfd]),
            ({"op": "ready"}, []),
        ]
        if not init_first:
            messages.reverse()
        for message, fds in messages:
            protocol.send(theirs, message, fds)
        await task
        return client.pid, client.pidfd is not None
    finally:
        os.close(pidfd)
        if client.pidfd is not None:
            os.close(client.pidfd)
        client.channel.close()
        theirs.close()


@pytest.mark.parametrize("init_first", [True, False])
def test_start_returns_with_init_pid(init_first: bool) -> None:
    pid, has_pidfd = asyncio.run(_ready_then_return(init_first))
    assert pid == os.getpid()
    assert has_pidfd


async def _ready_without_init() -> None:
    ours, theirs = protocol.socketpair()
    client = InitClient(ours, lambda pid, status: None)
    try:
        task = asyncio.create_task(client.start({"sandbox_id": "sb-test"}))
        await asyncio.sleep(0)
        # Read first: closing a socket with a message unread resets the peer.
        assert protocol.recv(theirs) is not None
        protocol.send(theirs, {"op": "ready"})
        theirs.close()
        await task
    finally:
        client.channel.close()


def test_start_fails_without_init() -> None:
    with pytest.raises(OSError, match="the supervisor sent no PID 1"):
        asyncio.run(_ready_without_init())


async def _failed_setup() -> None:
    ours, theirs = protocol.socketpair()
    client = InitClient(ours, lambda pid, status: None)
    try:
        task = asyncio.create_task(client.start({"sandbox_id": "sb-test"}))
        await asyncio.sleep(0)
        protocol.send(theirs, {"op": "failed", "message": "mount failed"})
        await task
    finally:
        client.channel.close()
        theirs.close()


def test_start_raises_setup_failure() -> None:
    with pytest.raises(OSError, match="mount failed"):
        asyncio.run(_failed_setup())


def test_wait_readable_above_fd_1024() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 1500
    if soft <= high:
        assert hard > high, f"the test needs RLIMIT_NOFILE above {high}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (high + 1, hard))
    ours, theirs = protocol.socketpair()
    moved = os.dup2(ours.fileno(), high)
    try:
        assert not protocol.wait_readable(moved, 0)
        protocol.send(theirs, {"op": "ping"})
        assert protocol.wait_readable(moved, 1)
    finally:
        os.close(moved)
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_recv_raises_truncated_with_message() -> None:
    ours, theirs = protocol.socketpair()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(protocol.MAX_FDS + 1)]
    try:
        protocol.send(theirs, {"op": "preforked", "id": 7}, fds)
        with pytest.raises(protocol.TruncatedMessage) as raised:
            protocol.recv(ours)
        assert raised.value.message == {"op": "preforked", "id": 7}
    finally:
        for fd in fds:
            os.close(fd)
        ours.close()
        theirs.close()


async def _truncated_reply_fails_request() -> tuple[BaseException | None, dict]:
    ours, theirs = protocol.socketpair()
    channel = spawner._Channel(ours, lambda message, fds: None)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(protocol.MAX_FDS + 1)]
    try:
        request = asyncio.ensure_future(channel.request({"op": "prefork"}))
        await asyncio.sleep(0)
        sent, _ = protocol.recv(theirs) or ({}, [])
        protocol.send(theirs, {"op": "preforked", "id": sent["id"]}, fds)
        error = None
        try:
            await request
        except protocol.TruncatedMessage as raised:
            error = raised
        # The channel stays open for the next request.
        second = asyncio.ensure_future(channel.request({"op": "prefork"}))
        await asyncio.sleep(0)
        sent, _ = protocol.recv(theirs) or ({}, [])
        protocol.send(theirs, {"op": "preforked", "id": sent["id"]})
        reply, _ = await second
        return error, reply
    finally:
        for fd in fds:
            os.close(fd)
        channel.close()
        theirs.close()


def test_truncated_reply_fails_one_request() -> None:
    error, reply = asyncio.run(_truncated_reply_fails_request())
    assert isinstance(error, protocol.TruncatedMessage)
    assert reply["op"] == "preforked"
