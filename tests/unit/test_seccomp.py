"""The seccomp policy against the running kernel.

Each test forks a child of the test process. The child sets PR_SET_NO_NEW_PRIVS,
loads the filter either through libseccomp (``build_filter().load()``) or as the
precompiled program (``load_bpf``), makes raw system calls with ctypes and sends
the results back through a pipe. The tests run as root, so the kernel's own
permission checks pass, and an EPERM comes from the filter. The control tests
make the same calls without the filter and must see a different result.

Every call uses arguments that the kernel rejects or that change only the
child, so a filter that fails to block a call still leaves the host unchanged.
System call numbers are those of the x86_64 table in the kernel source
(arch/x86/entry/syscalls/syscall_64.tbl), written out here so that the test
does not depend on libseccomp's table.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyseccomp
import pytest

from engine.errors import FailedPrecondition, InvalidArgument
from engine.runtime import libc, seccomp

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100
CLONE_SIGHAND = 0x00000800
CLOCK_REALTIME = 0
PER_BSD = 0x0006
PER_LINUX32 = 0x0008
ADDR_NO_RANDOMIZE = 0x0040000
TIOCGWINSZ = 0x5413
KCMP_VM = 1
X32_SYSCALL_BIT = 0x40000000
SYS_getpid = 39
SYS_chroot = 161
SYS_kcmp = 312
SYS_personality = 135
SYS_ioctl = 16
MISSING_PATH = b"/nonexistent-engine-seccomp-test"
HIGH_BIT = 1 << 32
MODES = ("libseccomp", "bpf")


@dataclass
class Context:
    """Resources that the child opens before it loads the filter."""

    directory: bytes
    pty_master: int
    pty_slave: int


@dataclass(frozen=True)
class Case:
    """Blocked call: syscall name, x86_64 number, arguments and the expected errno."""

    id: str
    syscall: str
    number: int
    args: Callable[[Context], tuple[Any, ...]]
    errno: int


def _timeval(seconds: int, microseconds: int) -> ctypes.Array[ctypes.c_long]:
    return (ctypes.c_long * 2)(seconds, microseconds)


def _timex() -> ctypes.Array[ctypes.c_char]:
    # struct timex is 208 bytes on x86_64; modes 0 makes the call a read-only query.
    return ctypes.create_string_buffer(512)


def _char(value: bytes) -> Any:
    return ctypes.byref(ctypes.c_char(value))


def _clone_case(name: str, flag: int) -> Case:
    # CLONE_SIGHAND without CLONE_VM makes the kernel return EINVAL before it
    # creates anything, so an unfiltered call cannot start a second process.
    return Case(
        f"clone-{name}",
        "clone",
        56,
        lambda _: (flag | CLONE_SIGHAND, 0, 0, 0, 0),
        errno.EPERM,
    )


EPERM = errno.EPERM
ENOSYS = errno.ENOSYS

CASES: tuple[Case, ...] = (
    Case(
        "mount",
        "mount",
        165,
        lambda _: (b"none", MISSING_PATH, b"tmpfs", 0, None),
        EPERM,
    ),
    Case("umount2", "umount2", 166, lambda ctx: (ctx.directory, 0), EPERM),
    Case(
        "pivot_root", "pivot_root", 155, lambda _: (MISSING_PATH, MISSING_PATH), EPERM
    ),
    Case("fsopen", "fsopen", 430, lambda _: (b"engine-no-such-fs", 0), EPERM),
    Case("fsconfig", "fsconfig", 431, lambda _: (-1, 0, None, None, 0), EPERM),
    Case("fsmount", "fsmount", 432, lambda _: (-1, 0, 0), EPERM),
    Case("fspick", "fspick", 433, lambda _: (AT_FDCWD, MISSING_PATH, 0), EPERM),
    Case(
        "move_mount",
        "move_mount",
        429,
        lambda _: (AT_FDCWD, MISSING_PATH, AT_FDCWD, MISSING_PATH, 0),
        EPERM,
    ),
    Case("open_tree", "open_tree", 428, lambda _: (AT_FDCWD, MISSING_PATH, 0), EPERM),
    Case(
        "open_tree_attr",
        "open_tree_attr",
        467,
        lambda _: (AT_FDCWD, MISSING_PATH, 0, None, 0),
        EPERM,
    ),
    Case(
        "mount_setattr",
        "mount_setattr",
        442,
        lambda _: (AT_FDCWD, MISSING_PATH, 0, None, 0),
        EPERM,
    ),
    Case("unshare-newuser", "unshare", 272, lambda _: (libc.CLONE_NEWUSER,), EPERM),
    Case("setns", "setns", 308, lambda _: (-1, 0), EPERM),
    _clone_case("newns", libc.CLONE_NEWNS),
    _clone_case("newuts", libc.CLONE_NEWUTS),
    _clone_case("newipc", libc.CLONE_NEWIPC),
    _clone_case("newuser", libc.CLONE_NEWUSER),
    _clone_case("newpid", libc.CLONE_NEWPID),
    _clone_case("newnet", libc.CLONE_NEWNET),
    _clone_case("newcgroup", libc.CLONE_NEWCGROUP),
    _clone_case("newtime", libc.CLONE_NEWTIME),
    _clone_case("newns-high-bits", HIGH_BIT | libc.CLONE_NEWNS),
    Case("clone3", "clone3", 435, lambda _: (None, 0), ENOSYS),
    Case("keyctl", "keyctl", 250, lambda _: (0x7FFFFFFF, 0, 0, 0, 0), EPERM),
    Case(
        "add_key",
        "add_key",
        248,
        lambda _: (b"engine-no-such-type", b"engine-test", None, 0, 0),
        EPERM,
    ),
    Case(
        "request_key",
        "request_key",
        249,
        lambda _: (b"engine-no-such-type", b"engine-test", None, 0),
        EPERM,
    ),
    Case("bpf", "bpf", 321, lambda _: (0x7FFFFFFF, None, 0), EPERM),
    Case(
        "perf_event_open", "perf_event_open", 298, lambda _: (None, 0, -1, -1, 0), EPERM
    ),
    Case("userfaultfd", "userfaultfd", 323, lambda _: (0xFFFFFFFF,), EPERM),
    Case("io_uring_setup", "io_uring_setup", 425, lambda _: (0, None), ENOSYS),
    Case(
        "io_uring_enter",
        "io_uring_enter",
        426,
        lambda _: (-1, 0, 0, 0, None, 0),
        ENOSYS,
    ),
    Case(
        "io_uring_register",
        "io_uring_register",
        427,
        lambda _: (-1, 0, None, 0),
        ENOSYS,
    ),
    Case("kexec_load", "kexec_load", 246, lambda _: (0, 0, None, 0xFFFF0000), EPERM),
    Case(
        "kexec_file_load",
        "kexec_file_load",
        320,
        lambda _: (-1, -1, 0, None, 0xFFFFFFFF),
        EPERM,
    ),
    Case("init_module", "init_module", 175, lambda _: (None, 0, b""), EPERM),
    Case("finit_module", "finit_module", 313, lambda _: (-1, b"", 0), EPERM),
    Case(
        "delete_module",
        "delete_module",
        176,
        lambda _: (b"engine_no_such_module", 0),
        EPERM,
    ),
    Case("open_by_handle_at", "open_by_handle_at", 304, lambda _: (-1, None, 0), EPERM),
    Case(
        "name_to_handle_at",
        "name_to_handle_at",
        303,
        lambda _: (AT_FDCWD, MISSING_PATH, None, None, 0),
        EPERM,
    ),
    # magic1 = 0 is not LINUX_REBOOT_MAGIC1, so the kernel returns EINVAL.
    Case("reboot", "reboot", 169, lambda _: (0, 0, 0, None), EPERM),
    Case("swapon", "swapon", 167, lambda _: (MISSING_PATH, 0), EPERM),
    Case("swapoff", "swapoff", 168, lambda _: (MISSING_PATH,), EPERM),
    Case("acct", "acct", 163, lambda _: (MISSING_PATH + b"/acct",), EPERM),
    # Quota type 0xff is above MAXQUOTAS, so the kernel returns EINVAL.
    Case("quotactl", "quotactl", 179, lambda _: (0xFF, None, 0, None), EPERM),
    Case("quotactl_fd", "quotactl_fd", 443, lambda _: (-1, 0xFF, 0, None), EPERM),
    # tv_usec and tv_nsec out of range make the kernel return EINVAL.
    Case(
        "settimeofday",
        "settimeofday",
        164,
        lambda _: (_timeval(0, 2_000_000), None),
        EPERM,
    ),
    Case(
        "clock_settime",
        "clock_settime",
        227,
        lambda _: (CLOCK_REALTIME, _timeval(0, 2_000_000_000)),
        EPERM,
    ),
    Case(
        "clock_adjtime",
        "clock_adjtime",
        305,
        lambda _: (CLOCK_REALTIME, _timex()),
        EPERM,
    ),
    Case("adjtimex", "adjtimex", 159, lambda _: (_timex(),), EPERM),
    Case(
        "personality-bsd", "personality", SYS_personality, lambda _: (PER_BSD,), EPERM
    ),
    Case(
        "personality-linux32",
        "personality",
        SYS_personality,
        lambda _: (PER_LINUX32,),
        EPERM,
    ),
    Case(
        "personality-addr-no-randomize",
        "personality",
        SYS_personality,
        lambda _: (ADDR_NO_RANDOMIZE,),
        EPERM,
    ),
    Case(
        "personality-bsd-high-bits",
        "personality",
        SYS_personality,
        lambda _: (HIGH_BIT | PER_BSD,),
        EPERM,
    ),
    Case(
        "ioctl-tiocsti",
        "ioctl",
        SYS_ioctl,
        lambda ctx: (ctx.pty_slave, seccomp.TIOCSTI, _char(b"x")),
        EPERM,
    ),
    Case(
        "ioctl-tiocsti-high-bits",
        "ioctl",
        SYS_ioctl,
        lambda ctx: (ctx.pty_slave, HIGH_BIT | seccomp.TIOCSTI, _char(b"x")),
        EPERM,
    ),
    Case(
        "ioctl-tioclinux",
        "ioctl",
        SYS_ioctl,
        lambda ctx: (ctx.pty_slave, seccomp.TIOCLINUX, _char(b"\x00")),
        EPERM,
    ),
    Case("lookup_dcookie", "lookup_dcookie", 212, lambda _: (0, None, 0), EPERM),
    Case("nfsservctl", "nfsservctl", 180, lambda _: (0, None, None), EPERM),
    Case("uselib", "uselib", 134, lambda _: (MISSING_PATH,), EPERM),
)


def _argument(value: Any) -> Any:
    if isinstance(value, int):
        return ctypes.c_ulong(value & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(value, bytes):
        return ctypes.c_char_p(value)
    if value is None:
        return ctypes.c_void_p(None)
    return value


def _raw_syscall(number: int, *args: Any) -> dict[str, int]:
    """Make system call ``number`` and return its result and errno (0 on success)."""
    converted = [_argument(value) for value in args]
    ctypes.set_errno(0)
    result = _libc.syscall(ctypes.c_long(number), *converted)
    return {"result": result, "errno": ctypes.get_errno() if result == -1 else 0}


@dataclass
class ChildOutcome:
    """How a forked child ended: its wait status and the JSON value it sent, if any."""

    status: int
    payload: Any

    @property
    def killed_by(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None


def _run_in_child(body: Callable[[], Any]) -> ChildOutcome:
    """Run ``body`` in a forked child and return its wait status and JSON result.

    The child never returns into pytest. It sets RLIMIT_CORE to 0, so a child
    killed by SIGSYS writes no core file.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        exit_code = 1
        try:
            os.close(read_fd)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            message = json.dumps({"value": body()})
            exit_code = 0
        except BaseException:
            message = json.dumps({"exception": traceback.format_exc()})
        finally:
            try:
                os.write(write_fd, message.encode())
            finally:
                os._exit(exit_code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    decoded = json.loads(data) if data else {}
    assert "exception" not in decoded, decoded["exception"]
    return ChildOutcome(status, decoded.get("value"))


def _load(mode: str, program: bytes) -> None:
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    if mode == "libseccomp":
        seccomp.build_filter().load()
    elif mode == "bpf":
        seccomp.load_bpf(program)
    else:
        raise ValueError(f"unknown filter mode {mode!r}")


def _open_context(directory: str) -> Context:
    master, slave = os.openpty()
    return Context(os.fsencode(directory), master, slave)


@pytest.fixture(scope="module")
def program() -> bytes:
    return seccomp.export_bpf(seccomp.build_filter())


@pytest.fixture
def scratch_dir() -> Iterator[str]:
    """Empty directory that is not a mount point, for umount2."""
    path = tempfile.mkdtemp(prefix="engine-seccomp-")
    try:
        yield path
    finally:
        shutil.rmtree(path)


# Policy table


def test_policy_errnos_are_eperm_or_enosys() -> None:
    for rule in seccomp.POLICY:
        assert rule.errno in (errno.EPERM, errno.ENOSYS), rule


def test_policy_enosys_only_for_fallbacks() -> None:
    enosys = {
        name
        for rule in seccomp.POLICY
        if rule.errno == errno.ENOSYS
        for name in rule.syscalls
    }
    assert enosys == {"clone3", "io_uring_setup", "io_uring_enter", "io_uring_register"}


def test_policy_rules_have_reasons() -> None:
    for rule in seccomp.POLICY:
        assert rule.reason.strip(), rule


def test_policy_lists_each_syscall_once() -> None:
    names = [name for rule in seccomp.POLICY for name in rule.syscalls]
    assert len(names) == len(set(names))


def test_policy_keeps_chroot_and_ptrace() -> None:
    names = {name for rule in seccomp.POLICY for name in rule.syscalls}
    for allowed in ("chroot", "ptrace", "process_vm_writev", "kcmp"):
        assert allowed not in names


def _number(name: str) -> int:
    """Return libseccomp's number for ``name``, or the engine's own for newer calls."""
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return number if number >= 0 else seccomp.NEWER_SYSCALLS.get(name, -1)


def test_policy_syscalls_known_to_libseccomp() -> None:
    for rule in seccomp.POLICY:
        for name in rule.syscalls:
            assert _number(name) >= 0, name


def test_cases_cover_every_policy_syscall() -> None:
    policy = {name for rule in seccomp.POLICY for name in rule.syscalls}
    assert {case.syscall for case in CASES} == policy


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_case_number_matches_libseccomp(case: Case) -> None:
    assert _number(case.syscall) == case.number


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_case_errno_matches_policy(case: Case) -> None:
    rule = next(rule for rule in seccomp.POLICY if case.syscall in rule.syscalls)
    assert case.errno == rule.errno


# Blocked calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_filter_blocks(case: Case, mode: str, program: bytes, scratch_dir: str) -> None:
    def body() -> dict[str, int]:
        context = _open_context(scratch_dir)
        _load(mode, program)
        return _raw_syscall(case.number, *case.args(context))

    outcome = _run_in_child(body)
    assert outcome.killed_by is None
    assert outcome.payload["result"] == -1
    assert outcome.payload["errno"] == case.errno, errno.errorcode.get(
        outcome.payload["errno"]
    )


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_unfiltered_call_differs(case: Case, scratch_dir: str) -> None:
    """Without the filter, the kernel gives a result other than the filter's errno."""

    def body() -> dict[str, int]:
        context = _open_context(scratch_dir)
        return _raw_syscall(case.number, *case.args(context))

    outcome = _run_in_child(body)
    assert outcome.killed_by is None
    filtered = {"result": -1, "errno": case.errno}
    assert outcome.payload != filtered


def test_unfiltered_umount2_is_einval(scratch_dir: str) -> None:
    outcome = _run_in_child(lambda: _raw_syscall(166, os.fsencode(scratch_dir), 0))
    assert outcome.payload == {"result": -1, "errno": errno.EINVAL}


def test_unfiltered_reboot_is_einval() -> None:
    outcome = _run_in_child(lambda: _raw_syscall(169, 0, 0, 0, None))
    assert outcome.payload == {"result": -1, "errno": errno.EINVAL}


def test_unfiltered_clone3_is_einval() -> None:
    outcome = _run_in_child(lambda: _raw_syscall(435, None, 0))
    assert outcome.payload == {"result": -1, "errno": errno.EINVAL}


def test_unfiltered_tiocsti_succeeds(scratch_dir: str) -> None:
    def body() -> dict[str, int]:
        context = _open_context(scratch_dir)
        return _raw_syscall(SYS_ioctl, context.pty_slave, seccomp.TIOCSTI, _char(b"x"))

    outcome = _run_in_child(body)
    assert outcome.payload == {"result": 0, "errno": 0}


# Allowed calls


@pytest.mark.parametrize("mode", MODES)
def test_filter_allows_ordinary_calls(
    mode: str, program: bytes, scratch_dir: str
) -> None:
    def body() -> dict[str, Any]:
        context = _open_context(scratch_dir)
        _load(mode, program)
        return {
            "getpid": _raw_syscall(SYS_getpid)["result"] == os.getpid(),
            "personality-linux": _raw_syscall(SYS_personality, seccomp.PER_LINUX),
            "personality-query": _raw_syscall(
                SYS_personality, seccomp.PERSONALITY_QUERY
            ),
            "personality-query-sign-extended": _raw_syscall(SYS_personality, -1),
            "tiocgwinsz": _raw_syscall(
                SYS_ioctl, context.pty_slave, TIOCGWINSZ, ctypes.create_string_buffer(8)
            ),
            "chroot": _raw_syscall(SYS_chroot, b"/"),
            "kcmp": _raw_syscall(SYS_kcmp, os.getpid(), os.getpid(), KCMP_VM, 0, 0),
        }

    outcome = _run_in_child(body)
    results = outcome.payload
    assert results["getpid"] is True
    assert results["personality-linux"]["errno"] == 0
    assert results["personality-query"]["errno"] == 0
    assert results["personality-query-sign-extended"]["errno"] == 0
    assert results["tiocgwinsz"] == {"result": 0, "errno": 0}
    assert results["chroot"] == {"result": 0, "errno": 0}
    assert results["kcmp"] == {"result": 0, "errno": 0}


@pytest.mark.parametrize("mode", MODES)
def test_filter_skips_syncfs(mode: str, program: bytes) -> None:
    """syncfs on a closed descriptor fails with EBADF, unless the filter skips it."""
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "syncfs")
    unfiltered = _raw_syscall(number, closed)

    def body() -> dict[str, int]:
        _load(mode, program)
        return _raw_syscall(number, closed)

    outcome = _run_in_child(body)
    assert unfiltered == {"result": -1, "errno": errno.EBADF}
    assert outcome.killed_by is None
    assert outcome.payload == {"result": 0, "errno": 0}


