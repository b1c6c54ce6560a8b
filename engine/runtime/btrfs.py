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
import sys
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


class SearchKey(ctypes.Structure):
    _fields_ = [
        ("tree_id", ctypes.c_uint64),
        ("min_objectid", ctypes.c_uint64),
        ("max_objectid", ctypes.c_uint64),
        ("min_offset", ctypes.c_uint64),
        ("max_offset", ctypes.c_uint64),
        ("min_transid", ctypes.c_uint64),
        ("max_transid", ctypes.c_uint64),
        ("min_type", ctypes.c_uint32),
        ("max_type", ctypes.c_uint32),
        ("nr_items", ctypes.c_uint32),
        ("unused", ctypes.c_uint32),
        ("unused1", ctypes.c_uint64 * 4),
    ]


class SearchArgsV2(ctypes.Structure):
    """The fixed part of btrfs_ioctl_search_args_v2; the result buffer follows it."""

    _fields_ = [("key", SearchKey), ("buf_size", ctypes.c_uint64)]


BTRFS_IOC_SUBVOL_CREATE = _ioc(_IOC_WRITE, 14, ctypes.sizeof(VolArgs))
BTRFS_IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, 15, ctypes.sizeof(VolArgs))
BTRFS_IOC_TREE_SEARCH_V2 = _ioc(_IOC_READ | _IOC_WRITE, 17, ctypes.sizeof(SearchArgsV2))
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


def _ioctl(
    fd: int, request: int, args: ctypes.Structure | memoryview, call: str
) -> None:
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


def filesystem_info(mount_point: str) -> FsInfoArgs:
    """Return the file system's UUID, node size and more (BTRFS_IOC_FS_INFO)."""
    args = FsInfoArgs()
    fd = _open_dir(mount_point)
    try:
        _ioctl(fd, BTRFS_IOC_FS_INFO, args, f"BTRFS_IOC_FS_INFO of {mount_point}")
    finally:
        os.close(fd)
    return args


def filesystem_id(mount_point: str) -> str:
    """Return the file system's UUID, the name of its directory in /sys/fs/btrfs."""
    return str(uuid.UUID(bytes=bytes(filesystem_info(mount_point).fsid)))


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


# Bytes of an item's header in the result buffer of a tree search.
_SEARCH_HEADER_BYTES = 32
# Bytes of btrfs_header and of btrfs_item, which a leaf stores besides item data.
_LEAF_HEADER_BYTES = 101
_ITEM_HEADER_BYTES = 25
_MAX_U64 = (1 << 64) - 1
_NR_ITEMS_OFFSET = SearchKey.nr_items.offset


def search_buffer_bytes(nodesize: int, limit: int) -> int:
    """Return the size of a search buffer with room for ``limit`` items of any size.

    An item's data is at most a leaf less its header and the item's own.
    """
    max_item = nodesize - _LEAF_HEADER_BYTES - _ITEM_HEADER_BYTES
    return ctypes.sizeof(SearchArgsV2) + limit * (_SEARCH_HEADER_BYTES + max_item)


def count_items(fd: int, tree_id: int, limit: int, buffer: memoryview) -> int:
    """Count the items of subvolume ``tree_id``'s tree up to ``limit``.

    ``fd`` is any descriptor on the file system, and ``buffer`` is writable
    and of search_buffer_bytes(nodesize, limit) bytes, so that the kernel
    stops at ``limit`` items or at the end of the tree, never at a full
    buffer. Needs CAP_SYS_ADMIN.
    """
    args = SearchArgsV2()
    args.key.tree_id = tree_id
    args.key.max_objectid = _MAX_U64
    args.key.max_offset = _MAX_U64
    args.key.max_transid = _MAX_U64
    args.key.max_type = 255
    args.key.nr_items = limit
    args.buf_size = len(buffer) - ctypes.sizeof(args)
    buffer[: ctypes.sizeof(args)] = bytes(args)
    _ioctl(
        fd, BTRFS_IOC_TREE_SEARCH_V2, buffer, f"BTRFS_IOC_TREE_SEARCH_V2 of {tree_id}"
    )
    return int.from_bytes(
        buffer[_NR_ITEMS_OFFSET : _NR_ITEMS_OFFSET + 4], sys.byteorder
    )
