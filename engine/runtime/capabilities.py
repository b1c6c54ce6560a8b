"""Capability sets of sandbox processes.

Sandbox processes run as root in their own user namespace, where the kernel
grants every capability. These capabilities act only on objects that the
sandbox's namespaces own, but they still open kernel code that unprivileged
callers cannot reach. The engine therefore keeps a small set, ``KEPT``, which
is Docker's default set without CAP_MKNOD and CAP_NET_RAW, and drops the rest.
The supervisor calls ``drop_bounding`` once, so no process it forks can regain
a dropped capability, and each exec'd child calls ``restrict`` before
``execve``. A program that uid 0 of the namespace executes then starts with
the bounding set as its permitted and effective sets.
"""

from __future__ import annotations

import errno
import logging
import os

from engine.errors import InvalidArgument
from engine.runtime import libc

logger = logging.getLogger(__name__)

# PR_CAP_AMBIENT sub-command from <linux/prctl.h>.
PR_CAP_AMBIENT_IS_SET = 1

# Reason for keeping each capability of KEPT.
_KEPT_REASONS: dict[str, str] = {
    "CAP_CHOWN": "package managers and archive tools change file owners",
    "CAP_DAC_OVERRIDE": "root expects to read and write files it does not own",
    "CAP_FOWNER": "root expects to chmod and utime files it does not own",
    "CAP_FSETID": "keeps set-user-ID bits when root modifies such a file",
    "CAP_KILL": "root signals processes of other users in the sandbox",
    "CAP_SETGID": "su, sudo and daemons switch groups",
    "CAP_SETUID": "su, sudo and daemons switch users",
    "CAP_SETPCAP": "programs drop their own capabilities and bounding set",
    "CAP_NET_BIND_SERVICE": "servers bind ports below 1024 in the sandbox's network",
    "CAP_SYS_CHROOT": "build tools chroot; the sandbox's root stays the outer limit",
    "CAP_AUDIT_WRITE": "login, sudo and sshd send audit records with it",
    "CAP_SETFCAP": "package managers set file capabilities (stored per user namespace)",
}

# Reason for dropping each other capability.
_DROPPED_REASONS: dict[str, str] = {
    "CAP_DAC_READ_SEARCH": "bypasses read checks, and open_by_handle_at(2) needs it",
    "CAP_LINUX_IMMUTABLE": "sets the immutable and append-only file flags",
    "CAP_NET_BROADCAST": "no program in the sandbox needs it",
    "CAP_NET_ADMIN": "the engine configures the sandbox's network, not sandbox code",
    "CAP_NET_RAW": "raw and packet sockets can forge any packet",
    "CAP_IPC_LOCK": "locks memory beyond RLIMIT_MEMLOCK",
    "CAP_IPC_OWNER": "bypasses System V IPC permission checks",
    "CAP_SYS_MODULE": "loads kernel modules",
    "CAP_SYS_RAWIO": "gives raw device and I/O port access",
    "CAP_SYS_PTRACE": "bypasses ptrace access checks (same-user ptrace still works)",
    "CAP_SYS_PACCT": "switches process accounting",
    "CAP_SYS_ADMIN": "mounts, namespaces and most administrative interfaces need it",
    "CAP_SYS_BOOT": "reboots or loads a new kernel",
    "CAP_SYS_NICE": "raises priorities and sets real-time scheduling, starving others",
    "CAP_SYS_RESOURCE": "raises resource limits above their hard limits",
    "CAP_SYS_TIME": "sets the system clocks, which are shared with the host",
    "CAP_SYS_TTY_CONFIG": "configures and hangs up terminals",
    "CAP_MKNOD": "creates device nodes; the engine provides /dev",
    "CAP_LEASE": "takes leases on files the process does not own",
    "CAP_AUDIT_CONTROL": "configures the kernel audit system",
    "CAP_MAC_OVERRIDE": "overrides mandatory access control (Smack)",
    "CAP_MAC_ADMIN": "configures mandatory access control",
    "CAP_SYSLOG": "reads the kernel log and kernel addresses",
    "CAP_WAKE_ALARM": "sets alarms that wake the host from suspend",
    "CAP_BLOCK_SUSPEND": "keeps the host from suspending",
    "CAP_AUDIT_READ": "reads the kernel audit log",
    "CAP_PERFMON": "opens performance monitoring, a side channel",
    "CAP_BPF": "loads BPF programs into the kernel",
    "CAP_CHECKPOINT_RESTORE": "chooses PIDs (set_tid, ns_last_pid), reads map_files",
}

# Capability numbers from <linux/capability.h>, in order (CAP_CHOWN is 0).
_KNOWN_NAMES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


