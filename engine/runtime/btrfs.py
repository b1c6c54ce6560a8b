"""Btrfs subvolumes and quota groups through ioctls, without btrfs-progs.

Each subvolume has a level-0 quota group with the subvolume's id. A limit on
that group's referenced bytes bounds the data and metadata written below the
subvolume, and the write that would pass it fails with EDQUOT.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import uuid

_BTRFS_IOCTL_MAGIC = 0x94
_IOC_WRITE = 1
_IOC_READ = 2

BTRFS_PATH_NAME_MAX = 4087
BTRFS_INO_LOOKUP_PATH_MAX = 4080
# Object id of the root directory of every subvolume.
BTRFS_FIRST_FREE_OBJECTID = 256
BTRFS_QUOTA_CTL_ENABLE = 1
BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4
BTRFS_QGROUP_LIMIT_MAX_RFER = 1


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_BTRFS_IOCTL_MAGIC << 8) | number


class VolArgs(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int64), ("name", ctypes.c_char * 4088)]


class InoLookupArgs(ctypes.Structure):
    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("name", ctypes.c_char * BTRFS_INO_LOOKUP_PATH_MAX),
    ]


class QuotaCtlArgs(ctypes.Structure):
    _fields_ = [("cmd", ctypes.c_uint64), ("status", ctypes.c_uint64)]


class QgroupCreateArgs(ctypes.Structure):
    _fields_ = [("create", ctypes.c_uint64), ("qgroupid", ctypes.c_uint64)]


class QgroupLimit(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("max_rfer", ctypes.c_uint64),
        ("max_excl", ctypes.c_uint64),
        ("rsv_rfer", ctypes.c_uint64),
        ("rsv_excl", ctypes.c_uint64),
    ]


class QgroupLimitArgs(ctypes.Structure):
    _fields_ = [("qgroupid", ctypes.c_uint64), ("lim", QgroupLimit)]


class FsInfoArgs(ctypes.Structure):
    _fields_ = [
        ("max_id", ctypes.c_uint64),
        ("num_devices", ctypes.c_uint64),
        ("fsid", ctypes.c_uint8 * 16),
        ("nodesize", ctypes.c_uint32),
        ("sectorsize", ctypes.c_uint32),
        ("clone_alignment", ctypes.c_uint32),
        ("reserved", ctypes.c_uint8 * (1024 - 44)),
    ]


BTRFS_IOC_SUBVOL_CREATE = _ioc(_IOC_WRITE, 14, ctypes.sizeof(VolArgs))
BTRFS_IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, 15, ctypes.sizeof(VolArgs))
BTRFS_IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 18, ctypes.sizeof(InoLookupArgs))
BTRFS_IOC_FS_INFO = _ioc(_IOC_READ, 31, ctypes.sizeof(FsInfoArgs))
BTRFS_IOC_QUOTA_CTL = _ioc(_IOC_READ | _IOC_WRITE, 40, ctypes.sizeof(QuotaCtlArgs))
BTRFS_IOC_QGROUP_CREATE = _ioc(_IOC_WRITE, 42, ctypes.sizeof(QgroupCreateArgs))
BTRFS_IOC_QGROUP_LIMIT = _ioc(_IOC_READ, 43, ctypes.sizeof(QgroupLimitArgs))


def _open_dir(path: str, fd: int | None = None) -> int:
    """Return ``fd`` if given, else a new descriptor of directory ``path``."""
    if fd is not None:
        return fd
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _close_dir(opened: int, fd: int | None) -> None:
    """Close ``opened`` unless it is the caller's ``fd``."""
    if fd is None:
        os.close(opened)


def _ioctl(fd: int, request: int, args: ctypes.Structure, call: str) -> None:
    try:
        fcntl.ioctl(fd, request, args)
    except OSError as error:
        raise OSError(error.errno, f"{call} failed: {error.strerror}") from None


def _vol_args(name: str) -> VolArgs:
    encoded = os.fsencode(name)
    if not encoded or b"/" in encoded or len(encoded) > BTRFS_PATH_NAME_MAX:
        raise ValueError(f"subvolume name {name!r} must be one path component")
    args = VolArgs()
    args.name = encoded
    return args


def enable_quota(mount_point: str, *, simple: bool = True) -> None:
    """Enable quota groups on the file system mounted at ``mount_point``.

    Simple quotas (Linux 6.7 and later) charge each extent to the subvolume
    that wrote it, and skip the backref walks of full quota groups.
    """
    args = QuotaCtlArgs()
    args.cmd = BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA if simple else BTRFS_QUOTA_CTL_ENABLE
    fd = _open_dir(mount_point)
    try:
        _ioctl(fd, BTRFS_IOC_QUOTA_CTL, args, f"BTRFS_IOC_QUOTA_CTL on {mount_point}")
    finally:
        os.close(fd)