def test_no_op_calls_known_to_libseccomp() -> None:
    for name in seccomp.NO_OPS:
        assert _number(name) >= 0, name


@pytest.mark.parametrize("mode", MODES)
def test_filter_allows_fork_threads_exec(mode: str, program: bytes) -> None:
    """fork uses clone(2) without namespace flags, and threads fall back to clone."""

    def body() -> dict[str, Any]:
        _load(mode, program)

        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)

        ran = []
        thread = threading.Thread(target=lambda: ran.append(True))
        thread.start()
        thread.join()

        true = subprocess.run(["/bin/true"], check=False)
        return {
            "fork_exit": os.waitstatus_to_exitcode(status),
            "thread": ran,
            "exec": true.returncode,
        }

    outcome = _run_in_child(body)
    assert outcome.payload["fork_exit"] == 7
    assert outcome.payload["thread"] == [True]
    assert outcome.payload["exec"] == 0


def _personality_samples() -> list[int]:
    samples = [0, 0xFFFFFFFF, 0xFFFF_FFFF_FFFF_FFFF, HIGH_BIT, HIGH_BIT | 0xFFFFFFFF]
    for bit in range(32):
        samples.append(1 << bit)
        samples.append(0xFFFFFFFF ^ (1 << bit))
        samples.append(HIGH_BIT | (1 << bit))
    samples.extend(
        [0x0006, 0x0008, 0x0040000, 0x0400000, 0x0100000, 0x55555555, 0xAAAAAAAA]
    )
    return samples


