"""The daemon's direct socket, over real unix sockets to a real daemon.

Raw frames test the daemon's side of the protocol; ``Client`` tests the SDK's
side, its fallback to gRPC and its handling of deadlines and hangups.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from beam_support import create_token

from engine import direct
from engine.errors import DeadlineExceeded, NotFound, Unauthenticated
from engine.sdk.aio import AsyncClient
from engine.sdk.client import Client
from engine.v1 import sandbox_pb2 as pb
from tests.integration.conftest import Daemon, make_data_dir, start_daemon

# Seconds a raw socket waits for a reply before the test fails.
REPLY_TIMEOUT = 30.0


def direct_path(daemon: Daemon) -> str:
    return direct.socket_path_for(str(daemon.socket_path))


def connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_TIMEOUT)
    sock.connect(direct_path(daemon))
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_reply(sock: socket.socket) -> tuple[list[bytes], str, str]:
    """Return the MESSAGE payloads of one reply, then its status code and details."""
    messages = []
    while True:
        size, kind = direct.REPLY_HEADER.unpack(
            read_exactly(sock, direct.REPLY_HEADER.size)
        )
        payload = read_exactly(sock, size)
        if kind == direct.MESSAGE:
            messages.append(payload)
            continue
        code, details = direct.decode_end(payload)
        return messages, code, details


def raw_call(
    sock: socket.socket, method: str, body: bytes, token: str | None = None
) -> tuple[list[bytes], str, str]:
    sock.sendall(direct.encode_request(method, token, body))
    return read_reply(sock)


def is_closed(sock: socket.socket) -> bool:
    """Return whether the daemon closed ``sock``, waiting up to REPLY_TIMEOUT."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[socket.socket]:
    sock = connect(daemon)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.address) as opened:
        yield opened


@pytest.fixture
def sandbox_id(client: Client) -> Iterator[str]:
    reply = client.call("Create", pb.CreateRequest(spec=pb.SandboxSpec()))
    try:
        yield reply.sandbox.sandbox_id
    finally:
        client.call(
            "Terminate", pb.TerminateRequest(sandbox_id=reply.sandbox.sandbox_id)
        )


def running_argvs(client: Client, sandbox_id: str) -> list[list[str]]:
    reply = client.call("ListProcesses", pb.ListProcessesRequest(sandbox_id=sandbox_id))
    return [
        list(p.argv) for p in reply.processes if p.state == pb.PROCESS_STATE_RUNNING
    ]


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_socket_is_private(daemon: Daemon) -> None:
    mode = os.lstat(direct_path(daemon)).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_raw_run_returns_output(raw: socket.socket, sandbox_id: str) -> None:
    request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sh", "-c", "echo hi; exit 3"])
    messages, code, details = raw_call(raw, "Run", request.SerializeToString())
    assert code == "OK", details
    assert len(messages) == 1
    reply = pb.RunResponse.FromString(messages[0])
    assert reply.exit.exit_code == 3
    assert reply.stdout.data == b"hi\n"


def test_raw_calls_share_connection(raw: socket.socket, sandbox_id: str) -> None:
    request = pb.GetRequest(sandbox_id=sandbox_id).SerializeToString()
    for _ in range(3):
        _, code, details = raw_call(raw, "Get", request)
        assert code == "OK", details


def test_raw_exec_streams_events(raw: socket.socket, sandbox_id: str) -> None:
    request = pb.ExecRequest(sandbox_id=sandbox_id, argv=["echo", "streamed"])
    messages, code, details = raw_call(raw, "Exec", request.SerializeToString())
    assert code == "OK", details
    events = [pb.ExecEvent.FromString(m) for m in messages]
    assert events[0].WhichOneof("event") == "started"
    assert events[-1].WhichOneof("event") == "exit"
    output = b"".join(
        e.output.data for e in events if e.WhichOneof("event") == "output"
    )
    assert output == b"streamed\n"


def test_unknown_sandbox_not_found(raw: socket.socket) -> None:
    request = pb.GetRequest(sandbox_id="sb-does-not-exist").SerializeToString()
    messages, code, details = raw_call(raw, "Get", request)
    assert messages == []
    assert code == "NOT_FOUND"
    assert "sb-does-not-exist" in details


def test_unknown_method_unimplemented(raw: socket.socket, sandbox_id: str) -> None:
    _, code, details = raw_call(raw, "Launch", b"")
    assert code == "UNIMPLEMENTED"
    assert "'Launch'" in details
    assert "Run" in details
    # The framing is intact, so the connection still serves calls.
    request = pb.GetRequest(sandbox_id=sandbox_id).SerializeToString()
    _, code, details = raw_call(raw, "Get", request)
    assert code == "OK", details


