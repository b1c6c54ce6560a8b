"""The file system of every sandbox's writable layer, with a disk limit each.

The host's file system may offer no per-directory quota. Project quotas
on ext4 need the project feature, a prjquota mount and a kernel built with
CONFIG_QFMT_V2, and on XFS a pquota mount and CONFIG_XFS_QUOTA, and the
engine must not remount the host's file systems. So the engine brings its
own file system: one sparse image file in the data dir, formatted as btrfs
when the engine starts, attached to a loop device and mounted on
``<data dir>/sandboxes``.

Each sandbox's directory there, with the overlay's upper and work dirs, is a
btrfs subvolume whose quota group has a limit on referenced bytes, data and
metadata together. Creating one takes three ioctls (create, look up its id,
set the limit) and no subprocess.

Sandbox code reaches its layer only through overlayfs, which passes no btrfs
ioctl to the file system below it, so it cannot create a subvolume, change
a limit or move a file out of its subvolume (rename between subvolumes fails
with EXDEV).

The layers do not outlive the engine: every sandbox is terminated when the
engine stops or found dead when it starts, so the image is formatted anew at
each start, and a mount that a crashed engine left is unmounted first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

from engine.errors import FailedPrecondition, Unavailable
from engine.runtime import btrfs, libc, loop

log = logging.getLogger(__name__)

IMAGE_NAME = "layers.img"
# Share of the data dir's free space that the layer file system gets when
# the configuration sets no size: the image is sparse, and the rest stays
# free for the database, images and volumes.
DEFAULT_FREE_SHARE = 0.9
# The smallest image the engine formats: room for btrfs's own trees and a few
# small sandboxes.
MIN_SIZE_BYTES = 256 * 1024 * 1024
# Seconds close() waits for the kernel to detach the loop device. Unmounting
# first writes back the file system's dirty pages, which after a large write
# takes seconds.
DETACH_TIMEOUT = 30.0
MOUNT_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOATIME
# discard=async returns freed blocks to the host as holes in the sparse image,
# and commit=5 (from 30 s) makes freed space and quota counts current sooner.
# nodatacow (which implies nodatasum) overwrites data in place without
# checksums, as the host's ext4 under the image does. A 1 GiB copy onto the
# layer ran at about 600 MiB/s with it and 400 MiB/s without it on a 2-core
# VM with Linux 6.18.
MOUNT_OPTIONS = "discard=async,commit=5,nodatacow"
# A layer whose subvolume has fewer items than this in its btrfs tree is
# small enough to delete on the event loop. Each inode has at least an inode
# item and a reference item, so deleting it evicts fewer than 64 inodes. A
# new sandbox's layer has about 40 items (its /etc files and overlayfs's work
# dir), and each further file adds two to four.
SMALL_LAYER_ITEMS = 128
# The directories of each layer: the overlay's mount point, upper and work dirs.
LAYER_DIRS = ("root", "upper", "work")
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class LayerStore:
    """The btrfs file system of the writable layers, mounted at ``mount_point``."""

    def __init__(
        self, data_dir: Path, mount_point: Path, size_bytes: int | None = None
    ) -> None:
        self.image_path = data_dir / IMAGE_NAME
        # Where the file system is mounted, in the namespace of the processes
        # that build sandboxes.
        self.mount_point = mount_point
        # The path through which this process reaches it; see hand_off.
        self.path = mount_point
        # An open descriptor of ``path`` while mounted. The calls of create
        # and remove go through it, because resolving /proc/PID/root/... for
        # each call costs a walk of every component.
        self._dir_fd: int | None = None
        # The result buffer of is_small's tree search, mapped while mounted.
        # The kernel touches only the pages it writes.
        self._search_buffer: mmap.mmap | None = None
        self._search_lock = threading.Lock()
        self.size_bytes = size_bytes
        self._fs_id: str | None = None
        # Sandbox id -> subvolume id, for the sandboxes whose layer exists.
        self._subvolumes: dict[str, int] = {}

    @property
    def mounted(self) -> bool:
        return self._fs_id is not None

    def sweep(self) -> None:
        """Unmount what a crashed engine left at the mount point.

        The loop device under it detaches by itself once the mount namespaces
        of that engine's sandboxes are gone too (LO_FLAGS_AUTOCLEAR).
        """
        while is_mount_point(self.mount_point):
            log.warning("unmounting leftover layer file system %s", self.mount_point)
            libc.umount2(str(self.mount_point), libc.MNT_DETACH)

    def start(self) -> None:
        """Format a new image, attach it, mount it and enable quotas."""
        self.sweep()
        size = self.size_bytes or self._default_size()
        if size < MIN_SIZE_BYTES:
            raise Unavailable(
                f"the layer file system needs at least {MIN_SIZE_BYTES >> 20} MiB "
                f"but gets {size >> 20} MiB; free space on the file system of "
                f"{self.image_path.parent} or set a larger layer size"
            )
        with contextlib.suppress(FileNotFoundError):
            self.image_path.unlink()
        fd = os.open(
            self.image_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            self._format()
            self._attach_and_mount()
        except BaseException:
            self.image_path.unlink(missing_ok=True)
            raise
        try:
            btrfs.enable_quota(str(self.mount_point))
            os.chmod(self.mount_point, 0o711)
            self._dir_fd = os.open(self.mount_point, _DIRECTORY_FLAGS)
            info = btrfs.filesystem_info(str(self.mount_point))
            self._search_buffer = mmap.mmap(
                -1, btrfs.search_buffer_bytes(info.nodesize, SMALL_LAYER_ITEMS)
            )
            self._fs_id = str(uuid.UUID(bytes=bytes(info.fsid)))
        except OSError as error:
            self._unmount()
            raise Unavailable(
                f"cannot enable quotas on the layer file system: {error.strerror};"
                " the kernel needs btrfs quota groups (Linux 6.7 or later for"
                " simple quotas)"
            ) from error
        except BaseException:
            self._unmount()
            raise
        log.info(
            "layer file system of %d MiB mounted on %s", size >> 20, self.mount_point
        )

    def hand_off(self, holder_pid: int) -> None:
        """Leave the file system to the mount namespace of ``holder_pid``.

        The holder (the zygote) keeps a private copy of the mount. This
        process unmounts its own and reaches the file system through
        /proc/PID/root from then on, so no later copy of the host's mount
        namespace, such as another engine's supervisor, keeps the loop
        device attached.
        """
        path = Path(f"/proc/{holder_pid}/root{self.mount_point}")
        try:
            fd = os.open(path, _DIRECTORY_FLAGS)
        except OSError as error:
            raise Unavailable(
                f"the layer file system is not mounted in pid {holder_pid}:"
                f" {path}: {error.strerror}"
            ) from error
        # The old descriptor would keep this process's mount alive.
        if self._dir_fd is not None:
            os.close(self._dir_fd)
        self._dir_fd = fd
        self.path = path
        libc.umount2(str(self.mount_point), libc.MNT_DETACH)
        log.info(
            "layer file system handed to the mount namespace of pid %d", holder_pid
        )

    def real_path(self, sandbox_id: str) -> Path:
        """Return the sandbox's layer dir as the holder's namespace names it."""
        return self.mount_point / sandbox_id

    def _attach_and_mount(self) -> None:
        try:
            device = loop.attach(str(self.image_path))
        except OSError as error:
            raise Unavailable(
                f"cannot attach {self.image_path} to a loop device:"
                f" {error.strerror}; the engine needs /dev/loop-control and the"
                " loop driver (modprobe loop) for the sandboxes' disk limits"
            ) from error
        with device:
            try:
                libc.mount(
                    device.path,
                    str(self.mount_point),
                    "btrfs",
                    MOUNT_FLAGS,
                    MOUNT_OPTIONS,
                )
            except OSError as error:
                raise Unavailable(
                    f"cannot mount the layer file system from {device.path} on"
                    f" {self.mount_point}: {error.strerror}; the kernel needs"
                    " btrfs (modprobe btrfs)"
                ) from error

    def _default_size(self) -> int:
        stat = os.statvfs(self.image_path.parent)
        free = stat.f_bavail * stat.f_frsize
        return int(free * DEFAULT_FREE_SHARE) // 4096 * 4096

    def _format(self) -> None:
        # Metadata is kept single: the layers are rebuilt at every start, so
        # a second copy of each tree block would protect nothing worth it.
        command = [
            "mkfs.btrfs",
            "--quiet",
            "--force",
            "--metadata",
            "single",
            "--data",
            "single",
            str(self.image_path),
        ]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
        except FileNotFoundError:
            raise Unavailable(
                "mkfs.btrfs is not installed, and the engine needs it for the "
                "sandboxes' disk limits; run `apt-get install btrfs-progs` "
                "(scripts/install.sh does)"
            ) from None
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip()[:500]
            raise Unavailable(f"mkfs.btrfs {self.image_path} failed: {message}")

    def create(self, sandbox_id: str, disk_mib: int, uid: int = 0) -> Path:
        """Create a sandbox's layer, limited to ``disk_mib`` MiB, with LAYER_DIRS.

        The layer's directory is mode 0700, and it and LAYER_DIRS belong to
        host uid ``uid``, the sandbox's supervisor, which mounts the overlay.
        """
        if not self.mounted:
            raise Unavailable("the layer file system is not mounted; start the engine")
        parent = str(self.path)
        subvolume = btrfs.create_subvolume(parent, sandbox_id, self._dir_fd)
        self._subvolumes[sandbox_id] = subvolume
        try:
            btrfs.limit_referenced(parent, subvolume, disk_mib << 20, self._dir_fd)
            self._make_dirs(sandbox_id, uid)
        except OSError:
            self.remove(sandbox_id)
            raise
        return self.path / sandbox_id

    def _make_dirs(self, sandbox_id: str, uid: int) -> None:
        fd = os.open(sandbox_id, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=self._dir_fd)
        try:
            os.fchmod(fd, 0o700)
            os.fchown(fd, uid, uid)
            for name in LAYER_DIRS:
                os.mkdir(name, 0o755, dir_fd=fd)
                os.chown(name, uid, uid, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)

    def limit(self, sandbox_id: str, disk_mib: int) -> None:
        """Change the disk limit of a sandbox's layer to ``disk_mib`` MiB."""
        subvolume = self._subvolumes.get(sandbox_id)
        if subvolume is None:
            raise FailedPrecondition(f"sandbox {sandbox_id} has no writable layer")
        btrfs.limit_referenced(str(self.path), subvolume, disk_mib << 20, self._dir_fd)

    def remove(self, sandbox_id: str) -> bool:
        """Delete a sandbox's layer with its files and quota group, if it exists.

        Returns False if the store has no layer of that id: none was
        created, or it is removed already. The caller makes sure no mount
        uses the layer any more: the overlay lives in the sandbox's mount
        namespace and goes with its last process.
        """
        subvolume = self._subvolumes.pop(sandbox_id, None)
        if subvolume is None:
            return False
        parent = str(self.path)
        with contextlib.suppress(FileNotFoundError):
            btrfs.delete_subvolume(parent, sandbox_id, self._dir_fd)
        # The quota group stays until the kernel's cleaner has freed the
        # subvolume's extents. An empty leftover group costs one tree item,
        # and the next start formats the file system anew.
        with contextlib.suppress(OSError):
            btrfs.remove_qgroup(parent, subvolume, self._dir_fd)
        return True

    def is_small(self, sandbox_id: str) -> bool:
        """Return whether the sandbox's layer has under SMALL_LAYER_ITEMS tree items.

        False if the store has no layer of that id or the search fails.
        """
        subvolume = self._subvolumes.get(sandbox_id)
        if subvolume is None or self._dir_fd is None or self._search_buffer is None:
            return False
        try:
            with self._search_lock, memoryview(self._search_buffer) as buffer:
                items = btrfs.count_items(
                    self._dir_fd, subvolume, SMALL_LAYER_ITEMS, buffer
                )
        except OSError as error:
            log.warning(
                "counting the items of layer %s failed, so it is deleted in a"
                " thread: %s",
                sandbox_id,
                error,
            )
            return False
        return items < SMALL_LAYER_ITEMS

    def used_bytes(self, sandbox_id: str) -> int:
        """Return the bytes charged to a sandbox's layer, committed or not."""
        subvolume = self._subvolumes.get(sandbox_id)
        if subvolume is None or self._fs_id is None:
            raise FailedPrecondition(f"sandbox {sandbox_id} has no writable layer")
        try:
            return btrfs.charged_bytes(self._fs_id, subvolume)
        except FileNotFoundError:
            # The sandbox is being terminated and its quota group is gone.
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is terminating; create a new one"
            ) from None

    def close(self) -> None:
        """Unmount the file system, wait for its loop device to detach, drop the image.

        The caller has terminated every sandbox and stopped the zygote first,
        because a supervisor's mount namespace keeps the file system mounted.
        """
        if not self.mounted:
            return
        self._unmount()

    def _unmount(self) -> None:
        self._fs_id = None
        self._subvolumes.clear()
        self.path = self.mount_point
        # The descriptor keeps the file system, and so its loop device, alive.
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        if self._search_buffer is not None:
            with self._search_lock:
                self._search_buffer.close()
                self._search_buffer = None
        try:
            libc.umount2(str(self.mount_point), libc.MNT_DETACH)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
        image = str(self.image_path)
        deadline = time.monotonic() + DETACH_TIMEOUT
        while loop.devices_backed_by(image) and time.monotonic() < deadline:
            time.sleep(0.01)
        devices = loop.devices_backed_by(image)
        if devices:
            log.warning(
                "loop device %s of %s is still attached %.0f s after the unmount;"
                " a process outside the engine may hold the layer file system",
                ", ".join(devices),
                image,
                DETACH_TIMEOUT,
            )
        self.image_path.unlink(missing_ok=True)


def is_mount_point(path: Path) -> bool:
    """Return whether ``path`` is a mount point in this process's mount namespace."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as file:
        for line in file:
            fields = line.split(b" ")
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """Decode the octal escapes (\\040 for a space) of a mountinfo path."""
    if b"\\" not in field:
        return field
    out = bytearray()
    index = 0
    while index < len(field):
        if field[index : index + 1] == b"\\" and field[index + 1 : index + 4].isdigit():
            out.append(int(field[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return bytes(out)
