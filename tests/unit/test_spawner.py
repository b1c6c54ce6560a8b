"""InitClient over a real socket pair, with no supervisor behind it."""

from __future__ import annotations

import asyncio

import pytest

from engine.runtime import protocol
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


async def _ready_then_return() -> None:
    ours, theirs = protocol.socketpair()
    client = InitClient(ours, lambda pid, status: None)
    try:
        task = asyncio.create_task(client.start({"sandbox_id": "sb-test"}))
        await asyncio.sleep(0)
        protocol.send(theirs, {"op": "ready"})
        await task
    finally:
        client.channel.close()
        theirs.close()


def test_start_returns_on_ready() -> None:
    asyncio.run(_ready_then_return())


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
