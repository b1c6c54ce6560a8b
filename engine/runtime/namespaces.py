"""User, mount, PID, UTS, IPC, network and cgroup namespaces, and id maps."""

from __future__ import annotations

import logging
import os

from engine.runtime import libc

log = logging.getLogger(__name__)


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces.

    With CLONE_NEWPID only the children forked afterwards enter the new PID
    namespace; the caller stays where it is.
    """
    libc.unshare(flags)


def write_id_maps(pid: int, host_base: int, count: int) -> None:
    """Map ids 0..count-1 in the user namespace of ``pid`` to host ids from host_base.

    The caller must be root in the parent user namespace. setgroups stays
    allowed: the map is written by a privileged process, and the sandbox's
    supplementary groups were already cleared before it entered the namespace.
    """
    line = f"0 {host_base} {count}\n"
    for name in ("uid_map", "gid_map"):
        path = f"/proc/{pid}/{name}"
        try:
            with open(path, "w") as file:
                file.write(line)
        except OSError as error:
            raise OSError(
                error.errno,
                f"write {line.strip()!r} to {path} failed: {error.strerror}",
            ) from error


def become_root() -> None:
    """Become uid and gid 0 of the current user namespace, with no extra groups."""
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def can_own_user_namespace(uid: int) -> bool:
    """Return True if host uid ``uid`` may create a user namespace here.

    Some hosts restrict unprivileged user namespaces (the
    kernel.apparmor_restrict_unprivileged_userns sysctl of Ubuntu, for
    example). The probe runs in a forked child, so the caller stays root.
    """
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            unshare(libc.CLONE_NEWUSER)
            status = 0
        except OSError:
            pass
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