def test_undecodable_request_invalid(raw: socket.socket) -> None:
    _, code, details = raw_call(raw, "Run", b"\xff\xff\xff")
    assert code == "INVALID_ARGUMENT"
    assert "invalid request to SandboxService.Run" in details


def test_invalid_request_names_field(raw: socket.socket, sandbox_id: str) -> None:
    request = pb.RunRequest(sandbox_id=sandbox_id, argv=[])
    _, code, details = raw_call(raw, "Run", request.SerializeToString())
    assert code == "INVALID_ARGUMENT"
    assert "argv" in details


@pytest.mark.parametrize(
    ("header", "named"),
    [
        (direct.REQUEST_HEADER.pack(1 << 30, 3, 0) + b"Run", str(1 << 30)),
        (direct.REQUEST_HEADER.pack(0, 1000, 0), "1000 bytes"),
        (direct.REQUEST_HEADER.pack(0, 3, 60000), "60000 bytes"),
    ],
    ids=["body", "method", "token"],
)
def test_oversized_field_rejected(
    raw: socket.socket, header: bytes, named: str
) -> None:
    raw.sendall(header)
    _, code, details = read_reply(raw)
    assert code == "INVALID_ARGUMENT"
    assert named in details
    assert is_closed(raw)


def test_unknown_token_unauthenticated(raw: socket.socket) -> None:
    _, code, details = raw_call(raw, "List", b"", token="not-a-token")
    assert code == "UNAUTHENTICATED"
    assert "engine token create" in details


def test_token_whitespace_as_on_grpc(daemon: Daemon, raw: socket.socket) -> None:
    token = create_token(daemon.data_dir, "direct-spaces")
    _, code, details = raw_call(raw, "List", b"", token=f" {token}  ")
    assert code == "OK", details
    # A token of only whitespace is an invalid token, not a missing one.
    _, code, details = raw_call(raw, "List", b"", token="   ")
    assert code == "UNAUTHENTICATED", details
    with Client(daemon.address, token=f"{token} ", direct=False) as grpc_client:
        assert grpc_client.call("List", pb.ListRequest()) is not None


def test_cut_off_request_leaves_daemon_serving(daemon: Daemon, client: Client) -> None:
    for partial in (b"\x05", direct.REQUEST_HEADER.pack(10, 3, 0) + b"Ru"):
        sock = connect(daemon)
        sock.sendall(partial)
        sock.close()
    assert client.call("List", pb.ListRequest()) is not None
    assert daemon.process.poll() is None


def test_hangup_kills_run(daemon: Daemon, client: Client, sandbox_id: str) -> None:
    sock = connect(daemon)
    request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sleep", "300"])
    sock.sendall(direct.encode_request("Run", None, request.SerializeToString()))
    assert wait_until(lambda: ["sleep", "300"] in running_argvs(client, sandbox_id))
    sock.close()
    assert wait_until(lambda: ["sleep", "300"] not in running_argvs(client, sandbox_id))


def sandbox_commands(client: Client, sandbox_id: str) -> list[str]:
    """Return the command line of every process in the sandbox, from its /proc.

    Unlike ListProcesses, this lists processes that the engine does not track.
    """
    script = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"
    request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sh", "-c", script])
    reply = client.call("Run", request)
    return [line.strip() for line in reply.stdout.data.decode().splitlines()]


def test_instant_hangup_kills_run(
    daemon: Daemon, client: Client, sandbox_id: str
) -> None:
    # A client that hangs up right after its request cancels the Run while
    # PID 1 starts the process, before the engine has its pid.
    for seconds in range(310, 315):
        request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sleep", str(seconds)])
        sock = connect(daemon)
        sock.sendall(direct.encode_request("Run", None, request.SerializeToString()))
        sock.close()
    # By then the daemon has read the hangups, so PID 1 gets the five exec
    # requests before the one of sandbox_commands, and replies in that order.
    time.sleep(0.5)
    assert wait_until(
        lambda: (
            not any(
                command.startswith("sleep 31")
                for command in sandbox_commands(client, sandbox_id)
            )
        ),
        timeout=5.0,
    )


def test_client_calls_use_direct_socket(client: Client, sandbox_id: str) -> None:
    assert client.direct is not None
    reply = client.call("Run", pb.RunRequest(sandbox_id=sandbox_id, argv=["true"]))
    assert reply.exit.exit_code == 0
    # The call's connection went back to the channel's idle pool.
    assert len(client.direct._idle) == 1


