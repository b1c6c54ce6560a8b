"""SandboxService over the daemon's real unix socket, with the generated stubs only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc

if TYPE_CHECKING:
    from conftest import Daemon

UNKNOWN_ID = "sb-000000000000"


@pytest.fixture
def sandbox_id(stub: sandbox_pb2_grpc.SandboxServiceStub) -> Iterator[str]:
    reply = stub.Create(pb.CreateRequest(spec=pb.SandboxSpec()))
    try:
        yield reply.sandbox.sandbox_id
    finally:
        stub.Terminate(pb.TerminateRequest(sandbox_id=reply.sandbox.sandbox_id))


def exec_events(
    stub: sandbox_pb2_grpc.SandboxServiceStub,
    sandbox_id: str,
    *argv: str,
    **fields: object,
) -> list[pb.ExecEvent]:
    request = pb.ExecRequest(sandbox_id=sandbox_id, argv=list(argv), **fields)
    return list(stub.Exec(request, timeout=60))


def output_of(events: list[pb.ExecEvent], stream: int) -> bytes:
    return b"".join(
        event.output.data
        for event in events
        if event.WhichOneof("event") == "output" and event.output.stream == stream
    )


def start(
    stub: sandbox_pb2_grpc.SandboxServiceStub,
    sandbox_id: str,
    *argv: str,
    **fields: object,
) -> int:
    call = stub.Exec(pb.ExecRequest(sandbox_id=sandbox_id, argv=list(argv), **fields))
    first = next(call)
    call.cancel()
    assert first.WhichOneof("event") == "started"
    return first.started.pid


def test_create_returns_running_sandbox(
    stub: sandbox_pb2_grpc.SandboxServiceStub,
) -> None:
    spec = pb.SandboxSpec(
        memory_mib=64, cpu=0.5, name="api-test", labels={"suite": "grpc"}
    )
    reply = stub.Create(pb.CreateRequest(spec=spec))
    sandbox = reply.sandbox
    try:
        assert sandbox.sandbox_id.startswith("sb-")
        assert sandbox.state == pb.SANDBOX_STATE_RUNNING
        assert sandbox.spec.memory_mib == 64
        assert sandbox.spec.cpu == 0.5
        assert sandbox.spec.pids == 512
        assert sandbox.spec.ttl_seconds == 600
        assert sandbox.spec.image == "host"
        assert sandbox.HasField("expires_at")
        assert not sandbox.HasField("terminated_at")
    finally:
        final = stub.Terminate(
            pb.TerminateRequest(sandbox_id=sandbox.sandbox_id)
        ).sandbox
    assert final.state == pb.SANDBOX_STATE_TERMINATED
    assert final.termination_reason == pb.TERMINATION_REASON_USER
    assert final.HasField("terminated_at")


def test_unset_limits_get_defaults(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    spec = stub.Get(pb.GetRequest(sandbox_id=sandbox_id)).sandbox.spec
    assert spec.cpu == 1.0
    assert spec.memory_mib == 512
    assert spec.pids == 512


def test_exec_event_order(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    events = exec_events(stub, sandbox_id, "sh", "-c", "echo out; echo err >&2; exit 3")
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "exit"
    assert set(kinds[1:-1]) == {"output"}
    assert events[0].started.pid > 0
    assert output_of(events, pb.STREAM_STDOUT) == b"out\n"
    assert output_of(events, pb.STREAM_STDERR) == b"err\n"
    assert events[-1].exit.exit_code == 3
    assert events[-1].exit.reason == pb.EXIT_REASON_EXITED
    assert events[-1].exit.signal == ""


def test_run_returns_exit_and_output(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    request = pb.RunRequest(
        sandbox_id=sandbox_id,
        argv=["sh", "-c", "echo out; echo err >&2; kill -TERM $$"],
    )
    reply = stub.Run(request, timeout=60)
    assert reply.pid > 0
    assert reply.exit.exit_code == 143
    assert reply.exit.signal == "SIGTERM"
    assert reply.exit.reason == pb.EXIT_REASON_SIGNALED
    assert reply.stdout.data == b"out\n"
    assert reply.stdout.eof
    assert reply.stdout.stream == pb.STREAM_STDOUT
    assert reply.stderr.data == b"err\n"
    assert reply.stderr.eof


def test_run_deadline_kills_process(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    request = pb.RunRequest(sandbox_id=sandbox_id, argv=["sleep", "1000"])
    with pytest.raises(grpc.RpcError) as raised:
        stub.Run(request, timeout=1)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    listing = pb.ListProcessesRequest(sandbox_id=sandbox_id)
    sleepers = list(stub.ListProcesses(listing).processes)
    while time.monotonic() < deadline and any(
        p.state != pb.PROCESS_STATE_EXITED for p in sleepers
    ):
        time.sleep(0.05)
        sleepers = list(stub.ListProcesses(listing).processes)
    assert len(sleepers) == 1
    assert sleepers[0].state == pb.PROCESS_STATE_EXITED
    assert sleepers[0].signal == "SIGKILL"
    assert sleepers[0].exit_reason == pb.EXIT_REASON_KILLED


def test_read_output_unfollowed_returns_all(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    # 300 000 bytes is several of the daemon's internal chunks.
    reply = stub.Run(
        pb.RunRequest(
            sandbox_id=sandbox_id,
            argv=["head", "-c", "300000", "/dev/zero"],
            max_output_bytes=0,
        ),
        timeout=60,
    )
    chunks = list(
        stub.ReadOutput(
            pb.ReadOutputRequest(
                sandbox_id=sandbox_id,
                pid=reply.pid,
                stream=pb.STREAM_STDOUT,
                offset=0,
                follow=False,
            ),
            timeout=60,
        )
    )
    assert reply.stdout.data == b""
    assert not reply.stdout.eof
    assert b"".join(chunk.data for chunk in chunks) == bytes(300000)
    assert chunks[-1].eof


def test_run_caps_output_per_stream(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    request = pb.RunRequest(
        sandbox_id=sandbox_id,
        argv=["sh", "-c", "head -c 5000 /dev/zero"],
        max_output_bytes=1000,
    )
    reply = stub.Run(request, timeout=60)
    assert reply.stdout.data == bytes(1000)
    assert not reply.stdout.eof
    rest = stub.ReadOutput(
        pb.ReadOutputRequest(
            sandbox_id=sandbox_id,
            pid=reply.pid,
            stream=pb.STREAM_STDOUT,
            offset=1000,
            follow=True,
        ),
        timeout=60,
    )
    assert b"".join(chunk.data for chunk in rest) == bytes(4000)


def test_run_rejects_oversized_output_limit(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    request = pb.RunRequest(
        sandbox_id=sandbox_id, argv=["true"], max_output_bytes=2 * 1024 * 1024
    )
    with pytest.raises(grpc.RpcError) as raised:
        stub.Run(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_output_bytes 2097152" in raised.value.details()


def test_exec_output_offsets_contiguous(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    events = exec_events(stub, sandbox_id, "sh", "-c", "head -c 3000000 /dev/zero")
    chunks = [
        e.output
        for e in events
        if e.WhichOneof("event") == "output" and e.output.stream == pb.STREAM_STDOUT
    ]
    expected = 0
    for chunk in chunks:
        assert chunk.offset == expected
        expected += len(chunk.data)
    assert expected == 3_000_000
    assert all(len(chunk.data) <= 1024 * 1024 for chunk in chunks)


def test_cancelled_exec_keeps_running(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "sh", "-c", "sleep 0.5; echo done")
    waited = stub.Wait(
        pb.WaitRequest(sandbox_id=sandbox_id, pid=pid), timeout=30
    ).process
    assert waited.state == pb.PROCESS_STATE_EXITED
    assert waited.exit_code == 0
    chunks = list(
        stub.ReadOutput(
            pb.ReadOutputRequest(
                sandbox_id=sandbox_id, pid=pid, stream=pb.STREAM_STDOUT, follow=True
            ),
            timeout=30,
        )
    )
    assert b"".join(c.data for c in chunks) == b"done\n"
    assert chunks[-1].eof


def test_read_output_from_offset(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "printf", "0123456789")
    stub.Wait(pb.WaitRequest(sandbox_id=sandbox_id, pid=pid), timeout=30)
    request = pb.ReadOutputRequest(
        sandbox_id=sandbox_id, pid=pid, stream=pb.STREAM_STDOUT, offset=4, follow=False
    )
    chunks = list(stub.ReadOutput(request, timeout=30))
    assert b"".join(c.data for c in chunks) == b"456789"
    assert chunks[0].offset == 4
    assert chunks[0].dropped == 0
    assert chunks[-1].eof


def test_read_output_without_follow_returns_now(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "sh", "-c", "echo first; sleep 30")
    deadline = time.monotonic() + 10
    data = b""
    request = pb.ReadOutputRequest(
        sandbox_id=sandbox_id, pid=pid, stream=pb.STREAM_STDOUT
    )
    while data != b"first\n" and time.monotonic() < deadline:
        began = time.monotonic()
        chunks = list(stub.ReadOutput(request, timeout=30))
        assert time.monotonic() - began < 2
        data = b"".join(c.data for c in chunks)
        assert not any(c.eof for c in chunks)
    assert data == b"first\n"
    stub.Kill(pb.KillRequest(sandbox_id=sandbox_id, pid=pid))


def test_wait_timeout_returns_running(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "sleep", "30")
    began = time.monotonic()
    reply = stub.Wait(
        pb.WaitRequest(sandbox_id=sandbox_id, pid=pid, timeout_seconds=0.3), timeout=30
    )
    elapsed = time.monotonic() - began
    assert reply.process.state == pb.PROCESS_STATE_RUNNING
    assert not reply.process.HasField("exit_code")
    assert 0.25 <= elapsed < 5
    stub.Kill(pb.KillRequest(sandbox_id=sandbox_id, pid=pid))


def test_kill_reports_sigkill(
    stub: sandbox_pb2_grpc.SandboxServiceStub, daemon: Daemon, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "sleep", "96.5")
    visible = [p for p in daemon.descendants() if _cmdline(p) == ["sleep", "96.5"]]
    assert len(visible) == 1
    stub.Kill(pb.KillRequest(sandbox_id=sandbox_id, pid=pid))
    process = stub.Wait(
        pb.WaitRequest(sandbox_id=sandbox_id, pid=pid), timeout=30
    ).process
    assert process.exit_code == 137
    assert process.signal == "SIGKILL"
    assert process.exit_reason in (pb.EXIT_REASON_KILLED, pb.EXIT_REASON_SIGNALED)
    assert not visible[0].is_running()


def test_kill_with_sigterm(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "sleep", "30")
    stub.Kill(pb.KillRequest(sandbox_id=sandbox_id, pid=pid, signal=15))
    process = stub.Wait(
        pb.WaitRequest(sandbox_id=sandbox_id, pid=pid), timeout=30
    ).process
    assert process.exit_code == 128 + 15
    assert process.signal == "SIGTERM"


def test_stdin_write_and_close(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "cat", stdin=True)
    stub.WriteStdin(
        pb.WriteStdinRequest(sandbox_id=sandbox_id, pid=pid, data=b"ping\n")
    )
    stub.CloseStdin(pb.CloseStdinRequest(sandbox_id=sandbox_id, pid=pid))
    process = stub.Wait(
        pb.WaitRequest(sandbox_id=sandbox_id, pid=pid), timeout=30
    ).process
    assert process.exit_code == 0
    request = pb.ReadOutputRequest(
        sandbox_id=sandbox_id, pid=pid, stream=pb.STREAM_STDOUT, follow=True
    )
    assert b"".join(c.data for c in stub.ReadOutput(request, timeout=30)) == b"ping\n"


def test_write_stdin_after_exit(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "true", stdin=True)
    stub.Wait(pb.WaitRequest(sandbox_id=sandbox_id, pid=pid), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        stub.WriteStdin(
            pb.WriteStdinRequest(sandbox_id=sandbox_id, pid=pid, data=b"late")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_write_stdin_not_opened(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    pid = start(stub, sandbox_id, "sleep", "30")
    with pytest.raises(grpc.RpcError) as caught:
        stub.WriteStdin(pb.WriteStdinRequest(sandbox_id=sandbox_id, pid=pid, data=b"x"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.Kill(pb.KillRequest(sandbox_id=sandbox_id, pid=pid))


def test_list_processes_includes_exited(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    exited = start(stub, sandbox_id, "true")
    stub.Wait(pb.WaitRequest(sandbox_id=sandbox_id, pid=exited), timeout=30)
    running = start(stub, sandbox_id, "sleep", "30")
    processes = {
        p.pid: p
        for p in stub.ListProcesses(
            pb.ListProcessesRequest(sandbox_id=sandbox_id)
        ).processes
    }
    assert processes[exited].state == pb.PROCESS_STATE_EXITED
    assert processes[exited].exit_code == 0
    assert list(processes[exited].argv) == ["true"]
    assert processes[running].state == pb.PROCESS_STATE_RUNNING
    assert not processes[running].HasField("exit_code")
    stub.Kill(pb.KillRequest(sandbox_id=sandbox_id, pid=running))


def test_exec_in_terminated_sandbox(stub: sandbox_pb2_grpc.SandboxServiceStub) -> None:
    sandbox_id = stub.Create(pb.CreateRequest(spec=pb.SandboxSpec())).sandbox.sandbox_id
    first = stub.Terminate(pb.TerminateRequest(sandbox_id=sandbox_id)).sandbox
    second = stub.Terminate(pb.TerminateRequest(sandbox_id=sandbox_id)).sandbox
    assert first.state == pb.SANDBOX_STATE_TERMINATED
    assert second.state == pb.SANDBOX_STATE_TERMINATED
    assert second.terminated_at == first.terminated_at
    with pytest.raises(grpc.RpcError) as caught:
        exec_events(stub, sandbox_id, "true")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_update_ttl(stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str) -> None:
    sandbox = stub.UpdateTTL(
        pb.UpdateTTLRequest(sandbox_id=sandbox_id, ttl_seconds=60)
    ).sandbox
    assert sandbox.spec.ttl_seconds == 60
    expires = (
        sandbox.expires_at.ToNanoseconds() - sandbox.last_activity_at.ToNanoseconds()
    )
    assert expires == 60 * 10**9
    forever = stub.UpdateTTL(
        pb.UpdateTTLRequest(sandbox_id=sandbox_id, ttl_seconds=0)
    ).sandbox
    assert not forever.HasField("expires_at")


def test_ttl_expiry_terminates(stub: sandbox_pb2_grpc.SandboxServiceStub) -> None:
    spec = pb.SandboxSpec(ttl_seconds=1)
    sandbox_id = stub.Create(pb.CreateRequest(spec=spec)).sandbox.sandbox_id
    deadline = time.monotonic() + 10
    state = pb.SANDBOX_STATE_RUNNING
    while state != pb.SANDBOX_STATE_TERMINATED and time.monotonic() < deadline:
        time.sleep(0.2)
        sandbox = stub.Get(pb.GetRequest(sandbox_id=sandbox_id)).sandbox
        state = sandbox.state
    assert state == pb.SANDBOX_STATE_TERMINATED
    assert sandbox.termination_reason == pb.TERMINATION_REASON_TTL


def test_list_filters(stub: sandbox_pb2_grpc.SandboxServiceStub) -> None:
    spec = pb.SandboxSpec(name="filtered", labels={"team": "api", "tier": "test"})
    sandbox_id = stub.Create(pb.CreateRequest(spec=spec)).sandbox.sandbox_id
    try:
        by_label = stub.List(pb.ListRequest(labels={"team": "api"})).sandboxes
        by_name = stub.List(pb.ListRequest(name="filtered")).sandboxes
        running = stub.List(pb.ListRequest(state=pb.SANDBOX_STATE_RUNNING)).sandboxes
        other = stub.List(pb.ListRequest(labels={"team": "other"})).sandboxes
        assert [s.sandbox_id for s in by_label] == [sandbox_id]
        assert [s.sandbox_id for s in by_name] == [sandbox_id]
        assert sandbox_id in [s.sandbox_id for s in running]
        assert sandbox_id not in [s.sandbox_id for s in other]
    finally:
        stub.Terminate(pb.TerminateRequest(sandbox_id=sandbox_id))
    terminated = stub.List(pb.ListRequest(state=pb.SANDBOX_STATE_TERMINATED)).sandboxes
    assert sandbox_id in [s.sandbox_id for s in terminated]


def test_stats_reports_usage(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    exec_events(stub, sandbox_id, "python3", "-c", "sum(range(3_000_000))")
    stats = stub.Stats(pb.StatsRequest(sandbox_id=sandbox_id))
    assert stats.cpu_seconds > 0
    assert stats.memory_peak_bytes > 0


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.Get(pb.GetRequest(sandbox_id=UNKNOWN_ID)),
        lambda stub: stub.Terminate(pb.TerminateRequest(sandbox_id=UNKNOWN_ID)),
        lambda stub: stub.UpdateTTL(
            pb.UpdateTTLRequest(sandbox_id=UNKNOWN_ID, ttl_seconds=5)
        ),
        lambda stub: stub.Stats(pb.StatsRequest(sandbox_id=UNKNOWN_ID)),
        lambda stub: stub.ListProcesses(pb.ListProcessesRequest(sandbox_id=UNKNOWN_ID)),
        lambda stub: stub.Wait(pb.WaitRequest(sandbox_id=UNKNOWN_ID, pid=2)),
        lambda stub: stub.Kill(pb.KillRequest(sandbox_id=UNKNOWN_ID, pid=2)),
        lambda stub: stub.WriteStdin(
            pb.WriteStdinRequest(sandbox_id=UNKNOWN_ID, pid=2)
        ),
        lambda stub: stub.CloseStdin(
            pb.CloseStdinRequest(sandbox_id=UNKNOWN_ID, pid=2)
        ),
        lambda stub: list(
            stub.Exec(pb.ExecRequest(sandbox_id=UNKNOWN_ID, argv=["true"]))
        ),
        lambda stub: list(
            stub.ReadOutput(
                pb.ReadOutputRequest(
                    sandbox_id=UNKNOWN_ID, pid=2, stream=pb.STREAM_STDOUT
                )
            )
        ),
    ],
    ids=[
        "Get",
        "Terminate",
        "UpdateTTL",
        "Stats",
        "ListProcesses",
        "Wait",
        "Kill",
        "WriteStdin",
        "CloseStdin",
        "Exec",
        "ReadOutput",
    ],
)
def test_unknown_sandbox_not_found(
    stub: sandbox_pb2_grpc.SandboxServiceStub, call
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert UNKNOWN_ID in caught.value.details()


def test_unknown_pid_not_found(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Wait(pb.WaitRequest(sandbox_id=sandbox_id, pid=4000))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "4000" in caught.value.details()


def test_missing_executable(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        exec_events(stub, sandbox_id, "no-such-program-xyz")
    assert caught.value.code() in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "no-such-program-xyz" in caught.value.details()


BAD_SPECS = {
    "negative cpu": pb.SandboxSpec(cpu=-1),
    "zero cpu": pb.SandboxSpec(cpu=0),
    "NaN cpu": pb.SandboxSpec(cpu=float("nan")),
    "negative memory": pb.SandboxSpec(memory_mib=-64),
    "zero pids": pb.SandboxSpec(pids=0),
    "negative pids": pb.SandboxSpec(pids=-5),
    "NUL in workdir": pb.SandboxSpec(workdir="/tmp\x00x"),
    "relative workdir": pb.SandboxSpec(workdir="tmp"),
    "NUL in image": pb.SandboxSpec(image="host\x00"),
    "NUL in env value": pb.SandboxSpec(env={"A": "x\x00y"}),
    "= in env name": pb.SandboxSpec(env={"A=B": "x"}),
    "NaN ttl": pb.SandboxSpec(ttl_seconds=float("nan")),
    "ttl past year 9999": pb.SandboxSpec(ttl_seconds=1e300),
    "unknown image": pb.SandboxSpec(image="no-such-image"),
}


@pytest.mark.parametrize("spec", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_create_rejects_bad_spec(
    stub: sandbox_pb2_grpc.SandboxServiceStub,
    channel: grpc.Channel,
    spec: pb.SandboxSpec,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Create(pb.CreateRequest(spec=spec))
    assert caught.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    )
    assert "Traceback" not in caught.value.details()
    assert_healthy(channel)


BAD_EXECS = {
    "empty argv": {"argv": []},
    "empty argv[0]": {"argv": [""]},
    "NUL in argv": {"argv": ["echo", "a\x00b"]},
    "NUL in cwd": {"argv": ["true"], "cwd": "/tmp\x00"},
    "NUL in env": {"argv": ["true"], "env": {"A": "\x00"}},
    "200 KiB env value": {"argv": ["true"], "env": {"BIG": "x" * (200 * 1024)}},
    "200 KiB argument": {"argv": ["echo", "x" * (200 * 1024)]},
    "zero timeout": {"argv": ["true"], "timeout_seconds": 0},
    "negative timeout": {"argv": ["true"], "timeout_seconds": -1},
}


@pytest.mark.parametrize("fields", BAD_EXECS.values(), ids=BAD_EXECS.keys())
def test_exec_rejects_bad_request(
    stub: sandbox_pb2_grpc.SandboxServiceStub,
    channel: grpc.Channel,
    sandbox_id: str,
    fields: dict,
) -> None:
    request = pb.ExecRequest(sandbox_id=sandbox_id, **fields)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Exec(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details()) < 400
    assert_healthy(channel)


def test_huge_env_rejected(
    stub: sandbox_pb2_grpc.SandboxServiceStub, channel: grpc.Channel, sandbox_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        exec_events(stub, sandbox_id, "true", env={"HUGE": "x" * (10 * 1024 * 1024)})
    assert caught.value.code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert_healthy(channel)
    assert (
        output_of(exec_events(stub, sandbox_id, "echo", "ok"), pb.STREAM_STDOUT)
        == b"ok\n"
    )


def test_bad_signal_and_pid(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    for request in (
        pb.KillRequest(sandbox_id=sandbox_id, pid=2, signal=0),
        pb.KillRequest(sandbox_id=sandbox_id, pid=2, signal=1000),
        pb.KillRequest(sandbox_id=sandbox_id, pid=-1),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Kill(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_undecodable_request(channel: grpc.Channel) -> None:
    # Field 1 (sandbox_id, a string) holding the byte 0xFF, which is not UTF-8.
    get = channel.unary_unary("/engine.v1.SandboxService/Get")
    with pytest.raises(grpc.RpcError) as caught:
        get(b"\x0a\x01\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_healthy(channel)


def test_error_has_engine_metadata(stub: sandbox_pb2_grpc.SandboxServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Get(pb.GetRequest(sandbox_id=UNKNOWN_ID))
    metadata = dict(caught.value.trailing_metadata())
    assert metadata.get("engine-error") == "NotFound"


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "engine.v1.SandboxService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_service(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
    names = [s.name for s in replies[0].list_services_response.service]
    assert "engine.v1.SandboxService" in names
    assert "grpc.health.v1.Health" in names


def assert_healthy(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_exec_timeout_kills_process_group(
    stub: sandbox_pb2_grpc.SandboxServiceStub, daemon: Daemon, sandbox_id: str
) -> None:
    # A unique duration tells these sleeps apart from other tests' processes.
    script = "sleep 97.25 & sleep 97.25"
    began = time.monotonic()
    events = exec_events(stub, sandbox_id, "sh", "-c", script, timeout_seconds=1)
    elapsed = time.monotonic() - began
    exited = events[-1].exit
    assert exited.reason == pb.EXIT_REASON_TIMEOUT
    assert exited.exit_code == 137
    assert exited.signal == "SIGKILL"
    assert elapsed < 2.0
    left = [p for p in daemon.descendants() if _cmdline(p) == ["sleep", "97.25"]]
    assert left == []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_oversized_exec_names_the_limit(
    stub: sandbox_pb2_grpc.SandboxServiceStub, sandbox_id: str
) -> None:
    """A request above gRPC's default 4 MiB still gets the engine's own message."""
    request = pb.ExecRequest(
        sandbox_id=sandbox_id, argv=["true"], env={"BIG": "x" * (5 << 20)}
    )
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.Exec(request):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "env['BIG']" in raised.value.details()
