"""The supervisor: the process that becomes a sandbox and forks its PID 1.

The zygote forks a supervisor ahead of demand. It joins its cgroups and
enters new namespaces at once, which is the slow part, and then waits on its
control socket for a spec:

    {"op": "start", "spec": {...}}

The Engine configures a networked sandbox's end of its veth pair itself,
from a thread inside the supervisor's network namespace, so this process
tree never imports pyroute2 and the zygote stays small to fork.

The supervisor then builds the sandbox's root and forks PID 1, sends
{"op": "init", "pid"} with a pidfd of PID 1 attached, and exits. The zygote,
a child subreaper, becomes PID 1's parent, so PID 1's parent stays outside
the sandbox's PID namespace where sandbox code cannot see or signal it. PID 1
finishes isolation, executes engine-init (see init.py), and replies
{"op": "ready"} or {"op": "failed", "message"} on the same socket.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback

from engine.runtime import init, isolation, libc, protocol, rootfs

log = logging.getLogger(__name__)


def run(
    control: socket.socket,
    cgroup_fds: list[int],
    notify_fd: int,
    wait_fd: int,
    seccomp_program: bytes,
    owner_uid: int | None,
    init_fd: int,
) -> None:
    """Body of a freshly forked supervisor; never returns."""
    status = 1
    try:
        zygote_pid = os.getppid()
        # The zygote's SIGCHLD handler and wakeup pipe are not this process's.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()
        libc.set_name("engine-sandbox")
        try:
            isolation.enter_namespaces(cgroup_fds, notify_fd, wait_fd, owner_uid)
        except isolation.CgroupRemovedError:
            status = 0
            return
        # The kernel clears the parent-death signal when the euid changes, as
        # it did in enter_namespaces, so set it again and check that the
        # zygote did not die in between.
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote_pid:
            return
        # Checked again by PID 1, which takes the zygote as its parent.
        zygote_pidfd = os.pidfd_open(zygote_pid)
        received = _receive(control)
        if received is None:
            # The pool was closed before this supervisor was used.
            status = 0
            return
        message, _ = received
        spec = _isolation_spec(message["spec"])
        try:
            old_root = isolation.build_root(spec)
        except rootfs.WorkdirError as error:
            reply = {"op": "failed", "message": error.strerror, "invalid": True}
            protocol.send(control, reply)
            status = 0
            return
        except Exception as error:
            protocol.send(control, {"op": "failed", "message": str(error)})
            raise
        own_pidfd = os.pidfd_open(os.getpid())
        pid = os.fork()
        if pid == 0:
            pidfds = (own_pidfd, zygote_pidfd)
            _run_init(control, spec, old_root, seccomp_program, init_fd, pidfds)
        # The Engine signals and watches PID 1 through this pidfd, which
        # stays valid after the zygote reaps the process.
        pidfd = os.pidfd_open(pid)
        try:
            protocol.send(control, {"op": "init", "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _receive(control: socket.socket) -> tuple[protocol.Message, list[int]] | None:
    """Receive the next request, or None once the Engine has closed the socket.

    The Engine may close it with this supervisor's reply still unread, when it
    discards the slot, and the kernel then reports ECONNRESET.
    """
    try:
        return protocol.recv(control)
    except ConnectionResetError:
        return None


def _run_init(
    control: socket.socket,
    spec: isolation.IsolationSpec,
    old_root: str,
    seccomp_program: bytes,
    init_fd: int,
    pidfds: tuple[int, int],
) -> None:
    """Body of PID 1 until it executes engine-init; never returns.

    PID 1's parent, the supervisor, exits at once, so PID 1 takes its
    parent-death signal only in engine-init, once the zygote is its parent.
    ``pidfds`` are pidfds of the supervisor and of the zygote.
    """
    status = 1
    try:
        try:
            isolation.finish_in_init(spec, old_root, seccomp_program)
            init.exec_init(init_fd, control, *pidfds)
        except Exception as error:
            protocol.send(control, {"op": "failed", "message": str(error)})
            raise
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _isolation_spec(spec: protocol.Message) -> isolation.IsolationSpec:
    root = spec["root"]
    return isolation.IsolationSpec(
        sandbox_id=spec["sandbox_id"],
        hostname=spec["hostname"],
        root=rootfs.RootSpec(
            root=root["root"],
            lower=root["lower"],
            upper=root["upper"],
            work=root["work"],
            binds=tuple(tuple(pair) for pair in root["binds"]),
            hostname=spec["hostname"],
        ),
        workdir=spec["workdir"],
        tmp=rootfs.TmpfsLimits.from_message(spec.get("tmp")),
        shm=rootfs.TmpfsLimits.from_message(spec.get("shm")),
        volumes=tuple(
            (volume["source"], volume["target"], bool(volume["read_only"]))
            for volume in spec.get("volumes", ())
        ),
        address=spec.get("address"),
        resolv_conf=spec.get("resolv_conf"),
    )
