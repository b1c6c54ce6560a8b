"""Mounts inside a sandbox's mount namespace.

Every function here runs in the sandbox's own mount namespace, after
``make_private``, so nothing it mounts propagates to the host.
"""

from __future__ import annotations

import os

from engine.runtime import libc

# statvfs f_flag bits that a bind mount in a user namespace must keep, because
# the kernel locks them on mounts that came from a more privileged namespace.
_LOCKED_FLAGS = (
    (os.ST_RDONLY, libc.MS_RDONLY),
    (os.ST_NOSUID, libc.MS_NOSUID),
    (os.ST_NODEV, libc.MS_NODEV),
    (os.ST_NOEXEC, libc.MS_NOEXEC),
    (os.ST_NOATIME, libc.MS_NOATIME),
    (os.ST_NODIRATIME, libc.MS_NODIRATIME),
    (os.ST_RELATIME, libc.MS_RELATIME),
)


def make_private() -> None:
    """Stop mount propagation between this namespace and the host, recursively."""
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def _current_flags(path: str) -> int:
    flags = os.statvfs(path).f_flag
    result = 0
    for st_flag, ms_flag in _LOCKED_FLAGS:
        if flags & st_flag:
            result |= ms_flag
    return result


def bind(
    source: str,
    target: str,
    *,
    read_only: bool = True,
    nosuid: bool = True,
    nodev: bool = True,
    noexec: bool = False,
) -> None:
    """Bind-mount ``source`` on ``target`` (not recursively) and apply the flags.

    The flags are applied by a second, remounting call, as the kernel ignores
    them on the first, and then verified with statvfs.
    """
    libc.mount(source, target, None, libc.MS_BIND)
    flags = _current_flags(target)
    if read_only:
        flags |= libc.MS_RDONLY
    if nosuid:
        flags |= libc.MS_NOSUID
    if nodev:
        flags |= libc.MS_NODEV
    if noexec:
        flags |= libc.MS_NOEXEC
    libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | flags)
    applied = _current_flags(target)
    if applied & flags != flags:
        raise OSError(
            0,
            f"bind mount of {source!r} on {target!r} lacks flags {flags & ~applied:#x}",
        )


def mount_overlay(lower: str, upper: str, work: str, target: str) -> None:
    """Mount an overlayfs of read-only ``lower`` and writable ``upper`` on ``target``.

    ``userxattr`` makes overlayfs keep its metadata in user.* xattrs, which is
    what a mount inside a user namespace may use. ``volatile`` (Linux 5.10)
    drops every sync of the upper layer: the layer is deleted with its
    sandbox, so syncing it only costs a file system commit at each unmount
    and lets sandbox code drive the host's disk with sync calls.
    """
    for path in (lower, upper, work):
        if "," in path or ":" in path:
            raise ValueError(f"overlay path {path!r} must not contain ',' or ':'")
    options = f"lowerdir={lower},upperdir={upper},workdir={work},userxattr,volatile"
    libc.mount("overlay", target, "overlay", libc.MS_NOSUID | libc.MS_NODEV, options)


def mount_tmpfs(
    target: str,
    *,
    mode: int = 0o755,
    size: str | int | None = None,
    inodes: int | None = None,
    flags: int = 0,
) -> None:
    """Mount a tmpfs of at most ``size`` (bytes, or a string such as "1m") and
    ``inodes`` files; None leaves the kernel's default, half of RAM."""
    options = f"mode={mode:o}"
    if size:
        options += f",size={size}"
    if inodes:
        options += f",nr_inodes={inodes}"
    libc.mount(
        "tmpfs", target, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV | flags, options
    )


def mount_proc(target: str) -> None:
    """Mount procfs for the caller's PID namespace; the caller must be inside it."""
    libc.mount("proc", target, "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)


def mount_devpts(target: str) -> None:
    """Mount a new devpts instance, so the sandbox never sees the host's ptys."""
    libc.mount(
        "devpts",
        target,
        "devpts",
        libc.MS_NOSUID | libc.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )


def remount_read_only(target: str) -> None:
    """Make ``target`` read-only, keeping its other flags and its submounts.

    A mount point is remounted in place. Any other path is first bind-mounted
    on itself, which gives it a mount of its own to remount.
    """
    if not os.path.ismount(target):
        libc.mount(target, target, None, libc.MS_BIND)
    flags = _current_flags(target) | libc.MS_RDONLY
    libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | flags)


def pivot_into(new_root: str) -> None:
    """Make ``new_root`` the root of this mount namespace and detach the old root.

    pivot_root(".", ".") stacks the old root on top of the new one, so the
    following lazy unmount of "." removes exactly the old root and needs no
    directory for it inside the new root.
    """
    os.chdir(new_root)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
