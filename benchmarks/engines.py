"""Runs of this engine: through gRPC to a daemon subprocess, and embedded.

The daemon is a real ``engine serve`` subprocess on a unix socket. Its client
uses the generated stubs over one kept-open channel. A cold start is one
Create RPC plus one Exec stream read to its exit event: the fewest RPCs that
create a sandbox and report a process in it as finished. The embedded runs
call the ``Engine`` object directly on the harness's event loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.suite import Sample
from engine.config import Config
from engine.core.engine import Engine
from engine.core.models import SandboxSpec, Stream
from engine.sdk.client import Client, check_health, normalize_address
from engine.v1 import sandbox_pb2 as pb

logger = logging.getLogger(__name__)

TRUE_ARGV = ["true"]
# Limits of every benchmarked sandbox, so that the cgroup limits are set on
# the creation path. The SDK's example uses the same cpu and memory.
CPU_CORES = 1.0
MEMORY_MIB = 512
PIDS = 512
CGROUP_LIMITS = f"cpu {CPU_CORES:g} core, memory {MEMORY_MIB} MiB, pids {PIDS}"
# Warm sandboxes per shape of the benchmarked daemon: more than the 20
# creates of one throughput sample with 4 clients of 5 pairs each, so that a
# sample after a refill pause is served from the warm pool.
WARM_POOL_SIZE = 24
# Seconds a daemon gets to report SERVING, and to exit after SIGTERM.
DAEMON_START_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 60.0
# Seconds any single RPC or Engine call may take before it counts as hung.
CALL_TIMEOUT = 60.0
# The daemon logs warnings and errors only, so that it does the same logging
# work as the embedded engine, whose INFO records go nowhere.
DAEMON_LOG_LEVEL = "WARNING"


def engine_command() -> list[str]:
    """Return the argv prefix that runs the ``engine`` CLI of this interpreter."""
    script = Path(sys.executable).parent / "engine"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "engine.cli.main"]


# Engine sandboxes here are loopback only by default, as the bubblewrap and
# runc rows are, so those rows measure the same isolation. The bridged row
# and benchmarks/network.py measure what a network adds.
def spec_proto(block_network: bool = True, ttl: float | None = None) -> pb.SandboxSpec:
    """Return the spec of every benchmarked sandbox: host image, fixed limits.

    ``ttl`` is the idle timeout in seconds, where 0 means none; None keeps
    the daemon's default.
    """
    spec = pb.SandboxSpec(
        image="host",
        cpu=CPU_CORES,
        memory_mib=MEMORY_MIB,
        pids=PIDS,
        block_network=block_network,
    )
    if ttl is not None:
        spec.ttl_seconds = ttl
    return spec


class Daemon:
    """An ``engine serve`` subprocess with a private data dir and socket."""

    def __init__(self, directory: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        # More `engine serve` options, such as ("--warm-pool", "24").
        self.extra_args = extra_args
        self.data_dir = directory / "data"
        self.socket_path = directory / "engine.sock"
        self.log_path = directory / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        # True once the daemon reported SERVING.
        self.serving = False

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def layers_dir(self) -> Path:
        """Return the layer file system's root, reached through the zygote.

        The engine mounts it in its zygote's mount namespace only.
        """
        assert self.process is not None
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.Error):
                if "engine.runtime.zygote" in " ".join(child.cmdline()):
                    inside = str(self.data_dir / "sandboxes").lstrip("/")
                    return Path(f"/proc/{child.pid}/root") / inside
        raise RuntimeError(f"engine daemon {self.process.pid} has no zygote")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start the daemon and return once its health service reports SERVING."""
        self.directory.mkdir(mode=0o755, exist_ok=True)
        self.data_dir.mkdir(mode=0o755, exist_ok=True)
        argv = [
            *engine_command(),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--socket",
            str(self.socket_path),
            "--log-level",
            DAEMON_LOG_LEVEL,
            *self.extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        logger.info("started engine daemon, pid %d", self.process.pid)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                logger.error("engine serve failed to start; log:\n%s", self.log_tail())
                last_line = self.log_tail(1) or "(empty log)"
                raise RuntimeError(
                    f"engine serve exited with status {self.process.returncode}"
                    f" during start: {last_line}"
                )
            if self.socket_path.exists() and check_health(self.address, timeout=1.0):
                self.serving = True
                return
            time.sleep(0.05)
        logger.error("engine serve did not start; log:\n%s", self.log_tail())
        raise RuntimeError(
            f"engine serve did not report SERVING within {DAEMON_START_TIMEOUT} s;"
            f" last log line: {self.log_tail(1) or '(empty log)'}"
        )

    def stop(self) -> int | None:
        """Send SIGTERM, wait for the exit and return the exit status.

        A daemon still running after DAEMON_STOP_TIMEOUT is killed with SIGKILL.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.error(
                "engine daemon %d ignored SIGTERM for %s s; killing it",
                self.process.pid,
                DAEMON_STOP_TIMEOUT,
            )
            self.process.kill()
            status = self.process.wait()
        logger.info("engine daemon %d exited with %d", self.process.pid, status)
        return status


def create(client: Client, spec: pb.SandboxSpec | None = None) -> str:
    """Create a sandbox through one Create RPC and return its id."""
    request = pb.CreateRequest(spec=spec if spec is not None else spec_proto())
    reply = client.call("Create", request, timeout=CALL_TIMEOUT)
    return reply.sandbox.sandbox_id


def terminate(client: Client, sandbox_id: str) -> None:
    client.call(
        "Terminate", pb.TerminateRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT
    )


def run_to_exit(client: Client, sandbox_id: str, argv: list[str]) -> bytes:
    """Run ``argv`` through one Exec stream, read it to its end, and return stdout.

    The stream goes through ``Client.stream``, so on the direct socket unless
    the Client was made with ``direct=False``. Raises RuntimeError when the
    process exits with a status other than 0.
    """
    request = pb.ExecRequest(sandbox_id=sandbox_id, argv=argv)
    stdout = bytearray()
    exit_event = None
    for event in client.stream("Exec", request):
        kind = event.WhichOneof("event")
        if kind == "output" and event.output.stream == pb.STREAM_STDOUT:
            stdout += event.output.data
        elif kind == "exit":
            exit_event = event.exit
    if exit_event is None:
        raise RuntimeError(
            f"the Exec stream in sandbox {sandbox_id} ended without exit"
        )
    if exit_event.exit_code != 0:
        raise RuntimeError(
            f"{argv[0]} in sandbox {sandbox_id} exited with"
            f" {exit_event.exit_code} {exit_event.signal}".rstrip()
        )
    return bytes(stdout)


class GrpcRuns:
    """Timed operations against a daemon, each on kept-open connections.

    ``client`` is the SDK's default Client, which makes SandboxService calls
    on the daemon's direct socket. ``grpc_client`` keeps every call on gRPC.
    The exec methods take ``direct`` to choose between the two.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.client = Client(address)
        self.grpc_client = Client(address, direct=False)
        self._health_channel = grpc.insecure_channel(normalize_address(address))
        self.health = health_pb2_grpc.HealthStub(self._health_channel)
        self.exec_sandbox: str | None = None
        # Clients of the throughput runs, one each, made on first use.
        self._clients: list[Client] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_size = 0

    def _client(self, direct: bool) -> Client:
        return self.client if direct else self.grpc_client

    def cold_start(self, block_network: bool = True) -> float:
        """Time Create plus an Exec of `true` to its exit over gRPC, then terminate.

        With ``block_network`` False the sandbox gets the engine's bridged
        network: a veth pair, an address and an nftables chain.
        """
        client = self.grpc_client
        start = time.perf_counter()
        sandbox_id = create(client, spec_proto(block_network))
        try:
            run_to_exit(client, sandbox_id, TRUE_ARGV)
            elapsed = time.perf_counter() - start
        finally:
            terminate(client, sandbox_id)
        return elapsed

    def start_exec_sandbox(self) -> None:
        self.exec_sandbox = create(self.client)

    def exec_round_trip(self, direct: bool = True) -> float:
        """Time one Exec stream of `true` in the running sandbox, to its exit event."""
        assert self.exec_sandbox is not None
        client = self._client(direct)
        start = time.perf_counter()
        run_to_exit(client, self.exec_sandbox, TRUE_ARGV)
        return time.perf_counter() - start

    def exec_burst(self, count: int, direct: bool = True) -> Sample:
        """Time ``count`` exec round trips in a row; the sample is their mean."""
        values = [self.exec_round_trip(direct) for _ in range(count)]
        return Sample(sum(values) / count, {"each_seconds": values})

    def run_round_trip(self, direct: bool = True) -> float:
        """Time one Run call of `true` in the running sandbox, to its exit."""
        assert self.exec_sandbox is not None
        client = self._client(direct)
        request = pb.RunRequest(sandbox_id=self.exec_sandbox, argv=TRUE_ARGV)
        start = time.perf_counter()
        reply = client.call("Run", request, timeout=CALL_TIMEOUT)
        elapsed = time.perf_counter() - start
        if reply.exit.exit_code != 0:
            raise RuntimeError(
                f"true in sandbox {self.exec_sandbox} exited with"
                f" {reply.exit.exit_code}"
            )
        return elapsed

    def health_round_trip(self) -> float:
        """Time one Health Check RPC, which does no sandbox work."""
        request = health_pb2.HealthCheckRequest(service="")
        start = time.perf_counter()
        reply = self.health.Check(request, timeout=CALL_TIMEOUT)
        elapsed = time.perf_counter() - start
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"daemon at {self.address} is not serving: {reply}")
        return elapsed

    def run_burst(self, count: int, direct: bool = True) -> Sample:
        """Time ``count`` Run round trips in a row; the sample is their mean."""
        values = [self.run_round_trip(direct) for _ in range(count)]
        return Sample(sum(values) / count, {"each_seconds": values})

    def probe(self, argv: list[str], block_network: bool = True) -> str:
        """Run ``argv`` in a new sandbox and return its stdout."""
        sandbox_id = create(self.client, spec_proto(block_network))
        try:
            return run_to_exit(self.client, sandbox_id, argv).decode(errors="replace")
        finally:
            terminate(self.client, sandbox_id)

    def throughput(self, clients: int, cycles: int, refill: float = 0.0) -> Sample:
        """Run ``cycles`` Create+Terminate pairs on each of ``clients`` Clients.

        The Clients are the SDK's default, on the direct socket. Every client
        starts at the same moment, with a connection of its own, after an
        untimed sleep of ``refill`` seconds that lets the daemon's warm pool
        fill up again.

        Returns sandboxes per second over the wall time from the common start
        to the last Terminate reply, with each pair's seconds as details.
        """
        time.sleep(refill)
        while len(self._clients) < clients:
            self._clients.append(Client(self.address))
        if self._executor is None or self._executor_size < clients:
            if self._executor is not None:
                self._executor.shutdown()
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=clients, thread_name_prefix="bench-client"
            )
            self._executor_size = clients
        barrier = threading.Barrier(clients + 1)

        def client_loop(client: Client) -> list[float]:
            barrier.wait(CALL_TIMEOUT)
            durations = []
            for _ in range(cycles):
                begin = time.perf_counter()
                terminate(client, create(client))
                durations.append(time.perf_counter() - begin)
            return durations

        futures = [
            self._executor.submit(client_loop, client)
            for client in self._clients[:clients]
        ]
        barrier.wait(CALL_TIMEOUT)
        start = time.perf_counter()
        durations = [d for future in futures for d in future.result()]
        elapsed = time.perf_counter() - start
        return Sample(clients * cycles / elapsed, {"cycle_seconds": durations})

    def close(self) -> None:
        """Terminate the exec sandbox and close every channel."""
        try:
            if self.exec_sandbox is not None:
                terminate(self.client, self.exec_sandbox)
                self.exec_sandbox = None
        finally:
            if self._executor is not None:
                self._executor.shutdown()
            for client in [self.client, *self._clients]:
                client.close()
            self._health_channel.close()


