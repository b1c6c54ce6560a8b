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
import logging
import os
import resource
import selectors
import signal
import socket
from dataclasses import dataclass, field

from engine.runtime import files, libc, protocol

log = logging.getLogger(__name__)

# PID 1 ignores nearly every signal, and ignored signals stay ignored across
# execve, so every exec'd program gets all of them back at their defaults;
# otherwise `yes | head` would see EPIPE instead of SIGPIPE.
_ALL_SIGNALS = tuple(
    number
    for number in range(1, signal.NSIG)
    if number not in (signal.SIGKILL, signal.SIGSTOP)
    and number in signal.valid_signals()
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# oom_score_adj of every process exec starts (-1000 to 1000; 0 is the default).
SANDBOX_OOM_SCORE_ADJ = 500


@dataclass
class Init:
    control: socket.socket
    # Pids of the processes started by exec that have not been reaped yet.
    children: set[int] = field(default_factory=set)
    # Pids of file operation workers that have not been reaped yet.
    workers: set[int] = field(default_factory=set)
    # RLIMIT_NOFILE now applied to PID 1, which every child inherits.
    nofile: int = -1

    def serve(self) -> None:
        """Serve the Engine until it sends terminate or closes the socket."""
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
        """Start the program with posix_spawn and return its pid.

        posix_spawn uses a vfork-style clone, so its cost does not grow with
        this process's memory, and it returns once execve has succeeded or
        with execve's error. The child inherits PID 1's namespaces, cgroups,
        capabilities, no_new_privs, seccomp filter and rlimits; the spawn
        attributes give it a new session, default signal handlers, an empty
        signal mask and the requested stdio. The one exception is glibc's two
        internal signals, 32 and 33, which glibc's posix_spawn leaves ignored
        and glibc programs take over at start-up. Every other descriptor of PID 1
        is close-on-exec.
        """
        if len(fds) != 3:
            raise OSError(
                errno.EINVAL, f"exec needs 3 stdio descriptors, not {len(fds)}"
            )
        argv = [str(arg) for arg in message["argv"]]
        env = {str(key): str(value) for key, value in message["env"].items()}
        self._set_nofile(int(message.get("nofile", 1024)))
        _change_directory(str(message["cwd"]))
        try:
            program = _find_program(argv[0], env.get("PATH", DEFAULT_PATH))
            pid = os.posix_spawn(
                program,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)
                ],
                setsid=True,
                setsigdef=_ALL_SIGNALS,
                setsigmask=(),
            )
        except OSError as error:
            raise OSError(error.errno, _describe(error, argv[0])) from None
        finally:
            os.chdir("/")
        _raise_oom_score(pid)
        return pid

    def _set_nofile(self, nofile: int) -> None:
        if nofile != self.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            self.nofile = nofile

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
            self.workers.discard(pid)
            if pid in self.children:
                self.children.discard(pid)
                protocol.send(
                    self.control, {"op": "exit", "pid": pid, "status": status}
                )

    def terminate(self) -> None:
        """Kill every other process of the namespace, report them, and return."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid in self.children:
                self.children.discard(pid)
                message = {"op": "exit", "pid": pid, "status": status}
                with contextlib.suppress(OSError):
                    protocol.send(self.control, message)


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


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _change_directory(cwd: str) -> None:
    """Make ``cwd`` PID 1's working directory for the next spawn.

    PID 1 is single-threaded, so changing its own cwd around the spawn is safe,
    and the child inherits it. The path is opened with RESOLVE_NO_MAGICLINKS,
    so a cwd such as /proc/self/fd/N or /proc/1/cwd cannot hand the child a
    directory that one of PID 1's descriptors holds, which might lie outside
    the sandbox's root.
    """
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = libc.openat2(libc.AT_FDCWD, cwd, flags, resolve=libc.RESOLVE_NO_MAGICLINKS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            reason = (
                "it passes through a /proc magic link or a symlink loop;"
                " use a plain directory"
            )
        else:
            reason = os.strerror(error.errno or errno.EIO)
        raise OSError(error.errno, f"cannot change to cwd {cwd!r}: {reason}") from None
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)


def _find_program(name: str, path: str) -> str:
    """Return the file to execute for argv[0], searching ``path`` as execvp does."""
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise OSError(errno.ENOENT, "not found in PATH", name)


def _raise_oom_score(pid: int) -> None:
    """Make the OOM killer pick the process before PID 1, the supervisor or the daemon.

    Raising a score needs no privilege. After execve the process is
    dumpable again and owned by the sandbox's root, which PID 1 is, so PID 1
    can write its file; a process that has already exited is skipped.
    """
    with (
        contextlib.suppress(OSError),
        open(f"/proc/{pid}/oom_score_adj", "w") as file,
    ):
        file.write(str(SANDBOX_OOM_SCORE_ADJ))


def _describe(error: OSError, program: str) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOENT and "/" not in program:
        return f"executable {program!r} not found in PATH"
    if error.errno == errno.ENOENT:
        return f"executable {program!r} not found"
    if error.errno == errno.EACCES:
        return f"{program!r} is not executable: permission denied"
    if error.errno == errno.ENOEXEC:
        return f"{program!r} is not in an executable format"
    return f"exec of {program!r} failed: {reason}"