@pytest.mark.parametrize("mode", MODES)
def test_personality_allows_only_linux_and_query(mode: str, program: bytes) -> None:
    samples = _personality_samples()

    def body() -> list[int]:
        _load(mode, program)
        return [_raw_syscall(SYS_personality, value)["errno"] for value in samples]

    outcome = _run_in_child(body)
    for value, error in zip(samples, outcome.payload, strict=True):
        low = value & 0xFFFFFFFF
        expected = 0 if low in (0, 0xFFFFFFFF) else errno.EPERM
        assert error == expected, f"personality({value:#x}) gave errno {error}"


# Foreign architectures

# push rbx, rbp, r12-r15; mov eax, 20 (i386 getpid); int 0x80; pop them; ret.
# The pushes keep the callee-saved registers intact whatever the i386 entry
# path does with them.
I386_GETPID = bytes.fromhex(
    "53 55 4154 4155 4156 4157 b814000000 cd80 415f 415e 415d 415c 5d 5b c3"
)


def _i386_getpid() -> int:
    page = mmap.mmap(
        -1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    )
    page.write(I386_GETPID)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(ctypes.c_int)(address)
    return function()


def test_unfiltered_i386_getpid_returns_pid() -> None:
    outcome = _run_in_child(lambda: _i386_getpid() == os.getpid())
    assert outcome.killed_by is None
    assert outcome.payload is True