def _spec() -> SandboxSpec:
    return SandboxSpec(
        image="host",
        cpu=CPU_CORES,
        memory_mib=MEMORY_MIB,
        pids=PIDS,
        block_network=True,
    )


class EmbeddedRuns:
    """Timed operations on an Engine that runs on the caller's event loop."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o755, exist_ok=True)
        self.engine = Engine(Config.from_data_dir(directory / "data"))
        self.exec_sandbox: str | None = None

    async def start(self) -> None:
        self.engine.config.data_dir.mkdir(mode=0o755, exist_ok=True)
        await self.engine.start()

    async def _run(self, sandbox_id: str, argv: list[str]) -> int:
        info = await self.engine.exec(sandbox_id, argv)
        done = await self.engine.wait(sandbox_id, info.pid, timeout=CALL_TIMEOUT)
        if done.exit_code != 0:
            raise RuntimeError(
                f"{argv[0]} in sandbox {sandbox_id} exited with {done.exit_code}"
                f" {done.signal}".rstrip()
            )
        return info.pid

    async def cold_start(self) -> float:
        """Time create_sandbox plus exec and wait of `true`, then terminate untimed."""
        start = time.perf_counter()
        info = await self.engine.create_sandbox(_spec())
        try:
            await self._run(info.sandbox_id, TRUE_ARGV)
            elapsed = time.perf_counter() - start
        finally:
            await self.engine.terminate_sandbox(info.sandbox_id)
        return elapsed

    async def start_exec_sandbox(self) -> None:
        self.exec_sandbox = (await self.engine.create_sandbox(_spec())).sandbox_id

    async def exec_round_trip(self) -> float:
        """Time exec plus wait of `true` in the running sandbox."""
        assert self.exec_sandbox is not None
        start = time.perf_counter()
        await self._run(self.exec_sandbox, TRUE_ARGV)
        return time.perf_counter() - start

    async def probe(self, argv: list[str]) -> str:
        """Run ``argv`` in a new sandbox and return its stdout."""
        info = await self.engine.create_sandbox(_spec())
        try:
            pid = await self._run(info.sandbox_id, argv)
            output = bytearray()
            chunks = self.engine.read_output(info.sandbox_id, pid, Stream.STDOUT)
            async for chunk in chunks:
                output += chunk.data
                if chunk.eof:
                    break
            return output.decode(errors="replace")
        finally:
            await self.engine.terminate_sandbox(info.sandbox_id)

    async def close(self) -> None:
        """Terminate every sandbox and stop the engine's zygote."""
        await self.engine.close()


def daemon_directory(work_dir: Path) -> Path:
    return work_dir / "grpc"


def embedded_directory(work_dir: Path) -> Path:
    return work_dir / "embedded"


def requires_root_reason() -> str:
    """Return why the engine rows cannot run, or "" when they can."""
    if os.geteuid() != 0:
        return "needs root: the engine creates namespaces, cgroups and mounts"
    return ""
