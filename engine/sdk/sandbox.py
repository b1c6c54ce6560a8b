"""The synchronous SDK: sandboxes and the processes in them.

    from engine import Sandbox

    with Sandbox(image="host", cpu=1.0, memory="512Mi").create() as sb:
        p = sb.process.exec("python3", "-c", "print(6*7)")
        p.wait()           # 0
        p.stdout.read()    # "42\\n"

Every method raises the classes of ``engine.errors``: NotFound for an unknown
sandbox or pid, InvalidArgument for a bad argument, Unavailable when no daemon
accepts connections at the address.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal as signal_module
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from engine import errors
from engine.core.models import (
    CloudBucketConfig,
    ExitReason,
    ProcessInfo,
    ProcessState,
    SandboxInfo,
    SandboxState,
    SandboxStats,
    Stream,
)
from engine.core.models import CloudBucketMount as CloudBucket
from engine.sdk.client import Client
from engine.sdk.files import SandboxFileSystem
from engine.sdk.volumes import Volume, check_volumes
from engine.server import convert
from engine.v1 import sandbox_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = ["CloudBucket", "CloudBucketConfig", "Sandbox", "SandboxInstance"]

# WriteStdin sends at most this many bytes per message, below gRPC's default
# 4 MiB message limit.
STDIN_CHUNK_BYTES = 1024 * 1024
_MEMORY_UNITS = {"": 1, "ki": 1 / 1024, "mi": 1, "gi": 1024, "ti": 1024 * 1024}
_MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i)?B?\s*$", re.IGNORECASE)


def parse_memory(value: int | str | None) -> int | None:
    """Return MiB from an int of MiB or a size string such as "512Mi" or "1Gi"."""
    return parse_mib(value, "memory")


def parse_mib(value: int | str | None, field: str) -> int | None:
    """Return MiB from an int of MiB or a size string; ``field`` names it in errors."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise errors.InvalidArgument(
            f"invalid {field} {value!r}: expected MiB or a size"
        )
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise errors.InvalidArgument(
            f"invalid {field} {value!r}: expected an int of MiB or a string like"
            " '512Mi'"
        )
    match = _MEMORY_PATTERN.match(value)
    if match is None:
        raise errors.InvalidArgument(
            f"invalid {field} {value!r}: expected MiB as a number or a size with a"
            " unit Ki, Mi, Gi or Ti, such as '512Mi' or '1Gi'"
        )
    number = float(match.group(1))
    mib = number * _MEMORY_UNITS[(match.group(2) or "").lower()]
    if mib != int(mib):
        raise errors.InvalidArgument(
            f"invalid {field} {value!r}: {mib} MiB is not a whole number of MiB"
        )
    return int(mib)


def _argv(args: tuple[Any, ...]) -> list[str]:
    """Return the argv of ``exec(*args)``: the arguments, or the one list given."""
    if len(args) == 1 and isinstance(args[0], list | tuple):
        return list(args[0])
    return list(args)


def run_request(
    sandbox_id: str,
    args: tuple[Any, ...],
    *,
    cwd: str | None,
    env: dict[str, str] | None,
    timeout: float | None,
    secrets: list[str] | None,
) -> pb.RunRequest:
    """Return the Run request of ``run(*args, ...)``."""
    request = pb.RunRequest(
        sandbox_id=sandbox_id,
        argv=_argv(args),
        cwd=cwd or "",
        env=env or {},
        secrets=_secret_names(secrets),
    )
    if timeout is not None:
        request.timeout_seconds = timeout
    return request


