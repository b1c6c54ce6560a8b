"""The sandbox's PID 1: it forks, watches and reaps every sandbox process.

PID 1 runs engine code, not sandbox code. It is non-dumpable and its memory
belongs to the host's user namespace, so sandbox code can neither ptrace it
nor read its memory, and the kernel drops every signal sent to it from inside
the namespace except SIGCHLD, the only one it handles. It serves the Engine on
one SOCK_SEQPACKET socket:

    {"op": "exec", "id", "argv", "env", "cwd", "nofile"} + fds [stdin, stdout, stderr]
        -> {"op": "started", "id", "pid"} or {"op": "failed", "id", "errno", "message"}
    {"op": "kill", "pid", "signal", "group"}
    {"op": "file", "id", "action", "args"} + fds [result, optional data]
        -> {"op": "started", "id", "pid"}; the worker reports on the result fd
    {"op": "terminate"}
and sends, unprompted, {"op": "exit", "pid", "status"} for every process it
started that ends, with ``status`` the raw wait status. When the socket
closes or says terminate, PID 1 exits, and the kernel kills every process
left in the PID namespace.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import selectors
import signal
import socket
from dataclasses import dataclass, field

from engine.runtime import files, libc, protocol

log = logging.getLogger(__name__)

# Signals whose disposition Python changes at start-up; an exec'd program must
# start with the defaults, or `yes | head` would see EPIPE instead of SIGPIPE.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)


# oom_score_adj of every process exec starts (-1000 to 1000; 0 is the default).
SANDBOX_OOM_SCORE_ADJ = 500


@dataclass
class Init:
    control: socket.socket
    # Pids of the processes started by exec that have not been reaped yet.
    children: set[int] = field(default_factory=set)
    # Pids of file operation workers that have not been reaped yet.
    workers: set[int] = field(default_factory=set)

    def serve(self) -> None:
        """Serve the Engine until it says terminate or closes the socket."""
        wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(wakeup_read, selectors.EVENT_READ, "child")
        while True:
            for key, _ in selector.select():
                if key.data == "child":
                    _drain(wakeup_read)
                    self.reap()
                    continue
                received = protocol.recv(self.control)
                if received is None or received[0].get("op") == "terminate":
                    self.terminate()
                    return
                self.handle(*received)

    def handle(self, message: protocol.Message, fds: list[int]) -> None:
        op = message.get("op")
        try:
            if op == "exec":
                self.exec(message, fds)
            elif op == "file":
                self.file(message, fds)
            elif op == "kill":
                self.kill(message)
        finally:
            for fd in fds:
                os.close(fd)

    def exec(self, message: protocol.Message, fds: list[int]) -> None:
        request_id = message["id"]
        try:
            pid = self._spawn(message, fds)
        except OSError as error:
            reply = {
                "op": "failed",
                "id": request_id,
                "errno": error.errno or errno.EIO,
                "message": error.strerror or str(error),
            }
            protocol.send(self.control, reply)
            return
        self.children.add(pid)
        protocol.send(self.control, {"op": "started", "id": request_id, "pid": pid})

    def _spawn(self, message: protocol.Message, fds: list[int]) -> int:
        if len(fds) != 3:
            raise OSError(
                errno.EINVAL, f"exec needs 3 stdio descriptors, not {len(fds)}"
            )
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _exec_child(message, fds, write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read()
        if report:
            # The child failed before or in execve. Reap it here, so that reap()
            # never reports it; SIGKILL first, in case it has not exited.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise _failure(report)
        return pid

    def file(self, message: protocol.Message, fds: list[int]) -> None:
        """Fork a worker for one file operation (see engine.runtime.files).

        A worker, not PID 1, touches the paths, so a FUSE mount or a FIFO that
        blocks stalls only that operation.
        """
        request_id = message["id"]
        if not 1 <= len(fds) <= 2:
            reply = {"op": "failed", "id": request_id, "errno": errno.EINVAL}
            protocol.send(self.control, {**reply, "message": "bad descriptors"})
            return
        pid = os.fork()
        if pid == 0:
            _file_worker(message, fds)
        self.workers.add(pid)
        protocol.send(self.control, {"op": "started", "id": request_id, "pid": pid})

    def kill(self, message: protocol.Message) -> None:
        pid = message["pid"]
        if pid not in self.children and pid not in self.workers:
            return
        try:
            if message.get("group", True):
                os.killpg(pid, message["signal"])
            else:
                os.kill(pid, message["signal"])
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        """Reap every exited child, and report those that exec started."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                protocol.send(
                    self.control, {"op": "exit", "pid": pid, "status": status}
                )

    def terminate(self) -> None:
        """Kill every other process of the namespace, report them, and return."""
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid in self.children:
                self.children.discard(pid)
                message = {"op": "exit", "pid": pid, "status": status}
                try:
                    protocol.send(self.control, message)
                except OSError:
                    pass


