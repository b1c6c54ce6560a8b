"""The per-sandbox supervisor: the helper that forks and watches sandbox processes.

The supervisor lives in the sandbox's user, mount and network namespaces but
outside its PID namespace and its cgroups, so sandbox code can neither see nor
signal it. It serves messages from the Engine on one SOCK_SEQPACKET socket:

    {"op": "exec", "id", "argv", "env", "cwd", "nofile"} + fds [stdin, stdout, stderr]
        -> {"op": "started", "id", "pid"} or {"op": "failed", "id", "errno", "message"}
    {"op": "kill", "pid", "signal", "group"}
    {"op": "terminate"}
and sends, unprompted, {"op": "exit", "pid", "status"} for every child that
ends, with ``status`` the raw wait status.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import selectors
import signal
import socket
import struct
from dataclasses import dataclass, field

from engine.runtime import capabilities, libc, protocol, seccomp

log = logging.getLogger(__name__)

# Signals whose disposition Python changes at start-up; an exec'd program must
# start with the defaults, or `yes | head` would see EPIPE instead of SIGPIPE.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)


@dataclass
class _Child:
    pid: int
    pidfd: int


@dataclass
class Supervisor:
    control: socket.socket
    init_pid: int
    cgroup_fds: list[int]
    seccomp_program: bytes
    children: dict[int, _Child] = field(default_factory=dict)

    def serve(self) -> None:
        """Serve the Engine until it says terminate or closes the socket."""
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, None)
        init_pidfd = os.pidfd_open(self.init_pid)
        selector.register(init_pidfd, selectors.EVENT_READ, "init")
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    received = protocol.recv(self.control)
                    if received is None or received[0].get("op") == "terminate":
                        self.terminate()
                        return
                    self.handle(*received, selector)
                elif key.data == "init":
                    # PID 1 died, so the PID namespace is gone with it.
                    self.terminate()
                    return
                else:
                    self.reap(key.data, selector)

    def handle(
        self,
        message: protocol.Message,
        fds: list[int],
        selector: selectors.BaseSelector,
    ) -> None:
        op = message.get("op")
        if op == "exec":
            self.exec(message, fds, selector)
        elif op == "kill":
            self.kill(message)
        else:
            for fd in fds:
                os.close(fd)
            log.warning("supervisor: unknown message %r", op)

    def exec(
        self,
        message: protocol.Message,
        fds: list[int],
        selector: selectors.BaseSelector,
    ) -> None:
        request_id = message["id"]
        try:
            pid, host_pid = self._spawn(message, fds)
        except OSError as error:
            code = error.errno or errno.EIO
            reply = {
                "op": "failed",
                "id": request_id,
                "errno": code,
                "message": str(error),
            }
            protocol.send(self.control, reply)
            return
        finally:
            for fd in fds:
                os.close(fd)
        pidfd = os.pidfd_open(host_pid)
        self.children[pid] = _Child(host_pid, pidfd)
        selector.register(pidfd, selectors.EVENT_READ, pid)
        protocol.send(self.control, {"op": "started", "id": request_id, "pid": pid})

    def _spawn(self, message: protocol.Message, fds: list[int]) -> tuple[int, int]:
        if len(fds) != 3:
            raise OSError(
                errno.EINVAL, f"exec needs 3 stdio descriptors, got {len(fds)}"
            )
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        host_pid = os.fork()
        if host_pid == 0:
            os.close(read_fd)
            _exec_child(message, fds, write_fd, self.cgroup_fds, self.seccomp_program)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read()
        if len(report) < 4:
            os.waitpid(host_pid, 0)
            raise OSError(errno.EIO, "the exec child died before it started")
        if len(report) > 4:
            os.waitpid(host_pid, 0)
            failure = json.loads(report[4:])
            raise OSError(failure["errno"], failure["message"])
        return struct.unpack("i", report)[0], host_pid

    def kill(self, message: protocol.Message) -> None:
        child = self.children.get(message["pid"])
        if child is None:
            return
        try:
            if message.get("group", True):
                os.killpg(child.pid, message["signal"])
            else:
                os.kill(child.pid, message["signal"])
        except ProcessLookupError:
            pass

    def reap(self, pid: int, selector: selectors.BaseSelector) -> None:
        child = self.children.pop(pid)
        selector.unregister(child.pidfd)
        os.close(child.pidfd)
        _, status = os.waitpid(child.pid, 0)
        protocol.send(self.control, {"op": "exit", "pid": pid, "status": status})

    def terminate(self) -> None:
        """Kill PID 1, which makes the kernel kill the whole PID namespace."""
        try:
            os.kill(self.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid, child in list(self.children.items()):
            _, status = os.waitpid(child.pid, 0)
            os.close(child.pidfd)
            try:
                protocol.send(
                    self.control, {"op": "exit", "pid": pid, "status": status}
                )
            except OSError:
                pass
        self.children.clear()
        os.waitpid(self.init_pid, 0)


def _exec_child(
    message: protocol.Message,
    stdio: list[int],
    report_fd: int,
    cgroup_fds: list[int],
    seccomp_program: bytes,
) -> None:
    """Turn the forked child into the requested program; never returns.

    The order matters: joining the cgroups and unsharing the cgroup namespace
    need capabilities that ``capabilities.restrict`` removes, and the seccomp
    filter goes last because it forbids unshare.
    """
    try:
        os.setsid()
        for fd in cgroup_fds:
            os.write(fd, b"0")
        libc.unshare(libc.CLONE_NEWCGROUP)
        os.write(report_fd, struct.pack("i", os.getpid()))
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        for number in _RESET_SIGNALS:
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        nofile = int(message.get("nofile", 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.chdir(message["cwd"])
        capabilities.restrict()
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        seccomp.load_bpf(seccomp_program)
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 1 << 20)
        os.execvpe(message["argv"][0], message["argv"], message["env"])
    except OSError as error:
        failure = {
            "errno": error.errno or errno.EIO,
            "message": _describe(error, message),
        }
        os.write(report_fd, json.dumps(failure).encode())
    except BaseException as error:  # noqa: BLE001 - the child must report, then exit
        failure = {"errno": errno.EIO, "message": f"exec setup failed: {error!r}"}
        os.write(report_fd, json.dumps(failure).encode())
    os._exit(127)


def _describe(error: OSError, message: protocol.Message) -> str:
    program = message["argv"][0]
    if error.errno == errno.ENOENT and error.filename is None:
        return f"executable {program!r} not found in PATH"
    if error.errno == errno.ENOENT:
        return f"{error.filename!r}: no such file or directory"
    if error.errno == errno.EACCES:
        return f"{program!r}: permission denied"
    return f"exec of {program!r} failed: {error.strerror or error}"
