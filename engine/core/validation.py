"""Checks of caller input; each failure names the field, the value and the fix."""

from __future__ import annotations

import math
import posixpath
import re

from engine.core.models import (
    CloudBucketConfig,
    CloudBucketMount,
    SandboxSpec,
    VolumeMount,
)
from engine.core.network import check_policy
from engine.core.secrets import check_name as check_secret_name
from engine.core.secrets import check_names as check_secret_names
from engine.errors import InvalidArgument
from engine.storage.fuse import check_bucket, check_endpoint, check_key_prefix
from engine.storage.volumes import check_name as check_volume_name

# argv plus env, in bytes. The kernel allows 128 KiB per string and about a
# quarter of the stack limit in all; 1 MiB fits the default 8 MiB stack.
MAX_EXEC_BYTES = 1024 * 1024
MAX_ENV_ENTRIES = 4096
# PATH_MAX of Linux, for workdir and cwd.
MAX_PATH_BYTES = 4096
MIN_MEMORY_MIB = 8
# A new layer (its directories and the generated /etc files) uses about
# 36 KiB on Linux 6.18. A smaller limit than this is more likely a unit
# mistake, such as bytes or KiB passed as MiB, than a useful sandbox.
MIN_DISK_MIB = 16
# 1 PiB; a limit above the layer file system's size is allowed and never hit.
MAX_DISK_MIB = 1 << 30
MAX_PIDS = 1 << 22
# Maximum idle timeout: 10 years, since protobuf Timestamps end at year 9999.
MAX_TTL_SECONDS = 10 * 366 * 24 * 3600.0
MAX_NAME = 63
MAX_LABELS = 64
MAX_VOLUMES = 32
MAX_BUCKETS = 8
MAX_MOUNT_PATH_BYTES = 4096
# The runtime mounts its own file systems here, and a volume must not hide them.
RESERVED_MOUNT_PATHS = ("/proc", "/dev", "/sys")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


def shorten(value: object, limit: int = 80) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, for messages."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(field: str, value: str) -> None:
    if "\0" in value:
        raise InvalidArgument(f"{field} {shorten(repr(value))} contains a NUL byte")


def check_ttl(ttl: float) -> None:
    if (
        not isinstance(ttl, int | float)
        or not -MAX_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS
    ):
        raise InvalidArgument(
            f"ttl {ttl!r} must be a number of seconds up to {MAX_TTL_SECONDS:.0f}"
            " (10 years); 0 or less means no expiry"
        )


def check_disk(disk_mib: int) -> None:
    if (
        isinstance(disk_mib, bool)
        or not isinstance(disk_mib, int)
        or not MIN_DISK_MIB <= disk_mib <= MAX_DISK_MIB
    ):
        raise InvalidArgument(
            f"disk {disk_mib!r} MiB must be a whole number of MiB between"
            f" {MIN_DISK_MIB} and {MAX_DISK_MIB}, such as 1024"
        )


