"""The seccomp policy as sandbox code meets it: raw system calls from inside a sandbox.

tests/unit/test_seccomp.py checks the filter in a forked child of pytest. These
tests check that every sandbox process really runs under it: a python3 program
in the sandbox makes each call through ctypes' syscall() and prints the errno.
Every call uses arguments that the kernel would reject or that change only the
sandbox, so a call that slips through the filter still leaves the host as it
was. System call numbers are those of the x86_64 table in the kernel source
(arch/x86/entry/syscalls/syscall_64.tbl).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from engine.core.models import ExitReason

if TYPE_CHECKING:
    from conftest import EngineRunner

# Runs in the sandbox. Each case is (system call number, arguments). Strings
# are passed as char pointers and None as NULL, with three special strings:
# "TIMEVAL" is a struct timeval whose tv_usec is out of range, "PTY" the slave
# end of a new pty, and "BUFFER" a zeroed 64-byte buffer.
_CALL_PROGRAM = """
import ctypes, json, os, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
master, slave = os.openpty()
timeval = (ctypes.c_long * 2)(0, 2_000_000)
keep = []


def argument(value):
    if value is None:
        return ctypes.c_void_p(None)
    if value == "TIMEVAL":
        return timeval
    if value == "PTY":
        return ctypes.c_ulong(slave)
    if value == "BUFFER":
        buffer = ctypes.create_string_buffer(64)
        keep.append(buffer)
        return buffer
    if isinstance(value, str):
        return ctypes.c_char_p(value.encode())
    return ctypes.c_ulong(value & 0xFFFF_FFFF_FFFF_FFFF)


results = {}
for name, (number, args) in json.loads(sys.argv[1]).items():
    converted = [argument(value) for value in args]
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *converted)
    results[name] = ctypes.get_errno() if result == -1 else 0
print(json.dumps(results))
"""

CLONE_NEWUSER = 0x10000000
KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
BPF_PROG_LOAD = 5
PER_BSD = 0x0006
ADDR_NO_RANDOMIZE = 0x0040000
PERSONALITY_QUERY = 0xFFFFFFFF
TIOCSTI = 0x5412
TIOCGWINSZ = 0x5413

# name -> (number, arguments, expected errno)
BLOCKED: dict[str, tuple[int, list[object], int]] = {
    "mount": (165, ["none", "/mnt", "tmpfs", 0, None], errno.EPERM),
    "umount2": (166, ["/tmp", 0], errno.EPERM),
    "unshare-newuser": (272, [CLONE_NEWUSER], errno.EPERM),
    "setns": (308, [-1, 0], errno.EPERM),
    "keyctl": (
        250,
        [KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0],
        errno.EPERM,
    ),
    "bpf": (321, [BPF_PROG_LOAD, None, 0], errno.EPERM),
    "io_uring_setup": (425, [1, None], errno.ENOSYS),
    "clone3": (435, [None, 0], errno.ENOSYS),
    "perf_event_open": (298, [None, 0, -1, -1, 0], errno.EPERM),
    "init_module": (175, [None, 0, ""], errno.EPERM),
    # magic1 = 0 is not LINUX_REBOOT_MAGIC1, so an unfiltered call fails too.
    "reboot": (169, [0, 0, 0, None], errno.EPERM),
    "settimeofday": (164, ["TIMEVAL", None], errno.EPERM),
    "personality-bsd": (135, [PER_BSD], errno.EPERM),
    "personality-addr-no-randomize": (135, [ADDR_NO_RANDOMIZE], errno.EPERM),
    "ioctl-tiocsti": (16, ["PTY", TIOCSTI, "BUFFER"], errno.EPERM),
}

# Calls the policy allows, with arguments that succeed.
ALLOWED: dict[str, tuple[int, list[object]]] = {
    "personality-query": (135, [PERSONALITY_QUERY]),
    "getpid": (39, []),
    "ioctl-tiocgwinsz": (16, ["PTY", TIOCGWINSZ, "BUFFER"]),
}

# push rbx, rbp, r12-r15; mov eax, 20 (i386 getpid); int 0x80; pop them; ret.
# The same bytes as in tests/unit/test_seccomp.py.
_I386_PROGRAM = """
import ctypes, mmap
code = bytes.fromhex(
    "53 55 4154 4155 4156 4157 b814000000 cd80 415f 415e 415d 415c 5d 5b c3"
)
protection = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
page = mmap.mmap(-1, mmap.PAGESIZE, prot=protection)
page.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
function = ctypes.CFUNCTYPE(ctypes.c_int)(address)
print(function(), flush=True)
"""

_X32_PROGRAM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
X32_SYSCALL_BIT = 0x40000000
print(libc.syscall(ctypes.c_long(X32_SYSCALL_BIT | 39)), flush=True)
"""

_FORK_AND_THREAD_PROGRAM = """
import os, threading
pid = os.fork()
if pid == 0:
    os._exit(7)
_, status = os.waitpid(pid, 0)
values = []
thread = threading.Thread(target=values.append, args=(1,))
thread.start()
thread.join()
print(os.waitstatus_to_exitcode(status), values)
"""


@pytest.fixture(scope="module")
def call_results(engine: EngineRunner) -> Iterator[dict[str, int]]:
    """Run every case of BLOCKED and ALLOWED in one sandbox and return the errnos."""
    cases = {name: [number, args] for name, (number, args, _) in BLOCKED.items()}
    cases.update({name: [number, args] for name, (number, args) in ALLOWED.items()})
    sandbox_id = engine.create()
    try:
        result = engine.run(
            sandbox_id, ["python3", "-c", _CALL_PROGRAM, json.dumps(cases)]
        )
    finally:
        engine.terminate(sandbox_id)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    yield json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_blocked_call_errno(call_results: dict[str, int], name: str) -> None:
    expected = BLOCKED[name][2]
    assert call_results[name] == expected, (
        f"{name} gave {errno.errorcode.get(call_results[name], call_results[name])}, "
        f"expected {errno.errorcode[expected]}"
    )


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_call_succeeds(call_results: dict[str, int], name: str) -> None:
    assert call_results[name] == 0


def test_i386_call_killed_by_sigsys(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.python(sandbox_id, _I386_PROGRAM)
    assert result.exit_code == 128 + 31
    assert result.info.signal == "SIGSYS"
    assert result.info.reason == ExitReason.SIGNALED
    assert result.stdout == b""


def test_x32_call_killed_by_sigsys(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.python(sandbox_id, _X32_PROGRAM)
    assert result.exit_code == 128 + 31
    assert result.info.signal == "SIGSYS"
    assert result.stdout == b""


def test_fork_and_threads_work(engine: EngineRunner, sandbox_id: str) -> None:
    result = engine.python(sandbox_id, _FORK_AND_THREAD_PROGRAM)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"7 [1]\n"
