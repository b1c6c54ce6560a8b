"""The sandbox's root directory tree: the overlay, /dev, /tmp, /proc masks and /etc."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from engine.runtime import libc, mounts

# Host device nodes bind-mounted into the sandbox's /dev. Nodes cannot be
# created in a user namespace, and a bind mount without nodev still works.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

DEV_SYMLINKS = {
    "ptmx": "pts/ptmx",
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "core": "/proc/kcore",
}

# /proc entries that reveal or change host kernel state. Files are covered by
# /dev/null, directories by an empty read-only tmpfs, and the rest are made
# read-only.
PROC_MASKED_FILES = (
    "kcore",
    "keys",
    "key-users",
    "kallsyms",
    "kmsg",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "config.gz",
    "sysrq-trigger",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "vmallocinfo",
)
PROC_MASKED_DIRS = ("acpi", "scsi", "asound", "firmware", "driver")
PROC_READ_ONLY = ("sys", "irq", "bus", "fs")

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class RootSpec:
    """Paths and settings for one sandbox's root; all paths are host paths."""

    root: str
    lower: str
    upper: str
    work: str
    binds: tuple[tuple[str, str], ...]
    hostname: str


@dataclass(frozen=True)
class TmpfsLimits:
    """Size in bytes and file count of a tmpfs; None means the kernel's default."""

    size: int | None = None
    inodes: int | None = None

    def to_message(self) -> dict[str, int | None]:
        return {"size": self.size, "inodes": self.inodes}

    @classmethod
    def from_message(cls, message: dict[str, int | None] | None) -> TmpfsLimits:
        message = message or {}
        return cls(size=message.get("size"), inodes=message.get("inodes"))


# tmpfs pages and inodes are charged to the sandbox's memory cgroup. The
# tmpfs mounts together stay below the memory limit, so filling them leaves
# memory for the sandbox's processes and for the engine's helpers. Otherwise
# the OOM killer would pick a helper once the sandbox's own processes are
# gone. /tmp gets half of the limit and /dev/shm an eighth, at most 64 MiB.
TMP_SHARE = 2
SHM_SHARE = 8
SHM_MAX_BYTES = 64 << 20
# One inode per 16 KiB of size. By estimate, a tmpfs inode with its dentry
# costs about 1 KiB of kernel memory.
BYTES_PER_INODE = 16 << 10
MIN_INODES = 1024


