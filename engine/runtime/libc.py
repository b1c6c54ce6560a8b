"""Raw system call declarations through ctypes.

This module holds only declarations and thin wrappers. Every wrapper checks
the result and raises ``OSError(errno, "call(args) failed: strerror")`` so
that a failure names the call and the arguments that caused it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# Namespace flags from <linux/sched.h>.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# Mount flags from <linux/mount.h>.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

# prctl options from <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# System call numbers for x86_64; the engine runs only there (see seccomp.py).
SYS_pivot_root = 155
SYS_capget = 125
SYS_capset = 126
SYS_openat2 = 437

# The dirfd that makes *at(2) calls resolve from the cwd, from <fcntl.h>.
AT_FDCWD = -100

# openat2 resolve flags from <linux/openat2.h>.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, call: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call} failed: {os.strerror(err)}")
    return result


def _bytes(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return os.fsencode(value)


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """Call mount(2)."""
    call = f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})"
    _check(
        _libc.mount(
            _bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)
        ),
        call,
    )


def umount2(target: str | bytes, flags: int = 0) -> None:
    """Call umount2(2)."""
    _check(_libc.umount2(_bytes(target), flags), f"umount2({target!r}, {flags:#x})")


def unshare(flags: int) -> None:
    """Call unshare(2)."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Call setns(2)."""
    _check(_libc.setns(fd, nstype), f"setns({fd}, {nstype:#x})")


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    """Call pivot_root(2), which glibc does not wrap."""
    result = _libc.syscall(
        ctypes.c_long(SYS_pivot_root),
        ctypes.c_char_p(_bytes(new_root)),
        ctypes.c_char_p(_bytes(put_old)),
    )
    _check(result, f"pivot_root({new_root!r}, {put_old!r})")


def sethostname(name: str) -> None:
    """Call sethostname(2)."""
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname({name!r})")


def prctl(
    option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0
) -> int:
    """Call prctl(2) and return its non-negative result."""
    call = f"prctl({option}, {arg2}, {arg3}, {arg4}, {arg5})"
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), call)


def set_name(name: str) -> None:
    """Set the calling thread's name (PR_SET_NAME), truncated to 15 bytes."""
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    _check(
        _libc.prctl(PR_SET_NAME, ctypes.addressof(buffer), 0, 0, 0),
        f"prctl(PR_SET_NAME, {name!r})",
    )


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


# _LINUX_CAPABILITY_VERSION_3 uses two CapData structs for 64 capability bits.
CAPABILITY_VERSION_3 = 0x20080522


def capget(pid: int = 0) -> tuple[int, int, int]:
    """Return the effective, permitted and inheritable sets of ``pid``, 64 bits each."""
    header = CapHeader(CAPABILITY_VERSION_3, pid)
    data = (CapData * 2)()
    result = _libc.syscall(
        ctypes.c_long(SYS_capget), ctypes.byref(header), ctypes.byref(data)
    )
    _check(result, f"capget(pid={pid})")
    return tuple(  # type: ignore[return-value]
        getattr(data[0], name) | (getattr(data[1], name) << 32)
        for name in ("effective", "permitted", "inheritable")
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets from 64-bit masks."""
    header = CapHeader(CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    for index in range(2):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    result = _libc.syscall(
        ctypes.c_long(SYS_capset), ctypes.byref(header), ctypes.byref(data)
    )
    call = f"capset({effective:#x}, {permitted:#x}, {inheritable:#x})"
    _check(result, call)


class OpenHow(ctypes.Structure):
    """struct open_how of openat2(2)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(
    dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0
) -> int:
    """Call openat2(2), which glibc does not wrap, and return the new descriptor.

    With RESOLVE_IN_ROOT, ``path`` resolves as if ``dirfd`` were the root, so
    neither ".." nor a symlink, absolute or relative, leads out of it.
    """
    how = OpenHow(flags, mode, resolve)
    raw = _bytes(path)
    result = _libc.syscall(
        ctypes.c_long(SYS_openat2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(raw),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if result < 0:
        err = ctypes.get_errno()
        call = f"openat2({dirfd}, {path!r}, {flags:#x}, {mode:#o}, {resolve:#x})"
        raise OSError(err, f"{call} failed: {os.strerror(err)}")
    return result