@pytest.mark.parametrize("mode", MODES)
def test_filter_kills_i386_call(mode: str, program: bytes) -> None:
    def body() -> int:
        _load(mode, program)
        return _i386_getpid()

    outcome = _run_in_child(body)
    assert outcome.killed_by == signal.SIGSYS
    assert outcome.payload is None


def test_unfiltered_x32_call_not_killed() -> None:
    """Without the filter, x32 getpid fails with ENOSYS (no x32 ABI) or succeeds."""

    def body() -> dict[str, Any]:
        outcome = _raw_syscall(X32_SYSCALL_BIT | SYS_getpid)
        return {**outcome, "pid": os.getpid()}

    outcome = _run_in_child(body)
    assert outcome.killed_by is None
    result = outcome.payload
    assert result["errno"] == errno.ENOSYS or result["result"] == result["pid"]


@pytest.mark.parametrize("mode", MODES)
def test_filter_kills_x32_call(mode: str, program: bytes) -> None:
    def body() -> dict[str, int]:
        _load(mode, program)
        return _raw_syscall(X32_SYSCALL_BIT | SYS_getpid)

    outcome = _run_in_child(body)
    assert outcome.killed_by == signal.SIGSYS
    assert outcome.payload is None


# export_bpf and load_bpf


def test_export_bpf_whole_instructions(program: bytes) -> None:
    assert len(program) > 0
    assert len(program) % 8 == 0