def tmpfs_limits(memory_bytes: int | None) -> tuple[TmpfsLimits, TmpfsLimits]:
    """Return the limits of /tmp and of /dev/shm for a sandbox's memory limit."""
    if memory_bytes is None:
        return TmpfsLimits(), TmpfsLimits()
    tmp = memory_bytes // TMP_SHARE
    shm = min(memory_bytes // SHM_SHARE, SHM_MAX_BYTES)
    return (
        TmpfsLimits(tmp, max(tmp // BYTES_PER_INODE, MIN_INODES)),
        TmpfsLimits(shm, max(shm // BYTES_PER_INODE, MIN_INODES)),
    )


def _ensure_file(path: str) -> None:
    if os.path.islink(path):
        os.unlink(path)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _mkdir(path: str, mode: int = 0o755) -> None:
    if os.path.islink(path):
        os.unlink(path)
    os.makedirs(path, mode=mode, exist_ok=True)


def mount_root(spec: RootSpec) -> None:
    """Mount the overlay root and the read-only binds on top of it.

    This runs before pivot_root, on host paths below the engine's own sandbox
    directory. The image's own symlinks are replaced by plain mount points.
    """
    mounts.mount_overlay(spec.lower, spec.upper, spec.work, spec.root)
    for source, destination in spec.binds:
        target = os.path.join(spec.root, destination.lstrip("/"))
        if os.path.isdir(source):
            _mkdir(target)
        else:
            _ensure_file(target)
        mounts.bind(source, target, read_only=True)


# Everything below runs after pivot_root, so absolute paths and symlinks in the
# image resolve inside the sandbox's root. The host's root is then reachable
# only below ``old_root``, a directory with an unguessable name, and
# ``check_inside`` refuses any path that resolves there.


def check_inside(path: str, old_root: str) -> str:
    """Return the resolved ``path``, or raise if it leads below ``old_root``."""
    resolved = os.path.realpath(path)
    if resolved == old_root or resolved.startswith(old_root + "/"):
        raise OSError(
            errno.ELOOP, f"{path!r} resolves to the host's root through a symlink"
        )
    return resolved


def mount_dev(old_root: str, shm: TmpfsLimits) -> None:
    """Mount a minimal /dev: a few device nodes, a new devpts instance and /dev/shm."""
    _mkdir("/dev")
    check_inside("/dev", old_root)
    mounts.mount_tmpfs("/dev", mode=0o755, size="1m")
    for name in DEVICES:
        target = f"/dev/{name}"
        _ensure_file(target)
        mounts.bind(
            f"{old_root}/dev/{name}", target, read_only=False, nodev=False, noexec=True
        )
    for name in ("pts", "shm"):
        os.mkdir(f"/dev/{name}", 0o755)
    mounts.mount_devpts("/dev/pts")
    mounts.mount_tmpfs("/dev/shm", mode=0o1777, size=shm.size, inodes=shm.inodes)
    for name, target in DEV_SYMLINKS.items():
        os.symlink(target, f"/dev/{name}")
    mounts.remount_read_only("/dev")


def mount_tmp(old_root: str, limits: TmpfsLimits) -> None:
    _mkdir("/tmp", 0o1777)
    check_inside("/tmp", old_root)
    mounts.mount_tmpfs("/tmp", mode=0o1777, size=limits.size, inodes=limits.inodes)


def mount_volume(source: str, target: str, old_root: str, *, read_only: bool) -> None:
    """Bind-mount a volume's directory (under ``old_root``) on ``target``.

    The target is created inside the sandbox's root, and a symlink the image
    placed at its last component is replaced by a directory. A symlink
    higher up resolves inside the root, and ``check_inside`` rejects one that
    leads to the host's root.
    """
    if not target.startswith("/") or target == "/":
        raise OSError(errno.EINVAL, f"volume mount path {target!r} must be absolute")
    parent = check_inside(os.path.dirname(target), old_root)
    os.makedirs(parent, exist_ok=True)
    target = os.path.join(parent, os.path.basename(target))
    _mkdir(target)
    check_inside(target, old_root)
    mounts.bind(source, target, read_only=read_only)


class WorkdirError(OSError):
    """A workdir that cannot exist in the sandbox, because of the caller's input."""


def make_workdir(path: str, old_root: str) -> None:
    """Create the workdir and its missing parents, one level at a time.

    os.makedirs recurses once per level, so a deep path would raise
    RecursionError. A component that exists but is not a directory is the
    caller's error, raised as WorkdirError.
    """
    current = "/"
    for part in path.strip("/").split("/"):
        if not part:
            continue
        current = os.path.join(current, part)
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if not os.path.isdir(current):
                raise WorkdirError(
                    errno.ENOTDIR, f"workdir {path!r}: {current!r} is not a directory"
                ) from None
        except OSError as error:
            raise WorkdirError(
                error.errno, f"workdir {path!r}: {error.strerror}"
            ) from None
    check_inside(path, old_root)


def prepare_dirs(old_root: str) -> None:
    """Create the directories the image may lack; /sys stays an empty directory."""
    for name in ("/proc", "/sys", "/root", "/etc"):
        _mkdir(name)
        check_inside(name, old_root)


def mask_proc() -> None:
    """Hide or freeze the sensitive parts of the sandbox's /proc.

    Runs after PID 1 mounted /proc and after /dev exists.
    """
    for name in PROC_MASKED_FILES:
        path = f"/proc/{name}"
        if os.path.exists(path):
            mounts.bind("/dev/null", path, read_only=True, noexec=True)
    for name in PROC_MASKED_DIRS:
        path = f"/proc/{name}"
        if os.path.isdir(path):
            mounts.mount_tmpfs(path, mode=0o555, size="4k", flags=libc.MS_RDONLY)
    for name in PROC_READ_ONLY:
        path = f"/proc/{name}"
        if os.path.exists(path):
            mounts.remount_read_only(path)


def _write(path: str, text: str, old_root: str) -> None:
    if os.path.islink(path):
        os.unlink(path)
    check_inside(os.path.dirname(path), old_root)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o644), "w") as file:
        file.write(text)


def write_etc(
    hostname: str,
    old_root: str,
    address: str | None = None,
    resolv_conf: str | None = None,
) -> None:
    """Write /etc/hostname, hosts and resolv.conf, and passwd and group if absent.

    ``address`` is the sandbox's IPv4 address and ``resolv_conf`` the text of
    its resolv.conf; a loopback-only sandbox has neither.
    """
    _write("/etc/hostname", f"{hostname}\n", old_root)
    hosts = (
        f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n"
    )
    if address is not None:
        hosts += f"{address}\t{hostname}\n"
    _write("/etc/hosts", hosts, old_root)
    if resolv_conf is None:
        # Loopback-only sandboxes have no resolver to reach.
        resolv_conf = "# no network: no name servers\n"
    _write("/etc/resolv.conf", resolv_conf, old_root)
    for name, text in (("passwd", PASSWD), ("group", GROUP)):
        path = f"/etc/{name}"
        if os.path.islink(path) or not os.path.isfile(path):
            _write(path, text, old_root)
