"""The sandbox's system call policy, compiled by libseccomp.

The policy is a deny-list: the filter allows every system call except those in
``POLICY``, which fail with EPERM, or with ENOSYS where callers are expected to
fall back to an older interface. A deny-list keeps ordinary programs working,
but a system call that the kernel adds after this table was written is allowed
until someone adds it here.

Architectures. The filter contains only the native x86_64 architecture, and its
bad-architecture action is KILL_PROCESS. An i386 system call, such as
``int 0x80`` from 64-bit code, therefore kills the whole process with SIGSYS
before the kernel runs it. x32 system calls use the x86_64 architecture value
with bit 0x40000000 set in the number. The x86_64 filter that libseccomp 2.5.4
generates starts with a check that sends every number at or above 0x40000000,
except -1, to the bad-architecture action. x32 calls are therefore killed the
same way, and this module needs no rule of its own for them.
tests/unit/test_seccomp.py checks both cases against the kernel. Killing gives
such a process a visible cause of death (SIGSYS) instead of errors it may not
expect. As a result, no 32-bit program can run in the sandbox.

The engine builds the filter once per supervisor with ``build_filter``,
compiles it with ``export_bpf``, and installs the compiled program in each
exec'd child with ``load_bpf`` right before ``execve``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from dataclasses import dataclass

import pyseccomp as seccomp

from engine.errors import FailedPrecondition, InvalidArgument, Unavailable
from engine.runtime import libc

logger = logging.getLogger(__name__)

# ioctl requests from <asm-generic/ioctls.h>.
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# personality(2) values from <linux/personality.h>.
PER_LINUX = 0x0000
PERSONALITY_QUERY = 0xFFFFFFFF

NAMESPACE_FLAGS = (
    libc.CLONE_NEWNS,
    libc.CLONE_NEWUTS,
    libc.CLONE_NEWIPC,
    libc.CLONE_NEWUSER,
    libc.CLONE_NEWPID,
    libc.CLONE_NEWNET,
    libc.CLONE_NEWCGROUP,
    libc.CLONE_NEWTIME,
)

_LOW_32_BITS = 0xFFFFFFFF

# prctl(2) and seccomp(2) constants from <linux/prctl.h> and <linux/seccomp.h>.
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# One struct sock_filter is 8 bytes, and the kernel accepts at most BPF_MAXINSNS
# instructions per program (<linux/bpf_common.h>).
_SOCK_FILTER_SIZE = 8
_BPF_MAXINSNS = 4096

# SCMP_FLTATR_CTL_OPTIMIZE value 2 makes libseccomp (2.5.0 and later) sort the
# syscall checks into a binary tree instead of a linear chain.
_OPTIMIZE_BINARY_TREE = 2

Comparisons = tuple[seccomp.Arg, ...]


@dataclass(frozen=True)
class AnyFlagSet:
    """Condition that argument ``arg`` has at least one of ``flags`` set.

    Each flag becomes its own masked comparison, because libseccomp ORs separate
    rules but cannot test "mask is not zero" in one comparison.
    """

    arg: int
    flags: tuple[int, ...]

    def comparisons(self) -> tuple[Comparisons, ...]:
        return tuple(
            (seccomp.Arg(self.arg, seccomp.MASKED_EQ, flag, flag),)
            for flag in self.flags
        )


@dataclass(frozen=True)
class Low32In:
    """Condition that the low 32 bits of argument ``arg`` equal one of ``values``.

    It is meant for arguments that the kernel declares as ``unsigned int``, so
    the upper 32 bits of the register cannot hide a match.
    """

    arg: int
    values: tuple[int, ...]

    def comparisons(self) -> tuple[Comparisons, ...]:
        return tuple(
            (seccomp.Arg(self.arg, seccomp.MASKED_EQ, _LOW_32_BITS, value),)
            for value in self.values
        )


@dataclass(frozen=True)
class Low32NotZeroOrAllOnes:
    """Condition that the low 32 bits of argument ``arg`` are neither 0 nor 0xffffffff.

    libseccomp allows one comparison per argument in a rule, so "not 0 and not
    0xffffffff" cannot be one rule. A 32-bit value is neither all zeros nor all
    ones exactly when some bit ``i`` is 1 and bit ``(i + 1) % 32`` is 0. Each of
    these 32 bit pairs becomes one masked comparison, and the rules are ORed.
    """

    arg: int

    def comparisons(self) -> tuple[Comparisons, ...]:
        rules = []
        for bit in range(32):
            low = 1 << bit
            high = 1 << ((bit + 1) % 32)
            rules.append((seccomp.Arg(self.arg, seccomp.MASKED_EQ, low | high, low),))
        return tuple(rules)


Condition = AnyFlagSet | Low32In | Low32NotZeroOrAllOnes


@dataclass(frozen=True)
class Rule:
    """Policy entry: system calls that fail with ``errno``, why, and a condition.

    Without a condition every call fails. With one, only calls whose arguments
    match it fail.
    """

    syscalls: tuple[str, ...]
    errno: int
    reason: str
    condition: Condition | None = None


POLICY: tuple[Rule, ...] = (
    Rule(
        (
            "mount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "open_tree_attr",
            "mount_setattr",
        ),
        errno.EPERM,
        "The mount tree is complete when sandbox code starts. Changing it could "
        "uncover the paths that the /proc masks cover or make read-only binds "
        "writable. CAP_SYS_ADMIN is dropped as well, so this rule is a second barrier.",
    ),
    Rule(
        ("unshare", "setns"),
        errno.EPERM,
        "A new user namespace grants every capability inside it, which opens kernel "
        "code that needs CAP_SYS_ADMIN to reach. setns could join a namespace "
        "reachable through an inherited file descriptor.",
    ),
    Rule(
        ("clone",),
        errno.EPERM,
        "clone(2) creates namespaces when its flags argument has a CLONE_NEW* bit, "
        "for the same reason as unshare. clone(2) reads bit 0x80 (CLONE_NEWTIME) as "
        "part of the exit signal, and no valid signal number has that bit, so "
        "rejecting it costs nothing. Calls without these bits (fork, threads) work.",
        AnyFlagSet(0, NAMESPACE_FLAGS),
    ),
    Rule(
        ("clone3",),
        errno.ENOSYS,
        "clone3(2) passes its flags in a struct in memory, which seccomp cannot read. "
        "On ENOSYS, glibc 2.34 and later fall back to clone(2), whose flags the "
        "rule above checks.",
    ),
    Rule(
        ("keyctl", "add_key", "request_key"),
        errno.EPERM,
        "Namespaces isolate the kernel keyrings only in part, and request_key(2) can "
        "run /sbin/request-key as root on the host through a usermode helper.",
    ),
    Rule(
        ("bpf",),
        errno.EPERM,
        "bpf(2) loads programs into the kernel, and its verifier is a large attack "
        "surface.",
    ),
    Rule(
        ("perf_event_open",),
        errno.EPERM,
        "perf_event_open(2) reveals kernel and hardware events that help "
        "side-channel attacks.",
    ),
    Rule(
        ("userfaultfd",),
        errno.EPERM,
        "userfaultfd(2) lets a process stall a kernel access to its memory for as "
        "long as it wants, which makes kernel race conditions easy to win.",
    ),
    Rule(
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
        errno.ENOSYS,
        "Operations submitted through an io_uring are not system calls, so this "
        "filter never checks them. On ENOSYS, runtimes that try io_uring fall back "
        "to ordinary system calls.",
    ),
    Rule(
        (
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
        ),
        errno.EPERM,
        "These calls load a new kernel or kernel modules, or remove modules.",
    ),
    Rule(
        ("open_by_handle_at", "name_to_handle_at"),
        errno.EPERM,
        "open_by_handle_at(2) opens a file from a handle without a path lookup, so it "
        "can reach files outside the sandbox's root on the same file system. "
        "name_to_handle_at(2) produces those handles.",
    ),
    Rule(
        ("reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd"),
        errno.EPERM,
        "System-wide administration that sandbox code has no use for.",
    ),
    Rule(
        ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
        errno.EPERM,
        "The system clocks are shared with the host, because time namespaces offset "
        "only CLOCK_MONOTONIC and CLOCK_BOOTTIME. The rule also rejects read-only "
        "adjtimex and clock_adjtime calls (modes 0).",
    ),
    Rule(
        ("personality",),
        errno.EPERM,
        "personality(2) can set flags that weaken memory protections: "
        "READ_IMPLIES_EXEC, MMAP_PAGE_ZERO and ADDR_NO_RANDOMIZE (so gdb cannot "
        "turn off ASLR). Only 0 (PER_LINUX) and 0xffffffff (the query) are allowed. "
        "PER_LINUX32 (8) is rejected as well, because no 32-bit program can run here. "
        "The kernel reads the argument as unsigned int, so the rule compares only "
        "its low 32 bits.",
        Low32NotZeroOrAllOnes(0),
    ),
    Rule(
        ("ioctl",),
        errno.EPERM,
        "TIOCSTI pushes bytes into a terminal's input queue, so a process that shares "
        "a terminal with a shell outside the sandbox could type commands into it. "
        "TIOCLINUX can paste a virtual console's selection into its input, which "
        "injects input the same way. The kernel reads the request as unsigned int, "
        "so the rule compares only its low 32 bits, and 0x100005412 matches too.",
        Low32In(1, (TIOCSTI, TIOCLINUX)),
    ),
    Rule(
        ("lookup_dcookie", "nfsservctl", "uselib"),
        errno.EPERM,
        "Obsolete interfaces (oprofile's directory cookies, the removed kernel NFS "
        "server control, a.out shared libraries) that no current userland uses.",
    ),
)
"""The policy, one entry per group of system calls that share an errno and a reason.