@pytest.mark.parametrize("size", [0, 7, 12, 8 * 4097])
def test_load_bpf_rejects_malformed_program(size: int) -> None:
    # The length check runs before any system call, so this is safe in the test process.
    with pytest.raises(InvalidArgument):
        seccomp.load_bpf(b"\x06" * size)


def test_load_bpf_requires_no_new_privs(program: bytes) -> None:
    def body() -> dict[str, Any]:
        try:
            seccomp.load_bpf(program)
        except FailedPrecondition as err:
            return {"raised": "FailedPrecondition", "message": str(err)}
        return {"raised": None}

    outcome = _run_in_child(body)
    assert outcome.payload["raised"] == "FailedPrecondition"
    assert "PR_SET_NO_NEW_PRIVS" in outcome.payload["message"]


def test_load_bpf_names_rejected_call() -> None:
    # One "ld #0" instruction. The kernel rejects a program that does not end in "ret".
    invalid = bytes(8)

    def body() -> dict[str, Any]:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        try:
            seccomp.load_bpf(invalid)
        except OSError as err:
            return {"errno": err.errno, "message": str(err)}
        return {"errno": None}

    outcome = _run_in_child(body)
    assert outcome.payload["errno"] == errno.EINVAL
    assert "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER" in outcome.payload["message"]