def _secret_names(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Return secret names as a list, rejecting a bare string early."""
    if names is None:
        return []
    if isinstance(names, str):
        raise errors.InvalidArgument(
            f"invalid secrets {names!r}: expected a list of secret names, such as"
            f" [{names!r}]"
        )
    return list(names)


def check_allow_list(allow_list: list[str] | None) -> list[str]:
    """Return the allow-list as a list of strings; the daemon checks each CIDR."""
    if allow_list is None:
        return []
    if isinstance(allow_list, str):
        raise errors.InvalidArgument(
            f"invalid allow_list {allow_list!r}: expected a list of CIDRs such as"
            " ['198.51.100.0/24']"
        )
    entries = list(allow_list)
    for entry in entries:
        if not isinstance(entry, str):
            raise errors.InvalidArgument(
                f"invalid allow_list entry {entry!r}: expected a CIDR string"
            )
    return entries


def network_request(
    sandbox_id: str, block_network: bool, allow_list: list[str] | None
) -> pb.UpdateNetworkPermissionsRequest:
    return pb.UpdateNetworkPermissionsRequest(
        sandbox_id=sandbox_id,
        block_network=block_network,
        allow_list=check_allow_list(allow_list),
    )


@dataclass(frozen=True)
class ProcessStatus:
    """State of a process. ``exit_code`` is None while it runs."""

    state: ProcessState
    exit_code: int | None
    signal: str
    reason: ExitReason

    @classmethod
    def from_info(cls, info: ProcessInfo) -> ProcessStatus:
        return cls(info.state, info.exit_code, info.signal, info.reason)


@dataclass(frozen=True)
class SandboxProcessResponse:
    """Result of ``run`` and ``run_code``: the exit code and the whole output.

    The output is decoded as UTF-8, with invalid bytes replaced.
    """

    pid: int
    exit_code: int
    stdout: str
    stderr: str
    # Bytes of each stream that the daemon's bounded output buffer dropped
    # before they were read: the output above misses them.
    stdout_dropped: int = 0
    stderr_dropped: int = 0


class _ProcessRef(Protocol):
    sandbox_id: str
    pid: int


class OutputCursor:
    """A reader's position in one output stream of a process.

    The state and bookkeeping that the synchronous and asyncio readers share.
    """

    def __init__(self, process: _ProcessRef, stream: Stream) -> None:
        self._process = process
        self._stream = stream
        self._offset = 0
        self._pending = b""
        self._eof = False
        # Bytes this reader missed because the daemon's bounded buffer dropped them.
        self.dropped = 0

    @property
    def offset(self) -> int:
        """Offset of the next byte this reader receives from the daemon."""
        return self._offset

    def _note_dropped(self, count: int) -> None:
        self.dropped += count
        logger.warning(
            "%s of pid %d in sandbox %s: %d bytes were dropped from the"
            " daemon's output buffer before this reader got them",
            self._stream.value,
            self._process.pid,
            self._process.sandbox_id,
            count,
        )

    def resume_after(self, chunk: pb.OutputChunk) -> None:
        """Continue this reader after ``chunk``, which the caller already has."""
        if chunk.dropped:
            self._note_dropped(chunk.dropped)
        self._offset = chunk.offset + len(chunk.data)
        self._eof = chunk.eof


class SandboxProcessStream(OutputCursor):
    """One output stream of a process, read with ReadOutput from this reader's offset.

    Each reader keeps its own offset, so every reader of the same process receives
    every byte that the daemon still buffers, however late it starts. Iterating
    yields lines with their trailing newline, as file objects do.
    """

    _process: SandboxProcess

    def iter_bytes(self, follow: bool = True) -> Iterator[bytes]:
        """Yield bytes as they arrive, or without ``follow`` only those buffered now."""
        if self._eof:
            return
        request = pb.ReadOutputRequest(
            sandbox_id=self._process.sandbox_id,
            pid=self._process.pid,
            stream=convert.STREAMS[self._stream],
            offset=self._offset,
            follow=follow,
        )
        with contextlib.closing(
            self._process._client.stream("ReadOutput", request)
        ) as chunks:
            for chunk in chunks:
                if chunk.dropped:
                    self._note_dropped(chunk.dropped)
                self._offset = chunk.offset + len(chunk.data)
                if chunk.eof:
                    self._eof = True
                if chunk.data:
                    yield chunk.data

    def read_bytes(self) -> bytes:
        """Return every byte from this reader's offset up to the end of the stream.

        Blocks until the process closes the stream. After the end, returns b"".
        """
        data = self._pending + b"".join(self.iter_bytes(follow=True))
        self._pending = b""
        return data

    def read(self) -> str:
        """Return ``read_bytes()`` decoded as UTF-8, with invalid bytes replaced."""
        return self.read_bytes().decode("utf-8", errors="replace")

    def read_available(self) -> bytes:
        """Return the bytes buffered now, without waiting for more."""
        data = self._pending + b"".join(self.iter_bytes(follow=False))
        self._pending = b""
        return data

    def iter_lines_bytes(self) -> Iterator[bytes]:
        """Yield lines as bytes, as they arrive, each with its trailing newline."""
        with contextlib.closing(self.iter_bytes(follow=True)) as chunks:
            for data in chunks:
                self._pending += data
                while (end := self._pending.find(b"\n")) >= 0:
                    line = self._pending[: end + 1]
                    self._pending = self._pending[end + 1 :]
                    yield line
        if self._pending:
            line, self._pending = self._pending, b""
            yield line

    def __iter__(self) -> Iterator[str]:
        for line in self.iter_lines_bytes():
            yield line.decode("utf-8", errors="replace")


class SandboxProcessStdin:
    """The stdin pipe of a process started with ``stdin=True``."""

    def __init__(self, process: SandboxProcess) -> None:
        self._process = process

    def write(self, data: str | bytes) -> None:
        """Write ``data`` (str is encoded as UTF-8) and return once the pipe has it."""
        if isinstance(data, str):
            data = data.encode()
        view = memoryview(data)
        for start in range(0, max(len(view), 1), STDIN_CHUNK_BYTES):
            self._process._client.call(
                "WriteStdin",
                pb.WriteStdinRequest(
                    sandbox_id=self._process.sandbox_id,
                    pid=self._process.pid,
                    data=bytes(view[start : start + STDIN_CHUNK_BYTES]),
                ),
            )

    def close(self) -> None:
        """Close the pipe, so that the process reads end of file."""
        self._process._client.call(
            "CloseStdin",
            pb.CloseStdinRequest(
                sandbox_id=self._process.sandbox_id, pid=self._process.pid
            ),
        )


class SandboxProcess:
    """A process started by ``sb.process.exec``, with ``pid`` inside the sandbox."""

    def __init__(self, client: Client, sandbox_id: str, pid: int) -> None:
        self._client = client
        self.sandbox_id = sandbox_id
        self.pid = pid
        self.stdout = SandboxProcessStream(self, Stream.STDOUT)
        self.stderr = SandboxProcessStream(self, Stream.STDERR)
        self.stdin = SandboxProcessStdin(self)

    def __repr__(self) -> str:
        return f"SandboxProcess(sandbox_id={self.sandbox_id!r}, pid={self.pid})"

    def info(self, timeout: float | None = 0) -> ProcessInfo:
        """Return the process's info, waiting up to ``timeout`` seconds for its exit.

        ``timeout=None`` waits until it exits.
        """
        request = pb.WaitRequest(sandbox_id=self.sandbox_id, pid=self.pid)
        if timeout is not None:
            request.timeout_seconds = timeout
        reply = self._client.call("Wait", request)
        return convert.process_from_proto(reply.process)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and return its exit code.

        The exit code is 128 plus the signal number when a signal ended it.
        Raises DeadlineExceeded when it still runs after ``timeout`` seconds.
        """
        info = self.info(timeout=timeout)
        if info.exit_code is None:
            raise errors.DeadlineExceeded(
                f"pid {self.pid} in sandbox {self.sandbox_id} still runs after"
                f" {timeout} s"
            )
        return info.exit_code

    def status(self) -> ProcessStatus:
        return ProcessStatus.from_info(self.info(timeout=0))

    @property
    def exit_code(self) -> int | None:
        """Exit code, or None while the process runs."""
        return self.info(timeout=0).exit_code

    def kill(self, signal: int = signal_module.SIGKILL) -> None:
        """Send ``signal`` (SIGKILL by default) to the process group of the process."""
        self._client.call(
            "Kill",
            pb.KillRequest(
                sandbox_id=self.sandbox_id, pid=self.pid, signal=int(signal)
            ),
        )


class SandboxProcessManager:
    """``sb.process``: starts and lists the processes of one sandbox."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    def exec(
        self,
        *args: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        secrets: list[str] | None = None,
    ) -> SandboxProcess:
        """Start ``args`` in the sandbox and return once it runs.

        ``timeout`` is in seconds: after it, the engine kills the process group
        and reports ExitReason.TIMEOUT with exit code 137. Without ``stdin``,
        the process reads /dev/null. ``secrets`` names secrets that become
        environment variables of this process only.
        """
        request = pb.ExecRequest(
            sandbox_id=self._sandbox_id,
            argv=_argv(args),
            cwd=cwd or "",
            env=env or {},
            stdin=stdin,
            secrets=_secret_names(secrets),
        )
        if timeout is not None:
            request.timeout_seconds = timeout
        # Only the started event is needed here. Cancelling the stream leaves
        # the process running, and its output stays readable through ReadOutput.
        with contextlib.closing(self._client.stream("Exec", request)) as events:
            first = next(events, None)
        if first is None or first.WhichOneof("event") != "started":
            raise errors.InternalError(
                f"the daemon's Exec stream in sandbox {self._sandbox_id} did not start"
                " with a started event"
            )
        return SandboxProcess(self._client, self._sandbox_id, first.started.pid)

    def run_code(
        self,
        code: str,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
    ) -> SandboxProcessResponse:
        """Run ``code`` with ``python3 -c``, wait for it and return its output."""
        return self.run("python3", "-c", code, timeout=timeout, env=env)

    def run(
        self,
        *args: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        secrets: list[str] | None = None,
    ) -> SandboxProcessResponse:
        """Run ``args`` to its exit and return its exit code and whole output.

        One Run RPC starts the process, waits and returns the first MiB of each
        stream; only longer output takes more calls. The options mean what
        they mean in ``exec``, and stdin is /dev/null.
        """
        request = run_request(
            self._sandbox_id, args, cwd=cwd, env=env, timeout=timeout, secrets=secrets
        )
        reply = self._client.call("Run", request)
        process = SandboxProcess(self._client, self._sandbox_id, reply.pid)
        process.stdout.resume_after(reply.stdout)
        process.stderr.resume_after(reply.stderr)
        # The process has exited: what is not buffered now never arrives in
        # the response's time, so read without following.
        stdout = reply.stdout.data + process.stdout.read_available()
        stderr = reply.stderr.data + process.stderr.read_available()
        return SandboxProcessResponse(
            pid=reply.pid,
            exit_code=reply.exit.exit_code,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            stdout_dropped=process.stdout.dropped,
            stderr_dropped=process.stderr.dropped,
        )

    def get_process(self, pid: int) -> SandboxProcess:
        """Return a handle on an existing process, with its own output readers."""
        self._client.call(
            "Wait",
            pb.WaitRequest(sandbox_id=self._sandbox_id, pid=pid, timeout_seconds=0),
        )
        return SandboxProcess(self._client, self._sandbox_id, pid)

    def list_processes(self) -> dict[int, ProcessInfo]:
        """Return every process of the sandbox, running and exited, by pid."""
        reply = self._client.call(
            "ListProcesses", pb.ListProcessesRequest(sandbox_id=self._sandbox_id)
        )
        return {p.pid: convert.process_from_proto(p) for p in reply.processes}


class SandboxInstance:
    """A created or connected sandbox. As a context manager, it terminates on exit."""

    def __init__(self, client: Client, info: SandboxInfo) -> None:
        self._client = client
        self.sandbox_id = info.sandbox_id
        self.process = SandboxProcessManager(client, info.sandbox_id)
        # Files and directories: sb.fs.upload_file(...), sb.fs.list_files(...).
        self.fs = SandboxFileSystem(client, info.sandbox_id)

    def __repr__(self) -> str:
        return f"SandboxInstance(sandbox_id={self.sandbox_id!r})"

    @property
    def address(self) -> str:
        return self._client.address

    def status(self) -> SandboxInfo:
        reply = self._client.call("Get", pb.GetRequest(sandbox_id=self.sandbox_id))
        return convert.sandbox_from_proto(reply.sandbox)

    def update_ttl(self, ttl: float) -> SandboxInfo:
        """Set the idle timeout in seconds; 0 or a negative value means no expiry."""
        reply = self._client.call(
            "UpdateTTL",
            pb.UpdateTTLRequest(sandbox_id=self.sandbox_id, ttl_seconds=ttl),
        )
        return convert.sandbox_from_proto(reply.sandbox)

    def stats(self) -> SandboxStats:
        reply = self._client.call("Stats", pb.StatsRequest(sandbox_id=self.sandbox_id))
        return convert.stats_from_proto(reply)

    def update_network_permissions(
        self, *, block_network: bool = False, allow_list: list[str] | None = None
    ) -> SandboxInfo:
        """Replace the egress policy; open connections it forbids are cut."""
        reply = self._client.call(
            "UpdateNetworkPermissions",
            network_request(self.sandbox_id, block_network, allow_list),
        )
        return convert.sandbox_from_proto(reply.sandbox)

    def expose_port(self, port: int) -> str:
        """Forward a host TCP port to ``port`` inside the sandbox; return its URL."""
        reply = self._client.call(
            "ExposePort", pb.ExposePortRequest(sandbox_id=self.sandbox_id, port=port)
        )
        return reply.url

    def list_urls(self) -> dict[int, str]:
        """Return exposed port inside the sandbox -> URL."""
        reply = self._client.call(
            "ListUrls", pb.ListUrlsRequest(sandbox_id=self.sandbox_id)
        )
        return dict(reply.urls)

    def terminate(self) -> SandboxInfo:
        """Kill every process and remove the sandbox; a second call changes nothing."""
        reply = self._client.call(
            "Terminate", pb.TerminateRequest(sandbox_id=self.sandbox_id)
        )
        return convert.sandbox_from_proto(reply.sandbox)

    def close(self) -> None:
        """Close the connection to the daemon, leaving the sandbox running."""
        self._client.close()

    def __enter__(self) -> SandboxInstance:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.terminate()
        finally:
            self.close()


class Sandbox:
    """Settings of a sandbox to create.

    ``cpu`` is in cores, ``memory`` and ``disk`` in MiB (an int) or a size
    string such as "512Mi" or "1Gi", ``ttl`` in seconds of inactivity (0 or
    negative for no expiry). ``disk`` bounds the files the sandbox writes
    outside /tmp and its volumes. ``None`` means the daemon's default: 1 core,
    512 MiB of memory, 4096 MiB of disk, 512 pids and a 600 s TTL.
    ``address`` is the daemon's address ("unix:/path" or "host:port");
    without it, ENGINE_ADDRESS or the default socket is used.
    ``volumes`` lists the ``Volume`` objects to mount, each created on first use.
    ``secrets`` names secrets (``engine.sdk.secrets.SecretClient``) that become
    environment variables of every process. ``cloud_buckets`` lists the
    ``CloudBucket`` objects (S3 buckets) to mount through FUSE.
    ``block_network`` leaves the sandbox loopback only, DNS included;
    ``allow_list`` limits egress to those IPv4 CIDRs. Passing both is
    InvalidArgument.
    """

    def __init__(
        self,
        image: str = "host",
        *,
        cpu: float | None = None,
        memory: int | str | None = None,
        pids: int | None = None,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        name: str = "",
        labels: dict[str, str] | None = None,
        ttl: float | None = None,
        address: str | None = None,
        volumes: list[Volume] | None = None,
        secrets: list[str] | None = None,
        cloud_buckets: list[CloudBucket] | None = None,
        block_network: bool = False,
        allow_list: list[str] | None = None,
        disk: int | str | None = None,
    ) -> None:
        self.image = image
        self.cpu = cpu
        self.memory_mib = parse_memory(memory)
        self.disk_mib = parse_mib(disk, "disk")
        self.pids = pids
        self.env = dict(env or {})
        self.workdir = workdir
        self.name = name
        self.labels = dict(labels or {})
        self.ttl = ttl
        self.volumes = check_volumes(volumes or [])
        self.secrets = _secret_names(secrets)
        self.cloud_buckets = list(cloud_buckets or [])
        for bucket in self.cloud_buckets:
            if not isinstance(bucket, CloudBucket):
                raise errors.InvalidArgument(
                    f"invalid cloud bucket {bucket!r}: expected a CloudBucket"
                )
        self.address = address
        self.block_network = block_network
        self.allow_list = check_allow_list(allow_list)

    def spec_proto(self) -> pb.SandboxSpec:
        spec = pb.SandboxSpec(
            image=self.image,
            env=self.env,
            workdir=self.workdir or "",
            name=self.name,
            labels=self.labels,
            volumes=[volume.to_proto() for volume in self.volumes],
            secrets=self.secrets,
            cloud_buckets=[
                convert.bucket_mount_to_proto(b) for b in self.cloud_buckets
            ],
            block_network=self.block_network,
            allow_list=self.allow_list,
        )
        optional: dict[str, Any] = {
            "cpu": self.cpu,
            "memory_mib": self.memory_mib,
            "pids": self.pids,
            "ttl_seconds": self.ttl,
            "disk_mib": self.disk_mib,
        }
        for field, value in optional.items():
            if value is not None:
                setattr(spec, field, value)
        return spec

    def create(self) -> SandboxInstance:
        """Create the sandbox and return it once it runs."""
        client = Client(self.address)
        try:
            reply = client.call("Create", pb.CreateRequest(spec=self.spec_proto()))
        except BaseException:
            client.close()
            raise
        return SandboxInstance(client, convert.sandbox_from_proto(reply.sandbox))

    @staticmethod
    def connect(sandbox_id: str, *, address: str | None = None) -> SandboxInstance:
        """Attach to an existing sandbox without changing its TTL or lifetime.

        Raises NotFound when the daemon has no sandbox ``sandbox_id``.
        """
        client = Client(address)
        try:
            reply = client.call("Get", pb.GetRequest(sandbox_id=sandbox_id))
        except BaseException:
            client.close()
            raise
        return SandboxInstance(client, convert.sandbox_from_proto(reply.sandbox))

    @staticmethod
    def list(
        *,
        address: str | None = None,
        state: SandboxState | None = None,
        labels: dict[str, str] | None = None,
        name: str = "",
    ) -> list[SandboxInfo]:
        """Return the daemon's sandboxes that match every filter given."""
        request = pb.ListRequest(labels=labels or {}, name=name)
        if state is not None:
            request.state = convert.SANDBOX_STATES[state]
        with Client(address) as client:
            reply = client.call("List", request)
        return [convert.sandbox_from_proto(s) for s in reply.sandboxes]
