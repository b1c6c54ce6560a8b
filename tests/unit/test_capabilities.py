"""Capability sets against the running kernel.

Every test that changes capabilities does so in a forked child that first
unshares a user namespace (where it has every capability) and maps uid 0 of
the namespace to its own uid, so that exec treats it as root. The test process
itself keeps its capabilities.
"""

from __future__ import annotations

import errno
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from engine.errors import InvalidArgument
from engine.runtime import capabilities, libc

CAP_SYS_ADMIN = 21
DOCKER_DEFAULT = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_AUDIT_WRITE",
        "CAP_SETFCAP",
    }
)


def _mask(names: frozenset[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << capabilities.CAPABILITIES[name]
    return mask


KEPT_MASK = _mask(DOCKER_DEFAULT)
ALL_MASK = (1 << (capabilities.LAST_CAP + 1)) - 1


def _enter_user_namespace() -> None:
    """Unshare a user namespace and map uid 0 inside it to the caller's uid."""
    uid = os.geteuid()
    libc.unshare(libc.CLONE_NEWUSER)
    with open("/proc/self/uid_map", "w") as file:
        file.write(f"0 {uid} 1\n")


def _run_in_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a forked child and return the JSON value it returns."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        exit_code = 1
        try:
            os.close(read_fd)
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
    assert os.waitstatus_to_exitcode(status) == 0
    return decoded["value"]


def _status_after_exec(prepare: Callable[[], None]) -> dict[str, int]:
    """Run ``prepare`` in a child that then execs cat /proc/self/status.

    Returns the Cap* fields of the output as integers.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            prepare()
            os.dup2(write_fd, 1)
            os.execv("/bin/cat", ["cat", "/proc/self/status"])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(127)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fields = {}
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            fields[key] = int(value.strip(), 16)
    return fields


def _drop_and_restrict() -> None:
    _enter_user_namespace()
    capabilities.drop_bounding()
    capabilities.restrict()


# Tables


def test_kept_is_docker_default() -> None:
    assert capabilities.KEPT == DOCKER_DEFAULT


def test_known_numbers() -> None:
    assert capabilities.CAPABILITIES["CAP_CHOWN"] == 0
    assert capabilities.CAPABILITIES["CAP_SYS_ADMIN"] == CAP_SYS_ADMIN
    assert capabilities.CAPABILITIES["CAP_SETFCAP"] == 31


def test_capabilities_bounded_by_last_cap() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as file:
        last_cap = int(file.read())
    assert last_cap == capabilities.LAST_CAP
    assert max(capabilities.CAPABILITIES.values()) == min(last_cap, 40)
    assert sorted(capabilities.CAPABILITIES.values()) == list(
        range(len(capabilities.CAPABILITIES))
    )


def test_every_capability_has_one_reason() -> None:
    kept = set(capabilities._KEPT_REASONS)
    dropped = set(capabilities._DROPPED_REASONS)
    assert not kept & dropped
    assert kept | dropped == set(capabilities._KNOWN_NAMES)


def test_names_of_mask() -> None:
    assert capabilities.names(0) == []
    assert capabilities.names(1 << CAP_SYS_ADMIN) == ["CAP_SYS_ADMIN"]
    assert capabilities.names(0b11) == ["CAP_CHOWN", "CAP_DAC_OVERRIDE"]
    assert set(capabilities.names(KEPT_MASK)) == DOCKER_DEFAULT


def test_names_of_unknown_bit() -> None:
    assert capabilities.names(1 << 50) == ["50"]


def test_names_rejects_negative_mask() -> None:
    with pytest.raises(InvalidArgument):
        capabilities.names(-1)


# Kernel


def test_exec_has_only_kept_set() -> None:
    fields = _status_after_exec(_drop_and_restrict)
    assert fields["CapBnd"] == KEPT_MASK, capabilities.names(fields["CapBnd"])
    assert fields["CapEff"] == KEPT_MASK, capabilities.names(fields["CapEff"])
    assert fields["CapPrm"] == KEPT_MASK, capabilities.names(fields["CapPrm"])
    assert fields["CapInh"] == 0
    assert fields["CapAmb"] == 0
    assert not fields["CapBnd"] >> CAP_SYS_ADMIN & 1
    assert not fields["CapEff"] >> CAP_SYS_ADMIN & 1


def test_exec_without_drop_has_all() -> None:
    """Control: root in a new user namespace execs with every capability."""
    fields = _status_after_exec(_enter_user_namespace)
    assert fields["CapBnd"] == ALL_MASK
    assert fields["CapEff"] == ALL_MASK


def test_current_after_restrict() -> None:
    def body() -> dict[str, int]:
        _drop_and_restrict()
        return capabilities.current()

    sets = _run_in_child(body)
    assert sets["effective"] == KEPT_MASK
    assert sets["permitted"] == KEPT_MASK
    assert sets["inheritable"] == 0
    assert sets["bounding"] == KEPT_MASK
    assert sets["ambient"] == 0


def test_current_in_new_user_namespace() -> None:
    def body() -> dict[str, int]:
        _enter_user_namespace()
        return capabilities.current()

    sets = _run_in_child(body)
    assert sets["effective"] == ALL_MASK
    assert sets["permitted"] == ALL_MASK
    assert sets["bounding"] == ALL_MASK


def test_bounding_drop_blocks_inheritable() -> None:
    """After drop_bounding, capset cannot add CAP_SYS_ADMIN to the inheritable set."""
    sys_admin = 1 << CAP_SYS_ADMIN

    def body() -> dict[str, Any]:
        _enter_user_namespace()
        effective, permitted, _ = libc.capget()
        libc.capset(effective, permitted, sys_admin)
        before = libc.capget()[2]
        libc.capset(effective, permitted, 0)

        capabilities.drop_bounding()
        still_permitted = bool(libc.capget()[1] & sys_admin)
        try:
            libc.capset(effective, permitted, sys_admin)
            error = 0
        except OSError as err:
            error = err.errno
        return {
            "inheritable_before_drop": before,
            "still_permitted": still_permitted,
            "capset_errno": error,
            "bounding_has_sys_admin": libc.prctl(libc.PR_CAPBSET_READ, CAP_SYS_ADMIN),
        }

    result = _run_in_child(body)
    assert result["inheritable_before_drop"] == sys_admin
    assert result["still_permitted"] is True
    assert result["capset_errno"] == errno.EPERM
    assert result["bounding_has_sys_admin"] == 0


def test_restrict_cannot_regain_sys_admin() -> None:
    sys_admin = 1 << CAP_SYS_ADMIN

    def body() -> int:
        _drop_and_restrict()
        effective, permitted, inheritable = libc.capget()
        try:
            libc.capset(effective | sys_admin, permitted | sys_admin, inheritable)
        except OSError as err:
            return err.errno
        return 0

    assert _run_in_child(body) == errno.EPERM


def test_drop_bounding_inherited_by_fork() -> None:
    def body() -> int:
        _enter_user_namespace()
        capabilities.drop_bounding()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write_fd, str(capabilities.current()["bounding"]).encode())
            os._exit(0)
        os.close(write_fd)
        data = os.read(read_fd, 64)
        os.waitpid(pid, 0)
        return int(data)

    assert _run_in_child(body) == KEPT_MASK


def test_restrict_keeps_only_permitted() -> None:
    """restrict cannot add to the permitted set, so it intersects keep with it."""

    def body() -> dict[str, int]:
        _enter_user_namespace()
        capabilities.restrict(frozenset({"CAP_CHOWN", "CAP_KILL"}))
        capabilities.restrict()
        return capabilities.current()

    sets = _run_in_child(body)
    assert sets["permitted"] == _mask(frozenset({"CAP_CHOWN", "CAP_KILL"}))
    assert sets["effective"] == _mask(frozenset({"CAP_CHOWN", "CAP_KILL"}))


def test_drop_bounding_without_setpcap_fails() -> None:
    def body() -> dict[str, Any]:
        _enter_user_namespace()
        capabilities.restrict(frozenset())
        try:
            capabilities.drop_bounding()
        except OSError as err:
            return {"errno": err.errno, "message": str(err)}
        return {"errno": 0}

    result = _run_in_child(body)
    assert result["errno"] == errno.EPERM
    assert "prctl(PR_CAPBSET_DROP, CAP_DAC_READ_SEARCH)" in result["message"]


@pytest.mark.parametrize("function", ["drop_bounding", "restrict"])
def test_unknown_name_rejected(function: str) -> None:
    def body() -> dict[str, Any]:
        _enter_user_namespace()
        try:
            getattr(capabilities, function)(frozenset({"CAP_CHOWN", "CAP_NO_SUCH"}))
        except InvalidArgument as err:
            return {"raised": True, "message": str(err), "sets": capabilities.current()}
        return {"raised": False}

    result = _run_in_child(body)
    assert result["raised"] is True
    assert "CAP_NO_SUCH" in result["message"]
    assert result["sets"]["bounding"] == ALL_MASK
    assert result["sets"]["permitted"] == ALL_MASK
