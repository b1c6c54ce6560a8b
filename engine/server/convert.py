"""Conversions between the engine.v1 messages and the value types of engine.core.models.

The servicers use the ``*_to_proto`` functions and the SDK the ``*_from_proto``
ones, so both sides agree on every enum value and on every unset field.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from engine.core.models import (
    CloudBucketConfig,
    CloudBucketMount,
    ExitReason,
    OutputChunk,
    ProcessInfo,
    ProcessState,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    Stream,
    TerminationReason,
    VolumeMount,
)
from engine.v1 import sandbox_pb2 as pb

SANDBOX_STATES: dict[SandboxState, int] = {
    SandboxState.PENDING: pb.SANDBOX_STATE_PENDING,
    SandboxState.RUNNING: pb.SANDBOX_STATE_RUNNING,
    SandboxState.TERMINATED: pb.SANDBOX_STATE_TERMINATED,
}
TERMINATION_REASONS: dict[TerminationReason, int] = {
    TerminationReason.NONE: pb.TERMINATION_REASON_UNSPECIFIED,
    TerminationReason.USER: pb.TERMINATION_REASON_USER,
    TerminationReason.TTL: pb.TERMINATION_REASON_TTL,
    TerminationReason.ERROR: pb.TERMINATION_REASON_ERROR,
    TerminationReason.SHUTDOWN: pb.TERMINATION_REASON_SHUTDOWN,
    TerminationReason.DAEMON_RESTART: pb.TERMINATION_REASON_DAEMON_RESTART,
}
PROCESS_STATES: dict[ProcessState, int] = {
    ProcessState.RUNNING: pb.PROCESS_STATE_RUNNING,
    ProcessState.EXITED: pb.PROCESS_STATE_EXITED,
}
EXIT_REASONS: dict[ExitReason, int] = {
    ExitReason.NONE: pb.EXIT_REASON_UNSPECIFIED,
    ExitReason.EXITED: pb.EXIT_REASON_EXITED,
    ExitReason.SIGNALED: pb.EXIT_REASON_SIGNALED,
    ExitReason.TIMEOUT: pb.EXIT_REASON_TIMEOUT,
    ExitReason.OOM: pb.EXIT_REASON_OOM,
    ExitReason.KILLED: pb.EXIT_REASON_KILLED,
}
STREAMS: dict[Stream, int] = {
    Stream.STDOUT: pb.STREAM_STDOUT,
    Stream.STDERR: pb.STREAM_STDERR,
}


def _invert(mapping: dict) -> dict:
    return {value: key for key, value in mapping.items()}


SANDBOX_STATES_FROM_PROTO: dict[int, SandboxState] = _invert(SANDBOX_STATES)
TERMINATION_REASONS_FROM_PROTO: dict[int, TerminationReason] = _invert(
    TERMINATION_REASONS
)
PROCESS_STATES_FROM_PROTO: dict[int, ProcessState] = _invert(PROCESS_STATES)
EXIT_REASONS_FROM_PROTO: dict[int, ExitReason] = _invert(EXIT_REASONS)
STREAMS_FROM_PROTO: dict[int, Stream] = _invert(STREAMS)


def timestamp_to_proto(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def timestamp_from_proto(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


# ---------------------------------------------------------------- to proto


def spec_to_proto(spec: SandboxSpec) -> pb.SandboxSpec:
    message = pb.SandboxSpec(
        image=spec.image,
        pids=spec.pids,
        env=spec.env,
        workdir=spec.workdir,
        name=spec.name,
        labels=spec.labels,
        ttl_seconds=spec.ttl,
        nofile=spec.nofile,
        volumes=[volume_mount_to_proto(mount) for mount in spec.volumes],
        secrets=list(spec.secrets),
        cloud_buckets=[bucket_mount_to_proto(mount) for mount in spec.cloud_buckets],
        block_network=spec.block_network,
        allow_list=list(spec.allow_list),
        disk_mib=spec.disk_mib,
    )
    if spec.cpu is not None:
        message.cpu = spec.cpu
    if spec.memory_mib is not None:
        message.memory_mib = spec.memory_mib
    return message


def volume_mount_to_proto(mount: VolumeMount) -> pb.VolumeMount:
    return pb.VolumeMount(
        name=mount.name, mount_path=mount.mount_path, read_only=mount.read_only
    )


def bucket_config_to_proto(config: CloudBucketConfig) -> pb.CloudBucketConfig:
    message = pb.CloudBucketConfig(
        endpoint=config.endpoint,
        region=config.region,
        access_key=config.access_key,
        secret_key=config.secret_key,
        read_only=config.read_only,
        force_path_style=config.force_path_style,
    )
    if config.key_prefix is not None:
        message.key_prefix = config.key_prefix
    return message


def bucket_mount_to_proto(mount: CloudBucketMount) -> pb.CloudBucketMount:
    return pb.CloudBucketMount(
        name=mount.name,
        mount_path=mount.mount_path,
        config=bucket_config_to_proto(mount.config),
    )


def sandbox_to_proto(info: SandboxInfo) -> pb.Sandbox:
    message = pb.Sandbox(
        sandbox_id=info.sandbox_id,
        spec=spec_to_proto(info.spec),
        state=SANDBOX_STATES[info.state],
        termination_reason=TERMINATION_REASONS[info.reason],
        created_at=timestamp_to_proto(info.created_at),
        last_activity_at=timestamp_to_proto(info.last_activity_at),
        error=info.error,
        address=info.address,
        urls=info.urls,
    )
    if info.terminated_at is not None:
        message.terminated_at.CopyFrom(timestamp_to_proto(info.terminated_at))
    if info.state != SandboxState.TERMINATED and info.spec.ttl > 0:
        expires_at = info.last_activity_at + info.spec.ttl
        message.expires_at.CopyFrom(timestamp_to_proto(expires_at))
    return message


def process_to_proto(info: ProcessInfo) -> pb.Process:
    message = pb.Process(
        pid=info.pid,
        argv=info.argv,
        cwd=info.cwd,
        state=PROCESS_STATES[info.state],
        signal=info.signal,
        exit_reason=EXIT_REASONS[info.reason],
        started_at=timestamp_to_proto(info.started_at),
    )
    if info.exit_code is not None:
        message.exit_code = info.exit_code
    if info.ended_at is not None:
        message.ended_at.CopyFrom(timestamp_to_proto(info.ended_at))
    return message


def exit_to_proto(info: ProcessInfo) -> pb.ExecExited:
    """Return how an exited process ended; -1 stands for an unknown exit code."""
    return pb.ExecExited(
        exit_code=info.exit_code if info.exit_code is not None else -1,
        signal=info.signal,
        reason=EXIT_REASONS[info.reason],
    )


def chunk_to_proto(chunk: OutputChunk) -> pb.OutputChunk:
    return pb.OutputChunk(
        stream=STREAMS[chunk.stream],
        offset=chunk.offset,
        data=chunk.data,
        dropped=chunk.dropped,
        eof=chunk.eof,
    )


def stats_to_proto(stats: SandboxStats) -> pb.StatsResponse:
    return pb.StatsResponse(
        cpu_seconds=stats.cpu_seconds,
        memory_bytes=stats.memory_bytes,
        memory_peak_bytes=stats.memory_peak_bytes,
        pids=stats.pids,
        disk_bytes=stats.disk_bytes,
    )


# -------------------------------------------------------------- from proto


def spec_from_proto(message: pb.SandboxSpec) -> SandboxSpec:
    """Convert a spec the daemon sent back, with every default filled in."""
    defaults = SandboxSpec()
    return SandboxSpec(
        image=message.image or defaults.image,
        cpu=message.cpu if message.HasField("cpu") else None,
        memory_mib=message.memory_mib if message.HasField("memory_mib") else None,
        pids=message.pids if message.HasField("pids") else defaults.pids,
        env=dict(message.env),
        workdir=message.workdir or defaults.workdir,
        name=message.name,
        labels=dict(message.labels),
        ttl=message.ttl_seconds if message.HasField("ttl_seconds") else defaults.ttl,
        nofile=message.nofile if message.HasField("nofile") else defaults.nofile,
        volumes=tuple(volume_mount_from_proto(mount) for mount in message.volumes),
        secrets=tuple(message.secrets),
        cloud_buckets=tuple(
            bucket_mount_from_proto(mount) for mount in message.cloud_buckets
        ),
        block_network=message.block_network,
        allow_list=tuple(message.allow_list),
        disk_mib=message.disk_mib
        if message.HasField("disk_mib")
        else defaults.disk_mib,
    )


def volume_mount_from_proto(message: pb.VolumeMount) -> VolumeMount:
    return VolumeMount(
        name=message.name, mount_path=message.mount_path, read_only=message.read_only
    )


def bucket_config_from_proto(message: pb.CloudBucketConfig) -> CloudBucketConfig:
    return CloudBucketConfig(
        endpoint=message.endpoint,
        region=message.region,
        access_key=message.access_key,
        secret_key=message.secret_key,
        read_only=message.read_only,
        force_path_style=message.force_path_style,
        key_prefix=message.key_prefix if message.HasField("key_prefix") else None,
    )


def bucket_mount_from_proto(message: pb.CloudBucketMount) -> CloudBucketMount:
    return CloudBucketMount(
        name=message.name,
        mount_path=message.mount_path,
        config=bucket_config_from_proto(message.config),
    )


def sandbox_from_proto(message: pb.Sandbox) -> SandboxInfo:
    terminated_at = None
    if message.HasField("terminated_at"):
        terminated_at = timestamp_from_proto(message.terminated_at)
    return SandboxInfo(
        sandbox_id=message.sandbox_id,
        spec=spec_from_proto(message.spec),
        state=SANDBOX_STATES_FROM_PROTO.get(message.state, SandboxState.PENDING),
        reason=TERMINATION_REASONS_FROM_PROTO.get(
            message.termination_reason, TerminationReason.NONE
        ),
        created_at=timestamp_from_proto(message.created_at),
        terminated_at=terminated_at,
        last_activity_at=timestamp_from_proto(message.last_activity_at),
        error=message.error,
        address=message.address,
        urls=dict(message.urls),
    )


def process_from_proto(message: pb.Process) -> ProcessInfo:
    ended_at = None
    if message.HasField("ended_at"):
        ended_at = timestamp_from_proto(message.ended_at)
    return ProcessInfo(
        pid=message.pid,
        argv=list(message.argv),
        cwd=message.cwd,
        state=PROCESS_STATES_FROM_PROTO.get(message.state, ProcessState.RUNNING),
        exit_code=message.exit_code if message.HasField("exit_code") else None,
        signal=message.signal,
        reason=EXIT_REASONS_FROM_PROTO.get(message.exit_reason, ExitReason.NONE),
        started_at=timestamp_from_proto(message.started_at),
        ended_at=ended_at,
    )


def stats_from_proto(message: pb.StatsResponse) -> SandboxStats:
    return SandboxStats(
        cpu_seconds=message.cpu_seconds,
        memory_bytes=message.memory_bytes,
        memory_peak_bytes=message.memory_peak_bytes,
        pids=message.pids,
        disk_bytes=message.disk_bytes,
    )