def _file_worker(message: protocol.Message, fds: list[int]) -> None:
    """Body of a file operation worker; never returns."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        keep = {2, *fds}
        for fd in range(0, max(keep) + 1):
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        os.closerange(max(keep) + 1, 1 << 20)
        result_fd = fds[0]
        data_fd = fds[1] if len(fds) > 1 else None
        status = files.run(
            message["action"], message.get("args", {}), result_fd, data_fd
        )
    except BaseException:  # the worker must exit, whatever happened
        status = 1
    finally:
        os._exit(status)


def _failure(report: bytes) -> OSError:
    try:
        failure = json.loads(report)
        return OSError(int(failure["errno"]), str(failure["message"]))
    except (ValueError, KeyError, TypeError):
        return OSError(errno.EIO, "the exec child sent a malformed report")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _exec_child(message: protocol.Message, stdio: list[int], report_fd: int) -> None:
    """Turn the forked child into the requested program; never returns.

    The child inherits PID 1's namespaces, cgroups, capability sets,
    no_new_privs and seccomp filter, so what is left is per-process state.
    """
    stage = "exec setup"
    try:
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        signal.set_wakeup_fd(-1)
        for number in (*_RESET_SIGNALS, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        nofile = int(message.get("nofile", 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        stage = "cwd"
        os.chdir(message["cwd"])
        stage = "exec"
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 1 << 20)
        _raise_oom_score()
        os.execvpe(message["argv"][0], message["argv"], message["env"])
    except OSError as error:
        failure = {
            "errno": error.errno or errno.EIO,
            "message": _describe(error, stage, message),
        }
        os.write(report_fd, json.dumps(failure).encode())
    except BaseException as error:  # the child must report, then exit
        failure = {"errno": errno.EIO, "message": f"exec setup failed: {error!r}"}
        os.write(report_fd, json.dumps(failure).encode())
    os._exit(127)


def _raise_oom_score() -> None:
    """Make the OOM killer pick this process before PID 1, the supervisor or the daemon.

    Raising the score needs no privilege, but /proc/self is writable only
    while the process is dumpable, and a child of PID 1 is not. The dumpable
    window opens after every inherited descriptor but stdio and the report
    pipe is closed, and execve resets the flag anyway.
    """
    libc.prctl(libc.PR_SET_DUMPABLE, 1)
    with open("/proc/self/oom_score_adj", "w") as file:
        file.write(str(SANDBOX_OOM_SCORE_ADJ))
    libc.prctl(libc.PR_SET_DUMPABLE, 0)


def _describe(error: OSError, stage: str, message: protocol.Message) -> str:
    program = message["argv"][0]
    reason = error.strerror or str(error)
    if stage == "cwd":
        return f"cannot change to cwd {message['cwd']!r}: {reason}"
    if stage != "exec":
        return f"{stage} for {program!r} failed: {reason}"
    if error.errno == errno.ENOENT and "/" not in program:
        return f"executable {program!r} not found in PATH"
    if error.errno == errno.ENOENT:
        return f"executable {program!r} not found"
    if error.errno == errno.EACCES:
        return f"{program!r} is not executable: permission denied"
    return f"exec of {program!r} failed: {reason}"
