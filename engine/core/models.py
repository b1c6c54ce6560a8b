"""Value types shared by the Engine, the gRPC servicers and the SDK."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.core.tenancy import DEFAULT_WORKSPACE

# A sandbox that sees no exec, stdin or file operation for this many seconds
# is terminated, unless its ttl is 0 or negative.
DEFAULT_TTL_SECONDS = 600.0
DEFAULT_PIDS = 512
# Limits of a sandbox whose caller sets none: untrusted code gets a bounded
# sandbox unless it asks otherwise.
DEFAULT_CPU = 1.0
DEFAULT_MEMORY_MIB = 512
DEFAULT_NOFILE = 1024
# Disk limit of the writable layer in MiB: enough for a package install or a
# checkout, small enough that a few sandboxes cannot fill a host disk.
DEFAULT_DISK_MIB = 4096
# Bytes of stdout (and, separately, of stderr) kept per process. Older bytes are
# dropped first and readers are told how many they missed.
DEFAULT_OUTPUT_BUFFER_BYTES = 8 * 1024 * 1024
# Bytes of output kept for all processes of one sandbox together; past it the
# oldest bytes of ended processes go first.
DEFAULT_SANDBOX_OUTPUT_BYTES = 32 * 1024 * 1024


class SandboxState(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"


class TerminationReason(enum.StrEnum):
    NONE = ""
    USER = "user"
    TTL = "ttl"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    DAEMON_RESTART = "daemon_restart"


class ProcessState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"


class ExitReason(enum.StrEnum):
    """Reason a process ended; NONE while it runs."""

    NONE = ""
    EXITED = "exited"
    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    OOM = "oom"
    KILLED = "killed"


class Stream(enum.StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True)
class VolumeMount:
    """A named volume mounted at ``mount_path``, an absolute path inside the sandbox.

    The volume is created on first use, and its files outlive the sandbox.
    """

    name: str
    mount_path: str
    read_only: bool = False


@dataclass(frozen=True)
class CloudBucketConfig:
    """How to reach an S3-compatible bucket.

    ``access_key`` and ``secret_key`` are names of secrets, not the keys.
    """

    endpoint: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    read_only: bool = False
    force_path_style: bool = False
    key_prefix: str | None = None


@dataclass(frozen=True)
class CloudBucketMount:
    """An S3 bucket mounted through FUSE at ``mount_path`` inside the sandbox."""

    name: str
    mount_path: str
    config: CloudBucketConfig = field(default_factory=CloudBucketConfig)


@dataclass(frozen=True)
class SandboxSpec:
    """Settings a caller requests for a new sandbox.

    ``cpu`` is in cores (fractions allowed) and ``memory_mib`` in MiB. Both
    default to a bounded sandbox, and ``None`` means no limit. ``ttl`` is in
    seconds of inactivity, and 0 or a negative value means it never expires.
    ``disk_mib`` bounds the writable layer in MiB and is always set.
    """

    image: str = "host"
    cpu: float | None = DEFAULT_CPU
    memory_mib: int | None = DEFAULT_MEMORY_MIB
    pids: int = DEFAULT_PIDS
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ttl: float = DEFAULT_TTL_SECONDS
    nofile: int = DEFAULT_NOFILE
    volumes: tuple[VolumeMount, ...] = ()
    # Names of secrets set as environment variables of every process; the
    # values never enter the spec.
    secrets: tuple[str, ...] = ()
    cloud_buckets: tuple[CloudBucketMount, ...] = ()
    # No interface but loopback: no egress at all, DNS included.
    block_network: bool = False
    # IPv4 CIDRs the sandbox may reach; empty means everywhere the engine's
    # uplinks lead. Excludes block_network.
    allow_list: tuple[str, ...] = ()
    disk_mib: int = DEFAULT_DISK_MIB


@dataclass(frozen=True)
class SandboxInfo:
    sandbox_id: str
    spec: SandboxSpec
    state: SandboxState
    reason: TerminationReason
    created_at: float
    terminated_at: float | None
    # Seconds since the epoch of the last exec, stdin or file operation.
    last_activity_at: float
    error: str = ""
    # The tenant that created the sandbox; see engine.core.tenancy.
    workspace: str = DEFAULT_WORKSPACE
    # The sandbox's IPv4 address on the engine's bridge; "" without a network.
    address: str = ""
    # Exposed port inside the sandbox -> URL that reaches it from the host.
    urls: dict[int, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class ProcessInfo:
    """One process started by exec. ``pid`` is the pid inside the sandbox."""

    pid: int
    argv: list[str]
    cwd: str
    state: ProcessState
    exit_code: int | None
    # Signal name such as "SIGKILL" when the process was ended by a signal.
    signal: str
    reason: ExitReason
    started_at: float
    ended_at: float | None


@dataclass(frozen=True)
class OutputChunk:
    """Bytes of one stream starting at absolute byte ``offset``.

    ``dropped`` counts bytes before ``offset`` that the reader asked for but the
    bounded buffer no longer has. ``eof`` is True on the last chunk of a stream.
    """

    stream: Stream
    offset: int
    data: bytes
    dropped: int = 0
    eof: bool = False


@dataclass(frozen=True)
class SandboxStats:
    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    pids: int
    # Bytes charged to the writable layer's disk limit, up to 5 s old.
    disk_bytes: int = 0
