"""Exception mapping of the server, on an in-process grpc.aio server.

The daemon's Engine raises unexpected exceptions only on bugs, so these tests
serve the real SandboxServicer and ErrorInterceptor over a real unix socket,
in front of an engine stand-in whose methods raise on purpose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from engine import errors
from engine.core.models import OutputChunk, Stream
from engine.server.app import create_server
from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc

SECRET = "secret-detail-from-the-daemon"


class RaisingEngine:
    """Engine stand-in: each method raises what its docstring names."""

    async def get_sandbox(self, sandbox_id: str) -> None:
        """Raises RuntimeError, a bug."""
        raise RuntimeError(SECRET)

    async def list_sandboxes(self, **filters: object) -> None:
        """Raises ResourceExhausted, an engine error."""
        raise errors.ResourceExhausted("too many sandboxes: 5 of 5 in use")

    async def terminate_sandbox(self, sandbox_id: str) -> None:
        """Raises OSError, as the runtime does."""
        raise OSError(5, f"write /sys/fs/cgroup/{SECRET} failed")

    async def read_output(
        self, sandbox_id: str, pid: int, stream: Stream, *, offset: int, follow: bool
    ) -> AsyncIterator[OutputChunk]:
        """Yields one chunk, then raises KeyError in the middle of the stream."""
        yield OutputChunk(stream, 0, b"first")
        raise KeyError(SECRET)


def call_server(scenario, tmp_path: Path):
    async def main():
        server, addresses = create_server(
            RaisingEngine(), socket_path=tmp_path / "e.sock"
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(addresses["unix"]) as channel:
                return await scenario(sandbox_pb2_grpc.SandboxServiceStub(channel))
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_bug_becomes_internal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(sandbox_id="sb-1"))
        return caught.value

    with caplog.at_level(logging.ERROR, logger="engine.server.interceptor"):
        error = call_server(scenario, tmp_path)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in error.details()
    assert "Traceback" not in error.details()
    error_id = error.details().split()[2]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "sb-1" in logged[0].getMessage()


def test_engine_error_keeps_code(tmp_path: Path) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.List(pb.ListRequest())
        return caught.value

    error = call_server(scenario, tmp_path)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "too many sandboxes: 5 of 5 in use"


def test_os_error_hidden(tmp_path: Path) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Terminate(pb.TerminateRequest(sandbox_id="sb-1"))
        return caught.value

    error = call_server(scenario, tmp_path)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in error.details()


def test_stream_error_after_data(tmp_path: Path) -> None:
    async def scenario(stub):
        received = []
        request = pb.ReadOutputRequest(
            sandbox_id="sb-1", pid=2, stream=pb.STREAM_STDOUT, follow=True
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for chunk in stub.ReadOutput(request):
                received.append(chunk.data)
        return received, caught.value

    received, error = call_server(scenario, tmp_path)
    assert received == [b"first"]
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in error.details()


def test_validation_before_engine(tmp_path: Path) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(sandbox_id="sb-\x00"))
        return caught.value

    error = call_server(scenario, tmp_path)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NUL" in error.details()
    assert "sandbox_id" in error.details()


def test_long_value_truncated(tmp_path: Path) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(sandbox_id="x" * 5000 + "\x00"))
        return caught.value

    error = call_server(scenario, tmp_path)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details()) < 300
    assert "5001 characters" in error.details()
