"""The isolation steps of a sandbox, in the order they must run.

``isolate`` runs in the supervisor, a process the zygote has just forked as
root on the host. When it returns, the supervisor is uid 0 of a new user
namespace (an unprivileged uid on the host), inside the sandbox's mount,
UTS, IPC, network and cgroup namespaces, with its root pivoted into the
sandbox's root, and every child it forks lands in the sandbox's PID namespace.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
from dataclasses import dataclass

from engine.runtime import capabilities, libc, mounts, namespaces, network, rootfs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IsolationSpec:
    sandbox_id: str
    hostname: str
    root: rootfs.RootSpec
    workdir: str
    tmp_size: str | None


def isolate(spec: IsolationSpec, notify_fd: int, wait_fd: int) -> int:
    """Isolate the calling process as the supervisor of a new sandbox.

    ``notify_fd`` and ``wait_fd`` are pipes to the zygote, which writes the id
    maps when told the user namespace exists. Returns the host pid of the
    sandbox's PID 1.
    """
    # Supplementary groups survive unshare(CLONE_NEWUSER) and would keep
    # granting the host's root group inside the sandbox.
    os.setgroups([])

    # One unshare call, so that the new user namespace owns all the others
    # and the caps it grants apply to them.
    namespaces.unshare()

    # Only a process outside the namespace, root on the host, may map host
    # ids into it. Until the map exists this process has no usable uid.
    os.write(notify_fd, b"u")
    if os.read(wait_fd, 1) != b"g":
        raise OSError(0, "the zygote did not write the uid and gid maps")
    os.close(notify_fd)
    os.close(wait_fd)
    namespaces.become_root()

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
    rootfs.mount_dev(old_root)
    rootfs.mount_tmp(old_root, spec.tmp_size)
    rootfs.write_etc(spec.hostname, old_root)

    # procfs shows the PID namespace of the process that mounts it, so the
    # sandbox's PID 1 mounts it. The kernel allows that mount in a user
    # namespace only while the host's /proc is still visible, under old_root.
    init_pid = start_init()
    rootfs.mask_proc()

    libc.umount2(old_root, libc.MNT_DETACH)
    os.rmdir(old_root)

    libc.sethostname(spec.hostname)
    network.setup_loopback()
    workdir = rootfs.check_inside(spec.workdir, old_root)
    os.makedirs(workdir, exist_ok=True)

    # Last, because the steps above need CAP_SYS_ADMIN. Every process forked
    # from here on inherits the reduced bounding set and cannot regain it.
    capabilities.drop_bounding()
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    return init_pid


def start_init() -> int:
    """Fork the sandbox's PID 1 and wait until it has mounted /proc."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            _run_init(write_fd)
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        if pipe.read(1) != b"p":
            raise OSError(0, "the sandbox's PID 1 failed to mount /proc")
    return pid


def _run_init(ready_fd: int) -> None:
    # Non-dumpable before anything of the sandbox runs: its /proc/1/mem and
    # ptrace then need capabilities in the host's user namespace.
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.set_name("init")
    mounts.mount_proc("/proc")
    os.write(ready_fd, b"p")
    os.closerange(0, 1 << 20)

    # Signals from inside the namespace reach PID 1 only if it handles them,
    # so ignoring all of them makes it unkillable from inside. SIGCHLD ignored
    # makes the kernel reap orphans that are reparented here.
    for number in range(1, signal.NSIG):
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(number, signal.SIG_IGN)
        except (OSError, ValueError):
            continue
    while True:
        signal.pause()