def test_client_error_maps_to_class(client: Client) -> None:
    with pytest.raises(NotFound, match="sb-missing"):
        client.call("Get", pb.GetRequest(sandbox_id="sb-missing"))


def test_client_deadline_kills_run(client: Client, sandbox_id: str) -> None:
    request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sleep", "301"])
    with pytest.raises(DeadlineExceeded, match="did not reply to Run in time"):
        client.call("Run", request, timeout=0.5)
    assert wait_until(lambda: ["sleep", "301"] not in running_argvs(client, sandbox_id))


def test_client_stream_closed_early(client: Client, sandbox_id: str) -> None:
    request = pb.ExecRequest(
        sandbox_id=sandbox_id, argv=["sh", "-c", "echo one; sleep 302"]
    )
    events = client.stream("Exec", request)
    first = next(events)
    assert first.WhichOneof("event") == "started"
    events.close()
    assert client.direct is not None
    assert client.direct._idle == []
    # A closed Exec stream leaves its process running, as on gRPC.
    assert ["sh", "-c", "echo one; sleep 302"] in running_argvs(client, sandbox_id)
    client.call(
        "Kill", pb.KillRequest(sandbox_id=sandbox_id, pid=first.started.pid, signal=9)
    )


def test_client_token_selects_workspace(daemon: Daemon) -> None:
    token = create_token(daemon.data_dir, "direct-alpha")
    with Client(daemon.address, token=token) as alpha:
        created = alpha.call("Create", pb.CreateRequest(spec=pb.SandboxSpec()))
        sandbox_id = created.sandbox.sandbox_id
        try:
            listed = alpha.call("List", pb.ListRequest())
            assert [s.sandbox_id for s in listed.sandboxes] == [sandbox_id]
        finally:
            alpha.call("Terminate", pb.TerminateRequest(sandbox_id=sandbox_id))
    stranger = Client(daemon.address, token="not-a-token")
    with stranger, pytest.raises(Unauthenticated):
        stranger.call("List", pb.ListRequest())


def test_client_falls_back_to_grpc(daemon_factory: Callable[..., Daemon]) -> None:
    running = daemon_factory()
    os.unlink(direct_path(running))
    with Client(running.address) as fallback:
        assert fallback.call("List", pb.ListRequest()).sandboxes == []
        assert fallback.direct is not None
        assert fallback.direct._idle == []


def test_client_survives_daemon_restart(
    daemon_factory: Callable[..., Daemon],
) -> None:
    data_dir = make_data_dir()
    first = daemon_factory(data_dir=data_dir)
    with Client(first.address) as client:
        assert client.call("List", pb.ListRequest()) is not None
        assert first.stop() == 0
        second = daemon_factory(data_dir=data_dir)
        assert client.call("List", pb.ListRequest()) is not None
        assert second.process.poll() is None


def test_stop_with_idle_connection(daemon_factory: Callable[..., Daemon]) -> None:
    running = daemon_factory()
    with Client(running.address) as client:
        client.call("List", pb.ListRequest())
        assert running.stop() == 0
    assert not os.path.exists(direct_path(running))
    assert not running.socket_path.exists()


def test_stop_rejects_queued_request(daemon_factory: Callable[..., Daemon]) -> None:
    running = daemon_factory()
    with Client(running.address) as client:
        created = client.call("Create", pb.CreateRequest(spec=pb.SandboxSpec()))
        sandbox_id = created.sandbox.sandbox_id
        sock = connect(running)
        run = pb.RunRequest(sandbox_id=sandbox_id, argv=["sleep", "303"])
        create = pb.CreateRequest(spec=pb.SandboxSpec())
        # The Create waits in the daemon's buffer until the Run ends, which
        # the daemon's stop brings about by terminating the sandbox.
        sock.sendall(
            direct.encode_request("Run", None, run.SerializeToString())
            + direct.encode_request("Create", None, create.SerializeToString())
        )
        assert wait_until(lambda: ["sleep", "303"] in running_argvs(client, sandbox_id))
        running.process.send_signal(signal.SIGTERM)
        _, run_code, run_details = read_reply(sock)
        messages, create_code, create_details = read_reply(sock)
        sock.close()
    assert run_code == "OK", run_details
    assert messages == []
    assert create_code == "UNAVAILABLE"
    assert "stopping" in create_details
    assert running.stop() == 0
    after_stop = running.log().split("stopping on SIGTERM", 1)[1]
    assert re.search(r"sandbox sb-\w+ started", after_stop) is None, after_stop