Calls that were considered and are allowed:

- chroot: CAP_SYS_CHROOT is kept. chroot cannot leave the sandbox's root,
  because pivot_root detached the host's root from the sandbox's mount namespace.
- ptrace, process_vm_readv, process_vm_writev, kcmp: these reach only processes
  that the caller may already control. The kernel's ptrace access check still
  applies, CAP_SYS_PTRACE is dropped, PID 1 is non-dumpable, and the supervisor
  is outside the sandbox's PID namespace.
- vm86, vm86old: these exist only in the i386 ABI, which the bad-architecture
  action rejects as a whole, so the x86_64 filter has no entry for them.
"""


# System calls that return 0 without running. sync(2) writes back the dirty
# data of every file system on the host. syncfs(2) does so for the file system
# of its argument, which for a volume is the host's own. Sandbox code could
# slow the host's and other sandboxes' disk I/O with either. The root overlay
# is volatile, so neither would make the sandbox's own files more durable, and
# fsync and fdatasync still act on one file.
NO_OPS: tuple[str, ...] = ("sync", "syncfs")


# x86_64 numbers of system calls newer than some libseccomp releases, from
# the kernel's arch/x86/entry/syscalls/syscall_64.tbl; libseccomp 2.5.4 does
# not know open_tree_attr (Linux 6.15).
NEWER_SYSCALLS = {"open_tree_attr": 467}


@functools.cache
def _resolved_policy() -> tuple[tuple[int, int, tuple[Comparisons, ...]], ...]:
    """Resolve POLICY and NO_OPS to (action, number, comparison sets), once per process.

    A name that libseccomp does not know for the native architecture is skipped
    with a warning, so an older libseccomp still builds a filter.
    """
    if seccomp.system_arch() != seccomp.Arch.X86_64:
        raise Unavailable(
            f"the seccomp policy supports only x86_64, but libseccomp reports native "
            f"architecture {seccomp.system_arch():#x}; run the engine on x86_64"
        )

    # An errno of 0 makes the kernel skip a NO_OPS call and return 0.
    entries = [
        (
            rule.errno,
            rule.syscalls,
            rule.condition.comparisons() if rule.condition else ((),),
        )
        for rule in POLICY
    ]
    entries.append((0, NO_OPS, ((),)))
    resolved = []
    for errno_value, names, comparison_sets in entries:
        for name in names:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number < 0:
                number = NEWER_SYSCALLS.get(name, -1)
            if number < 0:
                logger.warning(
                    "libseccomp does not know system call %s on x86_64, so the filter "
                    "does not block it; upgrade libseccomp",
                    name,
                )
                continue
            resolved.append((seccomp.ERRNO(errno_value), number, comparison_sets))
    return tuple(resolved)


def build_filter() -> seccomp.SyscallFilter:
    """Build the filter for POLICY, ready for ``load()`` or ``export_bpf``.

    The filter's no_new_privs attribute is left at libseccomp's default, so
    ``load()`` sets PR_SET_NO_NEW_PRIVS itself.
    """
    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    syscall_filter.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    syscall_filter.set_attr(seccomp.Attr.CTL_OPTIMIZE, _OPTIMIZE_BINARY_TREE)
    for action, number, comparison_sets in _resolved_policy():
        for comparisons in comparison_sets:
            syscall_filter.add_rule_exactly(action, number, *comparisons)
    return syscall_filter


def export_bpf(syscall_filter: seccomp.SyscallFilter) -> bytes:
    """Compile ``syscall_filter`` and return the program as struct sock_filter bytes."""
    fd = os.memfd_create("engine-seccomp-bpf", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b", buffering=0) as file:
        syscall_filter.export_bpf(file)
        file.seek(0)
        program = file.read()
    if not program or len(program) % _SOCK_FILTER_SIZE:
        raise OSError(
            errno.EINVAL,
            f"seccomp_export_bpf() returned {len(program)} bytes, which is not a "
            f"whole number of {_SOCK_FILTER_SIZE}-byte BPF instructions",
        )
    return program


class _SockFprog(ctypes.Structure):
    """struct sock_fprog from <linux/filter.h>."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_bpf(program: bytes) -> None:
    """Install a program from ``export_bpf`` as a seccomp filter of the calling thread.

    The caller must have set PR_SET_NO_NEW_PRIVS. This function checks it and
    raises FailedPrecondition otherwise, even for a caller with CAP_SYS_ADMIN
    that the kernel would let load without it. A malformed program raises
    InvalidArgument, and a kernel rejection raises OSError naming the prctl call.
    """
    count, remainder = divmod(len(program), _SOCK_FILTER_SIZE)
    if remainder or not 0 < count <= _BPF_MAXINSNS:
        raise InvalidArgument(
            f"invalid seccomp BPF program of {len(program)} bytes: expected 1 to "
            f"{_BPF_MAXINSNS} instructions of {_SOCK_FILTER_SIZE} bytes each, as "
            f"export_bpf() returns"
        )
    if libc.prctl(libc.PR_GET_NO_NEW_PRIVS) != 1:
        raise FailedPrecondition(
            "loading a seccomp filter requires no_new_privs; call "
            "prctl(PR_SET_NO_NEW_PRIVS, 1) first"
        )

    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.addressof(instructions))
    try:
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
    except OSError as err:
        raise OSError(
            err.errno,
            f"prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, <{count} BPF instructions>) "
            f"failed: {os.strerror(err.errno)}",
        ) from err
