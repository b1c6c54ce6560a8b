"""The zygote: a single-threaded, pre-imported process that forks sandbox supervisors.

The Engine starts it once with ``python -m engine.runtime.zygote FD``, where FD
is one end of a SOCK_SEQPACKET pair. Forking from here, not from the
multi-threaded daemon, is what makes fork safe, and the imports done once here
are why no interpreter starts on the sandbox creation path. Messages:

    {"op": "prefork", "id", "uid_base", "uid_count"}
        + fds [cgroup.procs of every hierarchy]
        -> {"op": "preforked", "id", "pid"} + fds [the supervisor's control socket]
        or {"op": "failed", "id", "message"}
    {"op": "kill", "pid"}          SIGKILL a supervisor
and, unprompted, {"op": "reaped", "pid", "status"} when a supervisor exits.

When the Engine's socket closes, the zygote kills every supervisor and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import signal
import socket
import sys

from engine.runtime import isolation, namespaces, protocol, seccomp, supervisor

log = logging.getLogger(__name__)

# Seconds the zygote waits for a new supervisor to create its user namespace.
SPAWN_TIMEOUT = 10.0


class Zygote:
    def __init__(self, engine: socket.socket) -> None:
        self.engine = engine
        self.selector = selectors.DefaultSelector()
        self.pidfds: dict[int, int] = {}
        # Compiled once; every sandbox installs this same program.
        self.seccomp_program = seccomp.export_bpf(seccomp.build_filter())
        # uid base -> whether that host uid may own the sandboxes' user namespaces.
        self.unprivileged_owner: dict[int, bool] = {}

    def owner_uid(self, uid_base: int) -> int | None:
        """Return the host uid that will own new user namespaces, None for root."""
        if uid_base not in self.unprivileged_owner:
            allowed = isolation.can_own_user_namespace(uid_base)
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
        self.selector.register(self.engine, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    received = protocol.recv(self.engine)
                    if received is None:
                        self.shutdown()
                        return
                    self.handle(*received)
                else:
                    self.reap(key.data)

    def handle(self, message: protocol.Message, fds: list[int]) -> None:
        try:
            if message.get("op") == "prefork":
                self.prefork(message, fds)
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
        pid = os.fork()
        if pid == 0:
            keep = {supervisor_end.fileno(), notify_write, wait_read, *cgroup_fds}
            _close_all_except(keep)
            supervisor.run(
                supervisor_end,
                cgroup_fds,
                notify_write,
                wait_read,
                self.seccomp_program,
                owner_uid,
            )
        supervisor_end.close()
        os.close(notify_write)
        os.close(wait_read)
        pidfd = os.pidfd_open(pid)
        self.pidfds[pid] = pidfd
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        try:
            ready, _, _ = select.select([notify_read], [], [], SPAWN_TIMEOUT)
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

    def kill(self, pid: int) -> None:
        if pid in self.pidfds:
            signal.pidfd_send_signal(self.pidfds[pid], signal.SIGKILL)

    def reap(self, pid: int) -> None:
        pidfd = self.pidfds.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        protocol.send(self.engine, {"op": "reaped", "pid": pid, "status": status})

    def shutdown(self) -> None:
        for pid in list(self.pidfds):
            self.kill(pid)
        for pid, pidfd in list(self.pidfds.items()):
            os.waitpid(pid, 0)
            os.close(pidfd)
        self.pidfds.clear()


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
    # The zygote must not die from the terminal's Ctrl-C before the Engine
    # has terminated its sandboxes; it exits when the Engine's socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Zygote(engine).serve()


if __name__ == "__main__":
    main()
