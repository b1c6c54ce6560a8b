"""The Engine's socket clients over real socket pairs, with no process behind them."""

from __future__ import annotations

import asyncio
import os
import resource

import pytest

from engine.runtime import protocol, spawner
from engine.runtime.spawner import InitClient

# A sandbox's spec as the Engine builds it; no supervisor reads it here.
SPEC = {
    "sandbox_id": "sb-test",
    "hostname": "sb-test",
    "workdir": "/",
    "tmp": {"size": 1 << 20, "inodes": 1024},
    "shm": {"size": None, "inodes": None},
    "root": {
        "root": "/layers/sb-test/root",
        "lower": "/images/debian",
        "upper": "/layers/sb-test/upper",
        "work": "/layers/sb-test/work",
        "binds": [["/usr", "/usr"]],
    },
    "volumes": [
        {"source": "/volumes/a", "target": "/data/a", "read_only": True},
        {"source": "/volumes/b", "target": "/data/b", "read_only": False},
    ],
    "address": "10.1.0.2",
    "resolv_conf": "nameserver 10.1.0.1\n",
}


async def _cancel_as_ready_arrives() -> tuple[asyncio.Task[None], bool]:
    ours, theirs = protocol.socketpair()
    client = InitClient(ours, lambda pid, status: None)
    try:
        task = asyncio.create_task(client.start(SPEC))
        await asyncio.sleep(0)
        assert theirs.recv(1 << 16).startswith(bytes([protocol.INIT_MAGIC]))
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
        task = asyncio.create_task(client.start(SPEC))
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
        task = asyncio.create_task(client.start(SPEC))
        await asyncio.sleep(0)
        # Read first: closing a socket with a message unread resets the peer.
        assert theirs.recv(1 << 16).startswith(bytes([protocol.INIT_MAGIC]))
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
        task = asyncio.create_task(client.start(SPEC))
        await asyncio.sleep(0)
        protocol.send(theirs, {"op": "failed", "message": "mount failed"})
        await task
    finally:
        client.channel.close()
        theirs.close()


def test_start_raises_setup_failure() -> None:
    with pytest.raises(OSError, match="mount failed"):
        asyncio.run(_failed_setup())


def test_encode_start_fields() -> None:
    data = protocol.encode_start(SPEC)
    header = protocol.INIT_HEADER.unpack_from(data)
    strings = data[protocol.INIT_HEADER.size :].split(b"\0")
    assert header == (protocol.INIT_MAGIC, protocol.INIT_START, 0, 0)
    assert strings[-1] == b""
    assert b"hostname=sb-test" in strings
    assert b"workdir=/" in strings
    assert b"tmp_size=1048576" in strings
    assert b"tmp_inodes=1024" in strings
    assert not any(text.startswith(b"shm_") for text in strings)
    assert b"resolv_conf=nameserver 10.1.0.1\n" in strings
    # Each mount is its source string followed by its target on its own.
    bind = strings.index(b"bind=/usr")
    assert strings[bind + 1] == b"/usr"
    read_only = strings.index(b"volume_ro=/volumes/a")
    assert strings[read_only + 1] == b"/data/a"
    writable = strings.index(b"volume_rw=/volumes/b")
    assert strings[writable + 1] == b"/data/b"


def test_encode_start_rejects_nul() -> None:
    spec = {**SPEC, "workdir": "/work\0dir"}
    with pytest.raises(ValueError, match="contains a NUL byte"):
        protocol.encode_start(spec)


def test_decode_forked_and_invalid() -> None:
    forked = protocol.INIT_HEADER.pack(
        protocol.INIT_MAGIC, protocol.INIT_FORKED, 0, 0
    ) + (1234).to_bytes(4, "little")
    invalid = (
        protocol.INIT_HEADER.pack(protocol.INIT_MAGIC, protocol.INIT_INVALID, 0, 0)
        + (20).to_bytes(4, "little")
        + b"workdir '/x/y': '/x' is not a directory"
    )
    assert protocol.decode(forked, []) == ({"op": "init", "pid": 1234}, [])
    message, _ = protocol.decode(invalid, [])
    assert message["op"] == "failed"
    assert message["invalid"] is True
    assert message["errno"] == 20
    assert message["message"] == "workdir '/x/y': '/x' is not a directory"


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


def test_recv_passes_close_on_exec_fds() -> None:
    ours, theirs = protocol.socketpair()
    read_end, write_end = os.pipe()
    try:
        protocol.send(theirs, {"op": "preforked", "id": 3}, [read_end, write_end])
        received = protocol.recv(ours)
        assert received is not None
        message, fds = received
        try:
            assert message == {"op": "preforked", "id": 3}
            assert len(fds) == 2
            for sent, got in zip((read_end, write_end), fds, strict=True):
                assert os.fstat(got).st_ino == os.fstat(sent).st_ino
                assert not os.get_inheritable(got)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(read_end)
        os.close(write_end)
        ours.close()
        theirs.close()


def test_recv_decodes_init_exit() -> None:
    ours, theirs = protocol.socketpair()
    data = (
        protocol.INIT_HEADER.pack(protocol.INIT_MAGIC, protocol.INIT_EXIT, 0, 0)
        + (1234).to_bytes(4, "little")
        + (9).to_bytes(4, "little")
    )
    try:
        protocol.send_raw(theirs, data)
        assert protocol.recv(ours) == ({"op": "exit", "pid": 1234, "status": 9}, [])
    finally:
        ours.close()
        theirs.close()


def test_recv_returns_none_at_end_of_stream() -> None:
    ours, theirs = protocol.socketpair()
    theirs.close()
    try:
        assert protocol.recv(ours) is None
    finally:
        ours.close()


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
