"""The isolation steps of a sandbox, in the order they must run.

Three processes take part. The zygote, root on the host, forks the
supervisor. The supervisor runs ``enter_namespaces`` at once, ahead of any
request, and ``build_root`` when a sandbox is requested, then forks the
sandbox's PID 1, which runs ``finish_in_init``. When that returns, PID 1 is
uid 0 of a new user namespace (uid ``uid_base`` on the host), in the
sandbox's cgroups and in all of its namespaces, with its root pivoted into the
sandbox's root, no way back to the host's root, a reduced capability set,
no_new_privs and the seccomp filter. Every process it forks inherits all of
that.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import secrets
from dataclasses import dataclass

from engine.runtime import (
    capabilities,
    libc,
    mounts,
    namespaces,
    network,
    rootfs,
    seccomp,
)

log = logging.getLogger(__name__)


class CgroupRemovedError(OSError):
    """The Engine removed the supervisor's cgroup before the supervisor joined it.

    The pool does so when a prefork is cancelled, as at engine stop, so it is
    no error of the supervisor's.
    """


@dataclass(frozen=True)
class IsolationSpec:
    sandbox_id: str
    hostname: str
    root: rootfs.RootSpec
    workdir: str
    tmp: rootfs.TmpfsLimits
    shm: rootfs.TmpfsLimits
    # (host directory, path inside the sandbox, read-only) of each volume.
    volumes: tuple[tuple[str, str, bool], ...] = ()
    # The sandbox's IPv4 address and resolv.conf text; None without a network.
    address: str | None = None
    resolv_conf: str | None = None


def enter_namespaces(
    cgroup_fds: list[int], notify_fd: int, wait_fd: int, owner_uid: int | None
) -> None:
    """Join the sandbox's cgroups and move into new namespaces, as uid 0 inside.

    ``notify_fd`` and ``wait_fd`` are pipes to the zygote, which writes the id
    maps when told that the user namespace exists. With ``owner_uid`` the
    process first becomes that unprivileged host uid, which then owns the new
    user namespace.
    """
    # Joining first makes the cgroup namespace below rooted at the sandbox's
    # own cgroup, and every process forked later starts inside it, so no exec
    # pays for a cgroup migration.
    for fd in cgroup_fds:
        try:
            os.write(fd, b"0")
        except OSError as error:
            if error.errno == errno.ENODEV:
                raise CgroupRemovedError(
                    error.errno, "the cgroup was removed"
                ) from None
            raise
        os.close(fd)

    # Supplementary groups survive unshare(CLONE_NEWUSER) and would keep
    # granting the host's root group inside the sandbox.
    os.setgroups([])

    # The kernel charges per-user limits (inotify instances, pending signals,
    # POSIX message queues) to the owner of each user namespace on the way up,
    # so a root-owned namespace would let sandbox code use up host root's.
    if owner_uid is not None:
        os.setresgid(owner_uid, owner_uid, owner_uid)
        os.setresuid(owner_uid, owner_uid, owner_uid)

    # One unshare call, so that the new user namespace owns all the others and
    # the capabilities it grants apply to them. CLONE_NEWPID affects only the
    # children forked afterwards.
    namespaces.unshare()

    # Only a process outside the namespace, root on the host, may map host ids
    # into it. Until the map exists this process has no usable uid.
    os.write(notify_fd, b"u")
    if os.read(wait_fd, 1) != b"g":
        raise OSError(0, "the zygote did not write the uid and gid maps")
    os.close(notify_fd)
    os.close(wait_fd)
    namespaces.become_root()


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
            namespaces.unshare(libc.CLONE_NEWUSER)
            status = 0
        except OSError:
            pass
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def build_root(spec: IsolationSpec) -> str:
    """Mount the sandbox's root and pivot into it; return where the host's root went."""
    # Before any mount: nothing mounted from here on may propagate to the host.
    mounts.make_private()
    rootfs.mount_root(spec.root)

    # pivot_root early, keeping the host's root under a name the image cannot
    # predict, so that every later path, and every symlink in the image,
    # resolves inside the sandbox's root.
    old_root = f"/.host-{secrets.token_hex(8)}"
    os.mkdir(spec.root.root + old_root, 0o700)
    libc.pivot_root(spec.root.root, spec.root.root + old_root)
    os.chdir("/")
    rootfs.prepare_dirs(old_root)
    rootfs.mount_dev(old_root, spec.shm)
    rootfs.mount_tmp(old_root, spec.tmp)
    rootfs.write_etc(spec.hostname, old_root, spec.address, spec.resolv_conf)
    for source, target, read_only in spec.volumes:
        rootfs.mount_volume(old_root + source, target, old_root, read_only=read_only)
    rootfs.make_workdir(spec.workdir, old_root)
    return old_root


def finish_in_init(spec: IsolationSpec, old_root: str, seccomp_program: bytes) -> None:
    """Finish isolation in the sandbox's PID 1, right after the fork."""
    # Non-dumpable before anything of the sandbox runs: its /proc/1/mem and
    # ptrace then need capabilities in the host's user namespace, because
    # this process never called execve and its memory belongs to that namespace.
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    libc.set_name("init")

    # procfs shows the PID namespace of the process that mounts it, so PID 1
    # mounts it. The kernel allows that mount in a user namespace only while a
    # fully visible procfs is in the mount namespace: the host's, under old_root.
    mounts.mount_proc("/proc")
    rootfs.mask_proc()
    libc.umount2(old_root, libc.MNT_DETACH)
    os.rmdir(old_root)

    libc.sethostname(spec.hostname)
    network.setup_loopback()
    # Inherited by every process PID 1 starts: a crash never writes a core
    # file into the sandbox's root or the host's core_pattern.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    # Last, because the steps above need CAP_SYS_ADMIN. Dropping the bounding
    # set first means no process forked later can regain what it lacks.
    capabilities.drop_bounding()
    capabilities.restrict()

    # no_new_privs is required to load a filter without CAP_SYS_ADMIN, and it
    # stops setuid binaries from gaining privileges. The filter is inherited
    # by every child, so exec'd processes need not load it again.
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    seccomp.load_bpf(seccomp_program)
