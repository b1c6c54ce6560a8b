"""The zygote: a single-threaded process that starts every sandbox helper.

The Engine starts it once with ``python -m engine.runtime.zygote FD INIT
LAYERS``, where FD is one end of a SOCK_SEQPACKET pair, INIT the path of the
compiled engine-init and LAYERS the mount point of the engine's layer file
system. The zygote first moves into a mount namespace of its own (see
``isolate_mounts``) and sends {"op": "ready"}. It spawns each sandbox's
supervisor, engine-init (native/setup.c), with posix_spawn from a sealed
memfd, and forks file workers, whose imports are done once here. Forking
from here, not from the multi-threaded daemon, is what makes fork safe.
Messages:

    {"op": "prefork", "id", "uid_base", "uid_count"}
        + fds [cgroup.procs of every hierarchy]
        -> {"op": "preforked", "id", "pid"} + fds [the supervisor's control socket]
        or {"op": "failed", "id", "message"}
    {"op": "file", "id", "action", "args", "cgroups": N}
        + fds [pidfd of a sandbox's PID 1, N cgroup.procs files, result,
               optional data]
        -> {"op": "started", "id", "pid"}; the worker reports on the result fd
        or {"op": "failed", "id", "message"}
    {"op": "kill", "pid"}          SIGKILL a supervisor or a file worker
and, unprompted, {"op": "reaped", "pid", "status"} when a child exits.

The zygote is a child subreaper: each supervisor exits once it has forked its
sandbox's PID 1, and the zygote becomes that PID 1's parent and reaps it,
which it reports the same way. When the Engine's socket closes, the zygote
kills its supervisors and workers and exits. Every PID 1 exits by itself
when its own socket to the Engine closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
from pathlib import Path

from engine.runtime import (
    capabilities,
    fileworker,
    initbin,
    libc,
    namespaces,
    protocol,
    seccomp,
)

log = logging.getLogger(__name__)

# argv[0] of every supervisor, which ps shows on the host.
SUPERVISOR_NAME = "engine-sandbox"
# Seconds the zygote waits for a new supervisor to create its user namespace.
SPAWN_TIMEOUT = 10.0
# prctl(2) option from <linux/prctl.h>.
PR_SET_CHILD_SUBREAPER = 36
# Name of the directory, below each engine's data dir, where its layer file
# system is mounted.
LAYERS_DIR_NAME = "sandboxes"


class Zygote:
    def __init__(self, engine: socket.socket, init_path: str) -> None:
        self.engine = engine
        self.selector = selectors.DefaultSelector()
        # Supervisors and file workers, which shutdown kills, by pid.
        self.pidfds: dict[int, int] = {}
        # Compiled once; every sandbox installs this same program, which
        # engine-init reads from a sealed memfd and file workers from memory.
        self.seccomp_program = seccomp.export_bpf(seccomp.build_filter())
        self.seccomp_fd = initbin.sealed_data(
            "engine-seccomp", self.seccomp_program, 0o400
        )
        os.set_inheritable(self.seccomp_fd, True)
        # Every supervisor executes this one sealed copy of engine-init, and
        # forks its sandbox's PID 1 from it. The seccomp memfd stays
        # inheritable, since every supervisor reads it.
        self.init_fd = initbin.sealed_memfd(Path(init_path))
        self.init_path = f"/proc/self/fd/{self.init_fd}"
        # uid base -> whether that host uid may own the sandboxes' user namespaces.
        self.unprivileged_owner: dict[int, bool] = {}

    def owner_uid(self, uid_base: int) -> int | None:
        """Return the host uid that will own new user namespaces, None for root."""
        if uid_base not in self.unprivileged_owner:
            allowed = namespaces.can_own_user_namespace(uid_base)
            self.unprivileged_owner[uid_base] = allowed
            if not allowed:
                log.warning(
                    "host uid %d may not create user namespaces here, so sandbox "
                    "user namespaces are owned by root and share root's per-user "
                    "kernel limits (inotify instances, pending signals, message "
                    "queues); allow unprivileged user namespaces to separate them",
                    uid_base,
                )
        return uid_base if self.unprivileged_owner[uid_base] else None

    def serve(self) -> None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(self.engine, selectors.EVENT_READ, "engine")
        self.selector.register(wakeup_read, selectors.EVENT_READ, "child")
        while True:
            for key, _ in self.selector.select():
                if key.data == "child":
                    _drain(wakeup_read)
                    self.reap()
                    continue
                received = protocol.recv(self.engine)
                if received is None:
                    self.shutdown()
                    return
                self.handle(*received)

    def handle(self, message: protocol.Message, fds: list[int]) -> None:
        try:
            if message.get("op") == "prefork":
                self.prefork(message, fds)
            elif message.get("op") == "file":
                self.file(message, fds)
            elif message.get("op") == "kill":
                self.kill(message["pid"])
        finally:
            for fd in fds:
                os.close(fd)

    def prefork(self, message: protocol.Message, cgroup_fds: list[int]) -> None:
        request_id = message["id"]
        engine_end, supervisor_end = protocol.socketpair()
        notify_read, notify_write = os.pipe2(os.O_CLOEXEC)
        wait_read, wait_write = os.pipe2(os.O_CLOEXEC)
        owner_uid = self.owner_uid(message["uid_base"])
        try:
            pid = self.spawn_supervisor(
                supervisor_end.fileno(), notify_write, wait_read, cgroup_fds, owner_uid
            )
        except OSError as error:
            for fd in (notify_read, notify_write, wait_read, wait_write):
                os.close(fd)
            supervisor_end.close()
            engine_end.close()
            reply = {"op": "failed", "id": request_id, "message": str(error)}
            protocol.send(self.engine, reply)
            return
        supervisor_end.close()
        os.close(notify_write)
        os.close(wait_read)
        try:
            ready = protocol.wait_readable(notify_read, SPAWN_TIMEOUT)
            if not ready or os.read(notify_read, 1) != b"u":
                raise OSError(0, "the supervisor exited before creating its namespaces")
            namespaces.write_id_maps(pid, message["uid_base"], message["uid_count"])
            os.write(wait_write, b"g")
        except OSError as error:
            self.kill(pid)
            engine_end.close()
            reply = {"op": "failed", "id": request_id, "message": str(error)}
            protocol.send(self.engine, reply)
            return
        finally:
            os.close(notify_read)
            os.close(wait_write)
        reply = {"op": "preforked", "id": request_id, "pid": pid}
        protocol.send(self.engine, reply, [engine_end.fileno()])
        engine_end.close()

    def spawn_supervisor(
        self,
        control: int,
        notify: int,
        wait: int,
        cgroup_fds: list[int],
        owner_uid: int | None,
    ) -> int:
        """Start engine-init as a new sandbox's supervisor; return its pid.

        posix_spawn shares this process's memory until the child executes, so
        no page of the zygote's Python image is copied or faulted in. The
        child inherits only the descriptors named in its environment
        (native/setup.c), which are made inheritable just for the spawn: the
        zygote is single-threaded, so no other child can inherit them.
        """
        passed = (control, notify, wait, *cgroup_fds)
        env = {
            "CONTROL_FD": str(control),
            "NOTIFY_FD": str(notify),
            "WAIT_FD": str(wait),
            "SECCOMP_FD": str(self.seccomp_fd),
            "CGROUP_FDS": ",".join(map(str, cgroup_fds)),
            "ZYGOTE_PID": str(os.getpid()),
            "OWNER_UID": str(-1 if owner_uid is None else owner_uid),
            "KEEP_CAPS": str(capabilities.KEPT_MASK),
        }
        for fd in passed:
            os.set_inheritable(fd, True)
        try:
            pid = os.posix_spawn(self.init_path, [SUPERVISOR_NAME], env)
        finally:
            for fd in passed:
                os.set_inheritable(fd, False)
        self.pidfds[pid] = os.pidfd_open(pid)
        return pid

    def file(self, message: protocol.Message, fds: list[int]) -> None:
        """Fork a worker for one file operation in the sandbox of fds[0]."""
        request_id = message["id"]
        cgroups = message.get("cgroups", 0)
        if not isinstance(cgroups, int) or not 2 <= len(fds) - cgroups <= 3:
            reply = {"op": "failed", "id": request_id, "message": "bad descriptors"}
            protocol.send(self.engine, reply)
            return
        pid = os.fork()
        if pid == 0:
            fileworker.run(
                fds[0],
                fds[1 : 1 + cgroups],
                message,
                fds[1 + cgroups :],
                self.seccomp_program,
            )
        self.pidfds[pid] = os.pidfd_open(pid)
        protocol.send(self.engine, {"op": "started", "id": request_id, "pid": pid})

    def kill(self, pid: int) -> None:
        if pid in self.pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfds[pid], signal.SIGKILL)

    def reap(self) -> None:
        """Reap every exited child and report it: supervisors, workers, PID 1s."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            pidfd = self.pidfds.pop(pid, None)
            if pidfd is not None:
                os.close(pidfd)
            protocol.send(self.engine, {"op": "reaped", "pid": pid, "status": status})

    def shutdown(self) -> None:
        for pid in list(self.pidfds):
            self.kill(pid)
        for pid, pidfd in list(self.pidfds.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(pidfd)
        self.pidfds.clear()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _close_all_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s zygote %(levelname)s %(message)s"
    )
    engine = socket.socket(fileno=int(sys.argv[1]))
    # Passed to this process inheritable; supervisors must not inherit it.
    engine.set_inheritable(False)
    # The zygote must not die from the terminal's Ctrl-C before the Engine
    # has terminated its sandboxes; it exits when the Engine's socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    isolate_mounts(sys.argv[3])
    protocol.send(engine, {"op": "ready"})
    Zygote(engine, sys.argv[2]).serve()


def isolate_mounts(layers: str) -> None:
    """Move into a mount namespace that keeps the engine's layer file system.

    Every supervisor starts from a copy of this namespace. Mounts stay slaves
    of the host's, so the FUSE mounts the daemon makes later reach them, but
    the layer file system is private here: the Engine unmounts it from the
    host's namespace once the zygote is ready, and then only this engine's
    processes hold it. Another engine's supervisors, which copy the host's
    namespace, therefore never keep it mounted, and it goes with the last of
    this engine's processes. Layer file systems of other engines that were in
    the host's namespace when this one started are detached here, for the
    same reason.
    """
    namespaces.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_SLAVE)
    libc.mount(None, layers, None, libc.MS_PRIVATE)
    for target in _foreign_layer_mounts(layers):
        with contextlib.suppress(OSError):
            libc.umount2(target, libc.MNT_DETACH)


def _foreign_layer_mounts(own: str) -> list[str]:
    """Return the mount points of other engines' layer file systems."""
    found = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            target = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            if (
                fstype == "btrfs"
                and os.path.basename(target) == LAYERS_DIR_NAME
                and target != own
            ):
                found.append(target)
    return found


if __name__ == "__main__":
    main()
