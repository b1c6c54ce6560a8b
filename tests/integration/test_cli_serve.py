"""`engine serve`: the socket, a second daemon, TCP, stopping, and its fd limit."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import Daemon, wait_healthy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import Sandbox

ENGINE_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "engine"


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `engine serve` expecting it to fail at start, and return its result."""
    return subprocess.run(
        [str(ENGINE_BIN), "serve", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_socket_mode_0600(daemon: Daemon) -> None:
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_start_log_names_address(daemon: Daemon) -> None:
    log = daemon.log()
    assert f"serving on {daemon.address}" in log
    assert "TCP" not in log


def test_second_daemon_same_socket_rejected(daemon: Daemon, data_dir: Path) -> None:
    result = serve("--data-dir", str(data_dir), "--socket", str(daemon.socket_path))
    assert result.returncode == 1
    assert "another engine daemon is running" in result.stderr
    assert "Traceback" not in result.stderr
    assert healthy(daemon.address)
    assert daemon.socket_path.exists()


def test_second_daemon_same_data_dir_rejected(daemon: Daemon, data_dir: Path) -> None:
    other_socket = data_dir / "other.sock"
    result = serve("--data-dir", str(daemon.data_dir), "--socket", str(other_socket))
    assert result.returncode == 1
    assert "engine: error: " in result.stderr
    assert "in use" in result.stderr
    assert not other_socket.exists()
    assert healthy(daemon.address)


def test_stale_socket_replaced(
    daemon_factory: Callable[..., Daemon], data_dir: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(data_dir / "engine.sock"))
    stale.close()
    assert (data_dir / "engine.sock").exists()
    started = daemon_factory(data_dir=data_dir)
    assert healthy(started.address)
    assert "removing stale socket" in started.log()


def test_socket_path_not_socket(data_dir: Path) -> None:
    path = data_dir / "engine.sock"
    path.write_text("not a socket")
    result = serve("--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert path.read_text() == "not a socket"


def test_socket_path_too_long(data_dir: Path) -> None:
    long_path = data_dir / ("s" * 120) / "engine.sock"
    result = serve("--data-dir", str(data_dir), "--socket", str(long_path))
    assert result.returncode == 1
    assert "107 bytes" in result.stderr


def test_listen_tcp_needs_token(
    daemon_factory: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = daemon_factory("--listen", "127.0.0.1:0")
    match = re.search(r"serving on unix:\S+, (127\.0\.0\.1:\d+)", started.log())
    assert match is not None, started.log()
    assert "need a bearer token" in started.log()
    created = subprocess.run(
        [str(ENGINE_BIN), "token", "create", "--data-dir", str(started.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    monkeypatch.setenv("ENGINE_TOKEN", created.stdout.strip())
    with Sandbox(address=match.group(1)).create() as sb:
        assert sb.process.run_code("print('tcp')").stdout == "tcp\n"


def test_listen_invalid_address(data_dir: Path) -> None:
    result = serve("--data-dir", str(data_dir), "--listen", "nonsense")
    assert result.returncode == 1
    assert "invalid listen address 'nonsense'" in result.stderr
    assert not (data_dir / "engine.sock").exists()


def test_sigterm_terminates_sandboxes(daemon_factory: Callable[..., Daemon]) -> None:
    started = daemon_factory()
    created = []
    for _ in range(2):
        sb = Sandbox(address=started.address).create()
        sb.process.exec("sleep", "300")
        created.append(sb)
    layers = started.layers_dir()
    sandbox_dirs = [layers / sb.sandbox_id for sb in created]
    assert all(path.exists() for path in sandbox_dirs)
    below = started.descendants()
    assert len(below) >= 2
    for sb in created:
        sb.close()

    status = started.stop()
    assert status == 0, started.log()
    assert not started.socket_path.exists()
    assert list((started.data_dir / "sandboxes").iterdir()) == []
    deadline = time.monotonic() + 5
    while any(p.is_running() for p in below) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p.pid for p in below if p.is_running()] == []


def test_sigint_stops_cleanly(daemon_factory: Callable[..., Daemon]) -> None:
    started = daemon_factory()
    sb = Sandbox(address=started.address).create()
    sandbox_dir = started.layers_dir() / sb.sandbox_id
    assert sandbox_dir.exists()
    sb.close()
    started.process.send_signal(signal.SIGINT)
    assert started.process.wait(60) == 0
    assert "stopping on SIGINT" in started.log()
    assert not sandbox_dir.exists()
    assert not started.socket_path.exists()


def _soft_open_file_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"/proc/{pid}/limits has no Max open files line")


def test_open_file_limit_raised(data_dir: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE above 512, not {hard}")

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(ENGINE_BIN), "serve", "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lower_soft_limit,
        )
    started = Daemon(process, data_dir, data_dir / "engine.sock", log_path)
    try:
        wait_healthy(started.address, process, log_path)
        assert _soft_open_file_limit(started.pid) == hard
        # The supervisors are forks of the zygote with its command line, so
        # only the daemon's own children are looked at.
        zygotes = [
            child
            for child in psutil.Process(started.pid).children()
            if "engine.runtime.zygote" in child.cmdline()
        ]
        assert len(zygotes) == 1
        assert _soft_open_file_limit(zygotes[0].pid) == hard
        assert f"raised the open file limit (RLIMIT_NOFILE) from 512 to {hard}" in (
            started.log()
        )
    finally:
        status = started.stop()
        log_path.unlink(missing_ok=True)
    assert status == 0


def test_live_direct_socket_path_kept(data_dir: Path) -> None:
    # Another process serves the path that the direct socket would take.
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other_path = data_dir / "engine.sock.direct"
    other.bind(str(other_path))
    other.listen(1)
    try:
        result = serve("--data-dir", str(data_dir))
        assert result.returncode == 1
        assert f"another process accepts connections on {other_path}" in result.stderr
        assert "Traceback" not in result.stderr
        assert other_path.exists()
        assert not (data_dir / "engine.sock").exists()
    finally:
        other.close()


def test_unreachable_data_dir_left_clean(data_dir: Path) -> None:
    private = data_dir / "private"
    private.mkdir(mode=0o700)
    target = private / "engine"
    result = serve("--data-dir", str(target))
    assert result.returncode == 1
    assert f"run `chmod o+x {private}`" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (target / "sandboxes").exists()
    assert not (target / "engine.sock").exists()
    assert not (target / "engine.sock.direct").exists()
