"""Fixtures of the integration tests: a real daemon subprocess and an embedded engine.

The daemon is `.venv/bin/engine serve` on a unix socket in a short temporary
directory under /tmp, because sun_path has room for at most 107 bytes. Each
fixture stops what it started with SIGTERM and checks that the daemon exits
with status 0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from beam_support import Beam, BeamDaemon, create_token, start_beam_daemon, write_app
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import Sandbox, SandboxInstance
from engine.sdk.embedded import EmbeddedEngine
from engine.v1 import sandbox_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
ENGINE_BIN = ROOT / ".venv" / "bin" / "engine"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    data_dir: Path
    socket_path: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the daemon, sandbox processes included."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def zygote_pid(self) -> int:
        """Return the pid of the daemon's zygote, its one child of that name."""
        for child in psutil.Process(self.pid).children():
            with contextlib.suppress(psutil.Error):
                if "engine.runtime.zygote" in " ".join(child.cmdline()):
                    return child.pid
        raise AssertionError(f"daemon {self.pid} has no zygote")

    def layers_dir(self) -> Path:
        """Return the layer file system's root as this process reaches it.

        It is mounted in the zygote's mount namespace only.
        """
        inside = str(self.data_dir / "sandboxes").lstrip("/")
        return Path(f"/proc/{self.zygote_pid()}/root") / inside

    def settled_layers(self, timeout: float = 15.0) -> set[str]:
        """Return the layer dirs once the warm pool has stopped changing them.

        The listing counts as settled when three readings 0.2 s apart agree.
        """
        deadline = time.monotonic() + timeout
        readings: list[set[str]] = []
        while time.monotonic() < deadline:
            readings.append(set(os.listdir(self.layers_dir())))
            if len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]:
                break
            time.sleep(0.2)
        return readings[-1]

    def stop(self) -> int:
        """Send SIGTERM and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"daemon {self.pid} ignored SIGTERM for {STOP_TIMEOUT} s;"
                f" log:\n{self.log()}"
            ) from None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_data_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="eng-", dir="/tmp"))
    # mkdtemp makes the directory 0700, but the sandbox's mapped uids must be
    # able to traverse the data dir to reach the image and overlay dirs.
    path.chmod(0o755)
    return path


def wait_healthy(
    address: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {process.returncode} during start; log:\n"
                    + log_path.read_text(errors="replace")
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.05)
    raise AssertionError(
        f"daemon not SERVING after {START_TIMEOUT} s; log:\n"
        + log_path.read_text(errors="replace")
    )


def start_daemon(
    data_dir: Path, *extra: str, socket_path: Path | None = None
) -> Daemon:
    socket_path = socket_path or data_dir / "engine.sock"
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(ENGINE_BIN),
                "serve",
                "--data-dir",
                str(data_dir),
                "--socket",
                str(socket_path),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(process, data_dir, socket_path, log_path)
    try:
        wait_healthy(daemon.address, process, log_path)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def remove_data_dir(daemon: Daemon) -> None:
    shutil.rmtree(daemon.data_dir, ignore_errors=True)
    daemon.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One daemon shared by the tests that do not stop or restart it."""
    data_dir = make_data_dir()
    running = start_daemon(data_dir)
    try:
        yield running
    finally:
        status = running.stop()
        log = running.log()
        if os.environ.get("ENGINE_KEEP_DAEMON_LOG"):
            print(f"shared daemon log:\n{log}")
        remove_data_dir(running)
        assert status == 0, f"daemon exited with {status}; log:\n{log}"
        assert not running.socket_path.exists()
        assert not Path(f"{running.socket_path}.direct").exists()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """Start private daemons; each is stopped and checked for status 0 at teardown."""
    started: list[Daemon] = []

    def start(*extra: str, data_dir: Path | None = None) -> Daemon:
        running = start_daemon(data_dir or make_data_dir(), *extra)
        started.append(running)
        return running

    yield start
    failures = []
    for running in started:
        status = running.stop()
        if status != 0:
            failures.append(
                f"daemon {running.pid} exited with {status}:\n{running.log()}"
            )
        remove_data_dir(running)
    assert not failures, "\n".join(failures)


@pytest.fixture
def crash_daemon_factory() -> Iterator[Callable[[], Daemon]]:
    """Start private daemons that the test may kill with SIGKILL.

    Teardown kills a daemon still running and removes its log, but leaves
    the data dir, which a later daemon on it cleans up.
    """
    started: list[Daemon] = []

    def start() -> Daemon:
        running = start_daemon(make_data_dir())
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
        running.log_path.unlink(missing_ok=True)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """An empty data dir under /tmp, removed at teardown."""
    path = make_data_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def address(daemon: Daemon) -> str:
    return daemon.address


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> sandbox_pb2_grpc.SandboxServiceStub:
    return sandbox_pb2_grpc.SandboxServiceStub(channel)


