"""Bearer tokens on the daemon's gRPC listeners, over real sockets."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from beam_support import create_token
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.errors import Unauthenticated
from engine.sdk import Sandbox
from engine.sdk.client import Client
from engine.v1 import sandbox_pb2 as pb
from engine.v1 import sandbox_pb2_grpc
from tests.integration.conftest import ENGINE_BIN, Daemon, free_port


def engine_cli(daemon: Daemon, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENGINE_BIN), *argv, "--data-dir", str(daemon.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def tcp_daemon(daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, str]:
    port = free_port()
    return daemon_factory("--listen", f"127.0.0.1:{port}"), f"127.0.0.1:{port}"


def list_status(
    address: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        try:
            stub.List(pb.ListRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_tcp_without_token_rejected(tcp_daemon: tuple[Daemon, str]) -> None:
    _, address = tcp_daemon
    assert list_status(address) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "value", ["Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer ", "bearer"]
)
def test_tcp_bad_token_rejected(tcp_daemon: tuple[Daemon, str], value: str) -> None:
    _, address = tcp_daemon
    status = list_status(address, (("authorization", value),))
    assert status == grpc.StatusCode.UNAUTHENTICATED


def test_tcp_valid_token_accepted(tcp_daemon: tuple[Daemon, str]) -> None:
    daemon, address = tcp_daemon
    token = create_token(daemon.data_dir)
    status = list_status(address, (("authorization", f"Bearer {token}"),))
    assert status == grpc.StatusCode.OK


def test_unix_socket_needs_no_token(tcp_daemon: tuple[Daemon, str]) -> None:
    daemon, _ = tcp_daemon
    assert list_status(daemon.address) == grpc.StatusCode.OK


def test_unix_socket_bad_token_rejected(tcp_daemon: tuple[Daemon, str]) -> None:
    daemon, _ = tcp_daemon
    status = list_status(daemon.address, (("authorization", "Bearer wrong"),))
    assert status == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(tcp_daemon: tuple[Daemon, str]) -> None:
    _, address = tcp_daemon
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_revoked_token_rejected_at_once(tcp_daemon: tuple[Daemon, str]) -> None:
    daemon, address = tcp_daemon
    token = create_token(daemon.data_dir)
    metadata = (("authorization", f"Bearer {token}"),)
    assert list_status(address, metadata) == grpc.StatusCode.OK
    listed = engine_cli(daemon, "token", "ls")
    token_id = listed.stdout.splitlines()[1].split()[0]
    removed = engine_cli(daemon, "token", "rm", token_id)
    assert removed.returncode == 0, removed.stderr
    assert list_status(address, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_sdk_sends_token_from_environment(
    tcp_daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, address = tcp_daemon
    monkeypatch.setenv("ENGINE_TOKEN", create_token(daemon.data_dir))
    with Sandbox(address=address).create() as sandbox:
        process = sandbox.process.exec("echo", "authenticated")
        assert process.wait() == 0
        assert process.stdout.read() == "authenticated\n"


def test_sdk_error_without_token(
    tcp_daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = tcp_daemon
    monkeypatch.delenv("ENGINE_TOKEN", raising=False)
    with Client(address) as client, pytest.raises(Unauthenticated, match="token"):
        client.call("List", pb.ListRequest())


def test_token_rm_unknown_id(tcp_daemon: tuple[Daemon, str]) -> None:
    daemon, _ = tcp_daemon
    result = engine_cli(daemon, "token", "rm", "0123456789ab")
    assert result.returncode != 0
    assert "token id '0123456789ab' not found" in result.stderr


def test_token_create_needs_engine_database(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ENGINE_BIN), "token", "create", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "no engine database" in result.stderr
    assert list(tmp_path.iterdir()) == []
