"""The supervisor: the process that becomes a sandbox and stays its parent.

The zygote forks a supervisor ahead of demand. It joins its cgroups and
enters new namespaces at once, which is the slow part, and then waits on its
control socket for a spec:

    {"op": "start", "spec": {...}}

The pool may send one {"op": "network", "ifname", "address", "gateway"}
first, answered with {"op": "network_ready"}: the supervisor configures the
sandbox's end of its veth pair, in the network namespace it already has.

It then builds the sandbox's root, forks PID 1 (``engine.runtime.init``),
which replies {"op": "ready"} or {"op": "failed", "message"} on the same
socket, and waits for PID 1 to exit. The supervisor stays outside the
sandbox's PID namespace, so sandbox code cannot see or signal it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import traceback

from engine.runtime import init, isolation, libc, netlink, protocol, rootfs

log = logging.getLogger(__name__)


def run(
    control: socket.socket,
    cgroup_fds: list[int],
    notify_fd: int,
    wait_fd: int,
    seccomp_program: bytes,
    owner_uid: int | None,
) -> None:
    """Body of a freshly forked supervisor; never returns."""
    status = 1
    try:
        zygote_pid = os.getppid()
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
        received = _receive(control)
        if received is not None and received[0].get("op") == "network":
            _configure_network(control, received[0])
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
        pid = os.fork()
        if pid == 0:
            _run_init(control, spec, old_root, seccomp_program)
        control.close()
        os.waitpid(pid, 0)
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


def _configure_network(control: socket.socket, message: protocol.Message) -> None:
    """Configure the sandbox's end of its veth pair, then reply on ``control``."""
    try:
        netlink.configure_inside(
            message["ifname"],
            ipaddress.IPv4Interface(message["address"]),
            ipaddress.IPv4Address(message["gateway"]),
        )
    except OSError as error:
        protocol.send(control, {"op": "failed", "message": str(error)})
        raise
    protocol.send(control, {"op": "network_ready"})


def _run_init(
    control: socket.socket,
    spec: isolation.IsolationSpec,
    old_root: str,
    seccomp_program: bytes,
) -> None:
    status = 1
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            isolation.finish_in_init(spec, old_root, seccomp_program)
        except Exception as error:
            protocol.send(control, {"op": "failed", "message": str(error)})
            raise
        _ignore_signals()
        protocol.send(control, {"op": "ready"})
        init.Init(control).serve()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _ignore_signals() -> None:
    # Signals from inside the namespace reach PID 1 only if it handles them,
    # and Python handles SIGINT; ignoring everything leaves SIGCHLD, which
    # init.Init installs, as the only signal sandbox code can deliver.
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_IGN)


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
