"""Loop devices: attach a regular file as a block device, without losetup.

The device is configured with LO_FLAGS_AUTOCLEAR, so the kernel detaches it
when the last mount of the file system on it goes away, in every mount
namespace, and the last open descriptor is closed. A crashed engine
therefore leaves no loop device once its mount is unmounted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

# From <linux/loop.h>.
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# LOOP_CTL_GET_FREE returns a free device, but another process can take it
# before LOOP_CONFIGURE; then LOOP_CONFIGURE fails with EBUSY and a new one is
# requested, this many times.
MAX_ATTACH_ATTEMPTS = 16


class LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


class LoopDevice:
    """An attached loop device, held open until ``close``.

    With LO_FLAGS_AUTOCLEAR the kernel detaches the device when its last
    opener closes it. The caller therefore mounts the device before calling
    ``close``, and the mount keeps it attached.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def attach(path: str) -> LoopDevice:
    """Attach the file at ``path`` read-write to a free loop device."""
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(MAX_ATTACH_ATTEMPTS):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device = _configure(f"/dev/loop{number}", backing, path)
                if device is not None:
                    return device
        finally:
            os.close(control)
    finally:
        # The loop device holds its own reference to the backing file.
        os.close(backing)
    raise OSError(
        errno.EBUSY,
        f"no free loop device after {MAX_ATTACH_ATTEMPTS} attempts for {path}",
    )


def _configure(device: str, backing: int, path: str) -> LoopDevice | None:
    """Configure ``device`` on ``backing``; return None if another process took it."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    config = LoopConfig()
    config.fd = backing
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR
    name = os.fsencode(path)[: LO_NAME_SIZE - 1]
    ctypes.memmove(config.info.lo_file_name, name, len(name))
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, config)
    except OSError as error:
        os.close(fd)
        if error.errno == errno.EBUSY:
            return None
        raise OSError(
            error.errno,
            f"LOOP_CONFIGURE of {device} on {path} failed: {error.strerror}",
        ) from None
    return LoopDevice(device, fd)


def backing_file(device: str) -> str | None:
    """Return the backing file of loop ``device`` as sysfs shows it, or None."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as file:
            return file.read().rstrip("\n")
    except FileNotFoundError:
        return None


def devices_backed_by(path: str) -> list[str]:
    """Return the loop devices whose backing file is ``path``."""
    found = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return found
    for name in sorted(names):
        if name.startswith("loop") and backing_file(name) == path:
            found.append(f"/dev/{name}")
    return found