@pytest.fixture
def sandbox(address: str) -> Iterator[SandboxInstance]:
    """A sandbox on the shared daemon, terminated at teardown."""
    with Sandbox(address=address).create() as created:
        yield created


@pytest.fixture
def embedded() -> Iterator[EmbeddedEngine]:
    """An Engine with its gRPC server in this process, on a private data dir."""
    data_dir = make_data_dir()
    engine = EmbeddedEngine(data_dir=data_dir)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def cli_env(address: str) -> dict[str, str]:
    """Environment for `engine` subprocesses that points them at the shared daemon."""
    env = dict(os.environ)
    env["ENGINE_ADDRESS"] = address
    return env


CliRunner = Callable[..., subprocess.CompletedProcess[Any]]


@pytest.fixture
def cli(cli_env: dict[str, str]) -> CliRunner:
    """Run `.venv/bin/engine ARGS...` against the shared daemon, capturing output."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        input: str | None = None,
        timeout: float = 120,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(
            [str(ENGINE_BIN), *args],
            env=env if env is not None else cli_env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=text,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="module")
def remote_host() -> Iterator[Any]:
    """A test-owned network namespace serving TCP, UDP and DNS; see netpeer.py."""
    from netpeer import RemoteHost

    remote = RemoteHost().start()
    try:
        yield remote
    finally:
        remote.close()


@pytest.fixture(scope="module")
def network_daemon(remote_host: Any) -> Iterator[Daemon]:
    """A daemon whose sandboxes reach only ``remote_host``, which is also their DNS.

    Its unauthenticated TCP listener is on the host end of the remote host's
    veth, a host address that sandboxes must not reach.
    """
    data_dir = make_data_dir()
    running = start_daemon(
        data_dir,
        "--uplink",
        remote_host.host_ifname,
        "--dns",
        remote_host.address,
        "--listen",
        f"{remote_host.host_address}:0",
    )
    try:
        yield running
    finally:
        status = running.stop()
        log = running.log()
        remove_data_dir(running)
        assert status == 0, f"daemon exited with {status}; log:\n{log}"


# The HTTP adapter's tests; their helpers are in beam_support.py.


@pytest.fixture(scope="session")
def beam_daemon() -> Iterator[BeamDaemon]:
    """One daemon with --http shared by the tests that do not restart it."""
    data_dir = make_data_dir()
    daemon = start_beam_daemon(data_dir)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        log = daemon.log()
        shutil.rmtree(data_dir, ignore_errors=True)
        if os.environ.get("ENGINE_KEEP_DAEMON_LOG"):
            print(f"daemon log kept at {daemon.log_path}")
        else:
            os.unlink(daemon.log_path)
        assert status == 0, f"daemon exited with {status}; log:\n{log}"


@pytest.fixture(scope="session")
def app_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="eng-app-", dir="/tmp"))
    write_app(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def session_token(beam_daemon: BeamDaemon) -> str:
    return create_token(beam_daemon.data_dir)


@pytest.fixture
def beam(beam_daemon: BeamDaemon, session_token: str, app_dir: Path) -> Iterator[Beam]:
    """The shared daemon; deployments a test makes are deleted at teardown."""
    helper = Beam(beam_daemon, session_token, app_dir)
    try:
        yield helper
    finally:
        helper.delete_all()


@pytest.fixture
def private_daemon(app_dir: Path) -> Iterator[Callable[..., Beam]]:
    """Start private daemons (for restarts); each is stopped at teardown."""
    started: list[Beam] = []
    data_dirs: list[Path] = []

    def start(data_dir: Path | None = None, token: str | None = None) -> Beam:
        directory = data_dir or make_data_dir()
        if directory not in data_dirs:
            data_dirs.append(directory)
        daemon = start_beam_daemon(directory)
        helper = Beam(daemon, token or create_token(directory), app_dir)
        started.append(helper)
        return helper

    yield start
    failures = []
    for helper in started:
        if helper.daemon.process.poll() is None:
            status = helper.daemon.stop()
            if status != 0:
                failures.append(f"daemon exited with {status}:\n{helper.daemon.log()}")
    for directory in data_dirs:
        shutil.rmtree(directory, ignore_errors=True)
        log_path = directory.parent / f"{directory.name}.log"
        if log_path.exists():
            os.unlink(log_path)
    assert not failures, "\n".join(failures)