def _read_last_cap() -> int:
    """Return the highest capability number that the running kernel supports."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            return int(file.read())
    except OSError as err:
        # /proc can be missing in a fresh mount namespace. PR_CAPBSET_READ
        # fails with EINVAL for a number above the kernel's last capability.
        logger.debug(
            "reading cap_last_cap failed (%s); probing with PR_CAPBSET_READ", err
        )
    number = 0
    while True:
        try:
            libc.prctl(libc.PR_CAPBSET_READ, number + 1)
        except OSError as probe_err:
            if probe_err.errno == errno.EINVAL:
                return number
            raise
        number += 1


LAST_CAP = _read_last_cap()

CAPABILITIES: dict[str, int] = {
    name: number for number, name in enumerate(_KNOWN_NAMES) if number <= LAST_CAP
}

KEPT: frozenset[str] = frozenset(_KEPT_REASONS)
"""Capabilities that sandbox processes keep inside their user namespace.

``_KEPT_REASONS`` and ``_DROPPED_REASONS`` give the reason for each capability.
"""


def _mask(keep: frozenset[str]) -> int:
    mask = 0
    for name in sorted(keep):
        if name not in CAPABILITIES:
            if name in _KNOWN_NAMES:
                raise InvalidArgument(
                    f"capability {name} is not supported by this kernel, whose "
                    f"last capability is {LAST_CAP}; remove it from the set"
                )
            raise InvalidArgument(
                f"unknown capability {name!r}; use names from <linux/capability.h> "
                f"such as CAP_CHOWN"
            )
        mask |= 1 << CAPABILITIES[name]
    return mask


KEPT_MASK = _mask(KEPT)
"""``KEPT`` as a bit mask, as engine-init takes it."""


def _label(number: int) -> str:
    return _KNOWN_NAMES[number] if number < len(_KNOWN_NAMES) else str(number)


def names(mask: int) -> list[str]:
    """Return the capability names for the bits of ``mask``, in number order.

    A bit without a known name, from a kernel newer than this module, appears as
    its decimal number, the way libcap prints it.
    """
    if mask < 0:
        raise InvalidArgument(
            f"invalid capability mask {mask}: it must not be negative"
        )
    return [_label(number) for number in range(mask.bit_length()) if mask >> number & 1]


def drop_bounding(keep: frozenset[str] = KEPT) -> None:
    """Drop every capability not in ``keep`` from the calling thread's bounding set.

    Every number up to the kernel's last capability is dropped, including those
    that this module has no name for. The drop is permanent for the thread and
    all its descendants. It needs CAP_SETPCAP and raises OSError naming the
    capability otherwise. The capabilities dropped before a failure stay dropped.
    """
    keep_mask = _mask(keep)
    for number in range(LAST_CAP + 1):
        if keep_mask >> number & 1:
            continue
        try:
            libc.prctl(libc.PR_CAPBSET_DROP, number)
        except OSError as err:
            call = f"prctl(PR_CAPBSET_DROP, {_label(number)})"
            raise OSError(
                err.errno, f"{call} failed: {os.strerror(err.errno)}"
            ) from err


def restrict(keep: frozenset[str] = KEPT) -> None:
    """Limit the calling thread to ``keep`` and clear its ambient and inheritable sets.

    The effective and permitted sets become ``keep`` intersected with the
    current permitted set, because capset(2) cannot add to the permitted set.
    The inheritable set becomes empty rather than ``keep``: with a non-empty
    inheritable set, a non-root process regains those capabilities by
    executing a file whose inheritable file capabilities include them.
    Raises OSError naming the prctl or capset call that failed.
    """
    keep_mask = _mask(keep)
    _, permitted, _ = libc.capget()
    target = keep_mask & permitted
    try:
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as err:
        call = "prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)"
        raise OSError(err.errno, f"{call} failed: {os.strerror(err.errno)}") from err
    libc.capset(target, target, 0)


def current() -> dict[str, int]:
    """Return the calling thread's capability sets as bit masks.

    The keys are "effective", "permitted", "inheritable", "bounding" and
    "ambient".
    """
    effective, permitted, inheritable = libc.capget()
    bounding = 0
    ambient = 0
    for number in range(LAST_CAP + 1):
        if libc.prctl(libc.PR_CAPBSET_READ, number):
            bounding |= 1 << number
        if libc.prctl(libc.PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, number):
            ambient |= 1 << number
    return {
        "effective": effective,
        "permitted": permitted,
        "inheritable": inheritable,
        "bounding": bounding,
        "ambient": ambient,
    }