# Each function below that takes a directory path also takes ``fd``, an open
# descriptor of that directory, and then uses it instead of resolving the
# path again. The path then only names the directory in error messages.


def create_subvolume(parent: str, name: str, fd: int | None = None) -> int:
    """Create subvolume ``name`` in directory ``parent`` and return its id.

    A subvolume whose id cannot be read is deleted again before the error
    is raised.
    """
    args = _vol_args(name)
    parent_fd = _open_dir(parent, fd)
    try:
        _ioctl(
            parent_fd,
            BTRFS_IOC_SUBVOL_CREATE,
            args,
            f"BTRFS_IOC_SUBVOL_CREATE of {name!r} in {parent}",
        )
        try:
            child_fd = os.open(
                name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=parent_fd,
            )
            try:
                return subvolume_id(os.path.join(parent, name), child_fd)
            finally:
                os.close(child_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                fcntl.ioctl(parent_fd, BTRFS_IOC_SNAP_DESTROY, args)
            raise
    finally:
        _close_dir(parent_fd, fd)


def subvolume_id(path: str, fd: int | None = None) -> int:
    """Return the id of the subvolume that contains ``path``."""
    args = InoLookupArgs()
    args.objectid = BTRFS_FIRST_FREE_OBJECTID
    path_fd = _open_dir(path, fd)
    try:
        _ioctl(path_fd, BTRFS_IOC_INO_LOOKUP, args, f"BTRFS_IOC_INO_LOOKUP of {path}")
    finally:
        _close_dir(path_fd, fd)
    return int(args.treeid)


def delete_subvolume(parent: str, name: str, fd: int | None = None) -> None:
    """Delete subvolume ``name`` of ``parent`` with all its files, in O(1).

    The kernel unlinks the subvolume at once and frees its extents in the
    background.
    """
    args = _vol_args(name)
    parent_fd = _open_dir(parent, fd)
    try:
        _ioctl(
            parent_fd,
            BTRFS_IOC_SNAP_DESTROY,
            args,
            f"BTRFS_IOC_SNAP_DESTROY of {name!r} in {parent}",
        )
    finally:
        _close_dir(parent_fd, fd)


def limit_referenced(
    mount_point: str, subvolume: int, max_bytes: int, fd: int | None = None
) -> None:
    """Limit the bytes that subvolume ``subvolume`` refers to at ``max_bytes``."""
    args = QgroupLimitArgs()
    args.qgroupid = subvolume
    args.lim.flags = BTRFS_QGROUP_LIMIT_MAX_RFER
    args.lim.max_rfer = max_bytes
    mount_fd = _open_dir(mount_point, fd)
    try:
        _ioctl(
            mount_fd,
            BTRFS_IOC_QGROUP_LIMIT,
            args,
            f"BTRFS_IOC_QGROUP_LIMIT of 0/{subvolume} to {max_bytes} bytes",
        )
    finally:
        _close_dir(mount_fd, fd)


def remove_qgroup(mount_point: str, subvolume: int, fd: int | None = None) -> bool:
    """Remove the quota group of a deleted subvolume; False while it still has data.

    The kernel keeps the group while the cleaner has not yet freed the
    subvolume's extents (EBUSY), and Linux 6.10 and later remove a simple
    quota group by themselves once it is empty (ENOENT).
    """
    args = QgroupCreateArgs()
    args.create = 0
    args.qgroupid = subvolume
    mount_fd = _open_dir(mount_point, fd)
    try:
        fcntl.ioctl(mount_fd, BTRFS_IOC_QGROUP_CREATE, args)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return True
        if error.errno == errno.EBUSY:
            return False
        raise OSError(
            error.errno,
            f"BTRFS_IOC_QGROUP_CREATE removing 0/{subvolume}: {error.strerror}",
        ) from None
    finally:
        _close_dir(mount_fd, fd)
    return True


def filesystem_id(mount_point: str) -> str:
    """Return the file system's UUID, the name of its directory in /sys/fs/btrfs."""
    args = FsInfoArgs()
    fd = _open_dir(mount_point)
    try:
        _ioctl(fd, BTRFS_IOC_FS_INFO, args, f"BTRFS_IOC_FS_INFO of {mount_point}")
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(args.fsid)))


def charged_bytes(fs_id: str, subvolume: int) -> int:
    """Return the bytes a subvolume's quota group is charged, from sysfs.

    That is its referenced bytes as of the last transaction commit plus the
    data reserved since for writes not yet committed, the same sum that the
    kernel checks against the group's limit.
    """
    directory = f"/sys/fs/btrfs/{fs_id}/qgroups/0_{subvolume}"
    total = 0
    for name in ("referenced", "rsv_data"):
        with open(f"{directory}/{name}", encoding="ascii") as file:
            total += int(file.read())
    return total