def test_backlog_holds_connect_burst(daemon: Daemon) -> None:
    # While the daemon is stopped, only the listen backlog queues connections,
    # which the kernel caps at net.core.somaxconn.
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    burst = min(500, somaxconn)
    connected = []
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for _ in range(burst):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(direct_path(daemon))
            except BlockingIOError:
                sock.close()
                break
            connected.append(sock)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        for sock in connected:
            sock.close()
    assert len(connected) == burst


def test_long_socket_path_skips_direct() -> None:
    data_dir = make_data_dir()
    # The gRPC socket's path fits in sun_path, but not with the suffix.
    directory = Path("/tmp") / ("d" * (104 - len("/tmp/") - len("/engine.sock")))
    directory.mkdir()
    socket_path = directory / "engine.sock"
    assert len(str(socket_path)) == 104
    running = start_daemon(data_dir, socket_path=socket_path)
    try:
        assert not os.path.exists(direct.socket_path_for(str(socket_path)))
        assert "not serving the direct socket" in running.log()
        with Client(running.address) as client:
            assert client.call("List", pb.ListRequest()).sandboxes == []
    finally:
        status = running.stop()
        directory.rmdir()
        running.log_path.unlink(missing_ok=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    assert status == 0


def test_frame_encoding_round_trip() -> None:
    frame = direct.encode_request("Run", "tok", b"body")
    sizes = direct.REQUEST_HEADER.unpack_from(frame)
    assert sizes == (4, 3, 3)
    assert frame[direct.REQUEST_HEADER.size :] == b"Runtokbody"
    end = direct.encode_end("NOT_FOUND", "sandbox x not found")
    size, kind = struct.unpack_from("<IB", end)
    assert kind == direct.END
    assert direct.decode_end(end[direct.REPLY_HEADER.size :]) == (
        "NOT_FOUND",
        "sandbox x not found",
    )
    assert size == len(end) - direct.REPLY_HEADER.size


def test_async_client_uses_direct_socket(daemon: Daemon, sandbox_id: str) -> None:
    async def scenario() -> None:
        client = AsyncClient(daemon.address)
        try:
            request = pb.RunRequest(sandbox_id=sandbox_id, argv=["echo", "async"])
            reply = await client.call("Run", request)
            assert reply.stdout.data == b"async\n"
            assert client.direct is not None
            assert len(client.direct._idle) == 1
            with pytest.raises(NotFound, match="sb-missing"):
                await client.call("Get", pb.GetRequest(sandbox_id="sb-missing"))
        finally:
            await client.close()

    asyncio.run(scenario())


def test_async_client_survives_daemon_restart(
    daemon_factory: Callable[..., Daemon],
) -> None:
    data_dir = make_data_dir()
    first = daemon_factory(data_dir=data_dir)

    async def scenario() -> None:
        client = AsyncClient(first.address)
        try:
            assert await client.call("List", pb.ListRequest()) is not None
            # Both calls block the loop, so it never reads the EOF of the
            # idle connection that the first daemon closed as it stopped.
            assert first.stop() == 0
            second = daemon_factory(data_dir=data_dir)
            assert await client.call("List", pb.ListRequest()) is not None
            assert second.process.poll() is None
        finally:
            await client.close()

    asyncio.run(scenario())


def test_async_deadline_kills_run(
    daemon: Daemon, client: Client, sandbox_id: str
) -> None:
    async def scenario() -> None:
        async_client = AsyncClient(daemon.address)
        request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sleep", "303"])
        try:
            with pytest.raises(DeadlineExceeded, match="did not reply to Run"):
                await async_client.call("Run", request, timeout=0.5)
        finally:
            await async_client.close()

    asyncio.run(scenario())
    assert wait_until(lambda: ["sleep", "303"] not in running_argvs(client, sandbox_id))


def test_async_stream_closed_early(
    daemon: Daemon, client: Client, sandbox_id: str
) -> None:
    argv = ["sh", "-c", "echo one; sleep 304"]

    async def scenario() -> int:
        async_client = AsyncClient(daemon.address)
        try:
            request = pb.ExecRequest(sandbox_id=sandbox_id, argv=argv)
            events = async_client.stream("Exec", request)
            first = await anext(events)
            await events.aclose()
            assert async_client.direct is not None
            assert async_client.direct._idle == []
            return first.started.pid
        finally:
            await async_client.close()

    pid = asyncio.run(scenario())
    assert argv in running_argvs(client, sandbox_id)
    client.call("Kill", pb.KillRequest(sandbox_id=sandbox_id, pid=pid, signal=9))