def check_spec(spec: SandboxSpec) -> None:
    """Raise InvalidArgument for the first bad field of ``spec``."""
    if spec.cpu is not None and (
        math.isnan(spec.cpu) or spec.cpu <= 0 or spec.cpu > 1024
    ):
        raise InvalidArgument(
            f"cpu {spec.cpu!r} must be a number of cores above 0, such as 0.5 or 2"
        )
    if spec.memory_mib is not None and not MIN_MEMORY_MIB <= spec.memory_mib <= 1 << 30:
        raise InvalidArgument(
            f"memory {spec.memory_mib!r} MiB must be at least {MIN_MEMORY_MIB} MiB"
        )
    check_disk(spec.disk_mib)
    if not 1 <= spec.pids <= MAX_PIDS:
        raise InvalidArgument(f"pids {spec.pids!r} must be between 1 and {MAX_PIDS}")
    if not 16 <= spec.nofile <= 1 << 20:
        raise InvalidArgument(
            f"nofile {spec.nofile!r} must be between 16 and {1 << 20}"
        )
    check_ttl(spec.ttl)
    if not spec.workdir.startswith("/"):
        raise InvalidArgument(
            f"workdir {shorten(spec.workdir)} must be an absolute path"
        )
    _check_text("workdir", spec.workdir)
    if any(
        spec.workdir == reserved or spec.workdir.startswith(reserved + "/")
        for reserved in RESERVED_MOUNT_PATHS
    ):
        raise InvalidArgument(
            f"workdir {shorten(spec.workdir)} is in /proc, /dev or /sys; choose a"
            " directory of the sandbox's own, such as /root"
        )
    if len(spec.workdir.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(
            f"workdir is {len(spec.workdir.encode())} bytes; the limit is "
            f"{MAX_PATH_BYTES} bytes"
        )
    if spec.name and (len(spec.name) > MAX_NAME or not _NAME.match(spec.name)):
        raise InvalidArgument(
            f"name {shorten(spec.name)} must be at most {MAX_NAME} letters, "
            "digits, '.', '_' or '-'"
        )
    check_env(spec.env)
    check_volumes(spec.volumes, spec.cloud_buckets)
    check_secret_names("secrets", spec.secrets)
    check_policy(spec.block_network, spec.allow_list)
    if len(spec.labels) > MAX_LABELS:
        raise InvalidArgument(
            f"{len(spec.labels)} labels given; the maximum is {MAX_LABELS}"
        )
    for key, value in spec.labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidArgument(
                f"label key {shorten(key)} must be 1-63 letters, digits, "
                "'.', '_', '/' or '-'"
            )
        if len(value) > 256:
            raise InvalidArgument(
                f"label {key!r} value is {len(value)} characters; the maximum is 256"
            )
        _check_text(f"label {key!r}", value)


def check_volumes(
    volumes: tuple[VolumeMount, ...], buckets: tuple[CloudBucketMount, ...] = ()
) -> None:
    """Check volume and bucket mounts: names, and paths absolute, normal, distinct."""
    if len(volumes) > MAX_VOLUMES:
        raise InvalidArgument(
            f"{len(volumes)} volumes given; the maximum is {MAX_VOLUMES}"
        )
    if len(buckets) > MAX_BUCKETS:
        raise InvalidArgument(
            f"{len(buckets)} cloud buckets given; the maximum is {MAX_BUCKETS}"
        )
    seen: set[str] = set()
    for mount in volumes:
        check_volume_name(mount.name)
        _check_mount_path("volume", mount.mount_path, seen)
    for bucket in buckets:
        check_bucket(bucket.name)
        _check_mount_path("cloud bucket", bucket.mount_path, seen)
        config = bucket.config
        check_endpoint(config.endpoint)
        if config.region and not _REGION.match(config.region):
            raise InvalidArgument(
                f"invalid region {shorten(config.region)} of bucket {bucket.name!r}:"
                " expected a name such as us-east-1"
            )
        if bool(config.access_key) != bool(config.secret_key):
            raise InvalidArgument(
                f"bucket {bucket.name!r} names only one of access_key and"
                " secret_key; name both secrets, or neither for anonymous access"
            )
        for key in (config.access_key, config.secret_key):
            if key:
                check_secret_name(key)
        if config.key_prefix is not None:
            check_key_prefix(config.key_prefix)


def check_volume_backend(protocol: str, config: CloudBucketConfig) -> None:
    """Check the connection settings of an fsspec volume."""
    if protocol != "s3" and config != CloudBucketConfig():
        raise InvalidArgument(
            f"s3 settings apply only to s3:// urls, not {protocol}://"
        )
    if config.read_only or config.key_prefix is not None:
        raise InvalidArgument(
            "s3 settings of a volume may not set read_only or key_prefix; put the"
            " prefix in the url and read_only in each Volume mount"
        )
    check_endpoint(config.endpoint)
    if bool(config.access_key) != bool(config.secret_key):
        raise InvalidArgument(
            "the volume's s3 settings name only one of access_key and secret_key;"
            " name both secrets, or neither for anonymous access"
        )
    for key in (config.access_key, config.secret_key):
        if key:
            check_secret_name(key)


def _check_mount_path(kind: str, path: str, seen: set[str]) -> None:
    display = shorten(repr(path))
    _check_text(f"{kind} mount path", path)
    if len(path.encode()) > MAX_MOUNT_PATH_BYTES:
        raise InvalidArgument(
            f"{kind} mount path {display} is longer than {MAX_MOUNT_PATH_BYTES} bytes"
        )
    if not path.startswith("/"):
        raise InvalidArgument(
            f"{kind} mount path {display} must be an absolute path, such as /data"
        )
    normal = "/" + posixpath.normpath(path).lstrip("/")
    if normal == "/":
        raise InvalidArgument(
            f"{kind} mount path {display} is the sandbox's root; mount the"
            f" {kind} on a directory such as /data"
        )
    # A path with "..", "." or "//" could name a reserved directory, so
    # only the normal spelling is accepted.
    if normal != path:
        raise InvalidArgument(
            f"{kind} mount path {display} is not in normal form; use {normal!r}"
        )
    for reserved in RESERVED_MOUNT_PATHS:
        if path == reserved or path.startswith(reserved + "/"):
            raise InvalidArgument(
                f"{kind} mount path {display} is inside {reserved}, which the"
                " engine mounts itself; choose another path"
            )
    if path in seen:
        raise InvalidArgument(
            f"{kind} mount path {display} is given twice; mount each volume or"
            " bucket on its own path"
        )
    seen.add(path)


def check_env(env: dict[str, str]) -> None:
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidArgument(
            f"env has {len(env)} entries; the maximum is {MAX_ENV_ENTRIES}"
        )
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise InvalidArgument(
                f"env name {shorten(key)} is invalid; use letters, digits and '_', "
                "not starting with a digit"
            )
        _check_text(f"env {key}", value)


def check_exec_size(argv: list[str], env: dict[str, str]) -> None:
    """Raise InvalidArgument when argv plus env exceed MAX_EXEC_BYTES."""
    size = sum(len(arg.encode()) + 1 for arg in argv)
    size += sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())
    if size > MAX_EXEC_BYTES:
        raise InvalidArgument(
            f"argv and env are {size} bytes; the limit is {MAX_EXEC_BYTES} bytes. "
            "Pass large data through stdin or a file instead"
        )


def check_exec(
    argv: list[str], cwd: str, env: dict[str, str], timeout: float | None
) -> None:
    if not argv:
        raise InvalidArgument(
            "argv is empty; pass the program and its arguments, "
            "e.g. ['python3', '-c', 'print(1)']"
        )
    if not argv[0]:
        raise InvalidArgument("argv[0] is empty; it must name the program to run")
    for index, arg in enumerate(argv):
        _check_text(f"argv[{index}]", arg)
    if not cwd.startswith("/"):
        raise InvalidArgument(f"cwd {shorten(cwd)} must be an absolute path")
    _check_text("cwd", cwd)
    check_env(env)
    check_exec_size(argv, env)
    if timeout is not None and (math.isnan(timeout) or timeout < 0):
        raise InvalidArgument(
            f"timeout {timeout!r} must be 0 or more seconds (0: no timeout)"
        )
