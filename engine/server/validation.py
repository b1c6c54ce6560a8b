"""Checks of request fields at the gRPC boundary.

Each function raises ``engine.errors.InvalidArgument`` naming the field and its
value, so a bad request never reaches the Engine. Protobuf already rejects
strings that are not valid UTF-8, so these checks cover what protobuf allows
but the kernel does not: NUL bytes, empty names, out-of-range numbers and
strings longer than execve accepts.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from engine.core import secrets
from engine.core.models import DEFAULT_TTL_SECONDS, SandboxSpec, Stream, VolumeMount
from engine.core.validation import MAX_TTL_SECONDS
from engine.errors import InvalidArgument
from engine.server import convert
from engine.server.convert import STREAMS_FROM_PROTO
from engine.v1 import sandbox_pb2 as pb

# Linux MAX_ARG_STRLEN (32 pages of 4 KiB): execve fails with E2BIG for a
# longer argument or "NAME=value" string, counting its trailing NUL.
MAX_ARG_BYTES = 32 * 4096
# Values shown in error messages are cut to this many characters.
MAX_SHOWN_CHARS = 64
# The memory limit in bytes must fit a signed 64-bit cgroup value.
MAX_MEMORY_MIB = (2**63 - 1) >> 20
# Max output bytes per stream in a Run response.
MAX_RUN_OUTPUT_BYTES = 1024 * 1024


def show(value: object) -> str:
    """Return ``repr(value)``, cut to MAX_SHOWN_CHARS characters for long strings."""
    if isinstance(value, str | bytes) and len(value) > MAX_SHOWN_CHARS:
        return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"
    return repr(value)


def check_text(field: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidArgument(f"invalid {field} {show(value)}: contains a NUL byte")


def check_name(field: str, value: str) -> None:
    """Check an id, env name or label key: not empty and no NUL byte."""
    if not value:
        raise InvalidArgument(f"missing {field}: it must not be empty")
    check_text(field, value)


def check_sandbox_id(value: str) -> None:
    check_name("sandbox_id", value)


def check_pid(value: int) -> None:
    if value <= 0:
        raise InvalidArgument(f"invalid pid {value}: expected a positive process id")


def check_env(field: str, env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        check_name(f"{field} name", name)
        if "=" in name:
            raise InvalidArgument(
                f"invalid {field} name {show(name)}: it must not contain '='"
            )
        check_text(f"{field}[{show(name)}]", value)
        size = len(name.encode()) + len(value.encode()) + 2
        if size > MAX_ARG_BYTES:
            raise InvalidArgument(
                f"invalid {field}[{show(name)}]: {size} bytes, but execve accepts"
                f" at most {MAX_ARG_BYTES} bytes per NAME=value string"
            )
    return dict(env)


def _check_positive(field: str, value: float, unit: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(
            f"invalid {field} {value}: expected a positive number of {unit}"
        )


def spec_from_request(message: pb.SandboxSpec) -> SandboxSpec:
    """Convert and check the spec of a Create request, filling in defaults."""
    defaults = SandboxSpec()
    check_text("spec.image", message.image)
    check_text("spec.workdir", message.workdir)
    check_text("spec.name", message.name)
    workdir = message.workdir or defaults.workdir
    if not workdir.startswith("/"):
        raise InvalidArgument(
            f"invalid spec.workdir {show(workdir)}: expected an absolute path"
        )

    cpu = defaults.cpu
    if message.HasField("cpu"):
        _check_positive("spec.cpu", message.cpu, "cores")
        cpu = message.cpu
    memory_mib = defaults.memory_mib
    if message.HasField("memory_mib"):
        _check_positive("spec.memory_mib", message.memory_mib, "MiB")
        if message.memory_mib > MAX_MEMORY_MIB:
            raise InvalidArgument(
                f"invalid spec.memory_mib {message.memory_mib}: the maximum is"
                f" {MAX_MEMORY_MIB} MiB"
            )
        memory_mib = message.memory_mib
    pids = defaults.pids
    if message.HasField("pids"):
        _check_positive("spec.pids", message.pids, "processes")
        pids = message.pids
    nofile = defaults.nofile
    if message.HasField("nofile"):
        _check_positive("spec.nofile", message.nofile, "file descriptors")
        nofile = message.nofile
    disk_mib = defaults.disk_mib
    if message.HasField("disk_mib"):
        _check_positive("spec.disk_mib", message.disk_mib, "MiB")
        disk_mib = message.disk_mib
    ttl = DEFAULT_TTL_SECONDS
    if message.HasField("ttl_seconds"):
        ttl = check_ttl("spec.ttl_seconds", message.ttl_seconds)

    labels = dict(message.labels)
    for key, value in labels.items():
        check_name("spec.labels key", key)
        check_text(f"spec.labels[{show(key)}]", value)
    # The Engine checks volume names and mount paths (check_volumes).
    volumes = []
    for index, mount in enumerate(message.volumes):
        check_name(f"spec.volumes[{index}].name", mount.name)
        check_name(f"spec.volumes[{index}].mount_path", mount.mount_path)
        volumes.append(VolumeMount(mount.name, mount.mount_path, mount.read_only))

    # The Engine checks bucket names, endpoints and mount paths.
    buckets = []
    for index, mount in enumerate(message.cloud_buckets):
        check_name(f"spec.cloud_buckets[{index}].name", mount.name)
        check_name(f"spec.cloud_buckets[{index}].mount_path", mount.mount_path)
        for name in ("endpoint", "region", "access_key", "secret_key", "key_prefix"):
            check_text(
                f"spec.cloud_buckets[{index}].config.{name}",
                getattr(mount.config, name),
            )
        buckets.append(convert.bucket_mount_from_proto(mount))

    return SandboxSpec(
        image=message.image or defaults.image,
        cpu=cpu,
        memory_mib=memory_mib,
        pids=pids,
        env=check_env("spec.env", dict(message.env)),
        workdir=workdir,
        name=message.name,
        labels=labels,
        ttl=ttl,
        nofile=nofile,
        volumes=tuple(volumes),
        secrets=check_secret_names("spec.secrets", message.secrets),
        cloud_buckets=tuple(buckets),
        block_network=message.block_network,
        # The Engine checks the CIDRs and the combination (check_policy).
        allow_list=tuple(message.allow_list),
        disk_mib=disk_mib,
    )


def check_secret_names(field: str, names: Iterable[str]) -> tuple[str, ...]:
    """Check the secret names of a request and drop repeated ones."""
    for index, name in enumerate(names):
        check_text(f"{field}[{index}]", name)
    return secrets.check_names(field, names)


def check_ttl(field: str, value: float) -> float:
    if not -MAX_TTL_SECONDS <= value <= MAX_TTL_SECONDS:
        raise InvalidArgument(
            f"invalid {field} {value}: expected a number of seconds up to"
            f" {MAX_TTL_SECONDS:.0f} (10 years), or 0 for no expiry"
        )
    return value


@dataclass(frozen=True)
class ExecArguments:
    sandbox_id: str
    argv: list[str]
    cwd: str | None
    env: dict[str, str]
    timeout: float | None
    stdin: bool
    secrets: tuple[str, ...] = ()


def exec_from_request(request: pb.ExecRequest) -> ExecArguments:
    return _exec_arguments(request, stdin=request.stdin)


def run_from_request(request: pb.RunRequest) -> tuple[ExecArguments, int]:
    """Return the process to start and the output bytes per stream to return."""
    limit = MAX_RUN_OUTPUT_BYTES
    if request.HasField("max_output_bytes"):
        limit = request.max_output_bytes
        if limit > MAX_RUN_OUTPUT_BYTES:
            raise InvalidArgument(
                f"invalid max_output_bytes {limit}: expected 0 to"
                f" {MAX_RUN_OUTPUT_BYTES}; read the rest with ReadOutput"
            )
    return _exec_arguments(request, stdin=False), limit


def _exec_arguments(
    request: pb.ExecRequest | pb.RunRequest, *, stdin: bool
) -> ExecArguments:
    check_sandbox_id(request.sandbox_id)
    argv = list(request.argv)
    if not argv:
        raise InvalidArgument("missing argv: at least the command name is required")
    if not argv[0]:
        raise InvalidArgument("invalid argv[0] '': the command name must not be empty")
    for index, argument in enumerate(argv):
        check_text(f"argv[{index}]", argument)
        size = len(argument.encode()) + 1
        if size > MAX_ARG_BYTES:
            raise InvalidArgument(
                f"invalid argv[{index}]: {size} bytes, but execve accepts at most"
                f" {MAX_ARG_BYTES} bytes per argument"
            )
    check_text("cwd", request.cwd)
    timeout = None
    if request.HasField("timeout_seconds"):
        _check_positive("timeout_seconds", request.timeout_seconds, "seconds")
        timeout = request.timeout_seconds
    return ExecArguments(
        sandbox_id=request.sandbox_id,
        argv=argv,
        cwd=request.cwd or None,
        env=check_env("env", dict(request.env)),
        timeout=timeout,
        stdin=stdin,
        secrets=check_secret_names("secrets", request.secrets),
    )


def wait_timeout(request: pb.WaitRequest) -> float | None:
    if not request.HasField("timeout_seconds"):
        return None
    value = request.timeout_seconds
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(
            f"invalid timeout_seconds {value}: expected 0 or a positive number of"
            " seconds, or no value to wait until the process exits"
        )
    return value


def signal_number(request: pb.KillRequest) -> int:
    if not request.HasField("signal"):
        return signal.SIGKILL
    number = request.signal
    if not 1 <= number <= signal.SIGRTMAX:
        raise InvalidArgument(
            f"invalid signal {number}: expected a signal number from 1 to"
            f" {int(signal.SIGRTMAX)}"
        )
    return number


def stream_from_request(value: int) -> Stream:
    stream = STREAMS_FROM_PROTO.get(value)
    if stream is None:
        raise InvalidArgument(
            f"invalid stream {value}: expected STREAM_STDOUT (1) or STREAM_STDERR (2)"
        )
    return stream
