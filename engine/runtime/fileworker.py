"""A file operation worker: forked by the zygote, run in a sandbox's namespaces.

The zygote forks one worker per file operation and passes it a pidfd of the
sandbox's PID 1. The worker joins every namespace of PID 1 but the PID
namespace with one setns(2) on that pidfd, which also makes the sandbox's
root its root and its working directory. It then takes the same identity
and limits as sandbox code: uid and gid 0 of the sandbox's user namespace
with no extra groups, the sandbox's capability bounding and kept sets,
no_new_privs and the seccomp filter. Paths therefore resolve exactly as they
do for sandbox code, and the worker can write only what sandbox code could
write (see files.py).

The worker stays outside the sandbox's PID namespace, so sandbox processes
cannot see, signal or ptrace it, and it is non-dumpable. Workers that write,
search or list files join the sandbox's cgroups first (the Engine passes
their cgroup.procs files). tmpfs pages stay charged to the memory cgroup of
the process that wrote them, so a file written to /tmp counts against the
sandbox's memory limit, as it would if sandbox code wrote it. A search or a
listing can take memory and CPU time without bound (a sparse file read as one
line, a huge directory, a backtracking pattern), which the sandbox's limits
then bound. The first move into a v1 cgroup after an idle while waits for an
RCU grace period (about 12 ms measured on Linux 6.18), so workers that only
read one file or change metadata stay in the zygote's cgroup. The Engine
kills a worker whose call was cancelled, and every worker of a sandbox at
terminate.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from engine.runtime import capabilities, files, libc, namespaces, seccomp

# The namespaces a worker joins: the user namespace for the sandbox's ids and
# capabilities, the mount namespace for its root and mounts, and the others
# because /proc shows the reader's. Without them /proc/sys/kernel/hostname,
# /proc/sysvipc/*, /proc/sys/net/* and the paths in /proc/PID/cgroup would
# show the host's. The PID namespace cannot be joined by the worker itself,
# only by its children, so /proc/self does not exist for it.
JOINED_NAMESPACES = (
    libc.CLONE_NEWUSER
    | libc.CLONE_NEWNS
    | libc.CLONE_NEWUTS
    | libc.CLONE_NEWIPC
    | libc.CLONE_NEWNET
    | libc.CLONE_NEWCGROUP
)


# The OOM killer picks the process with the highest oom_score_adj (-1000 to
# 1000) first, so a worker in the sandbox's cgroups that reaches its memory
# limit, for example by filling /tmp or reading a huge line, is killed before
# PID 1 (0) and before sandbox processes (500).
WORKER_OOM_SCORE_ADJ = 1000


def run(
    init_pidfd: int,
    cgroup_fds: list[int],
    message: dict[str, Any],
    fds: list[int],
    seccomp_program: bytes,
) -> None:
    """Body of a freshly forked worker; never returns."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_all_except({0, 1, 2, init_pidfd, *cgroup_fds, *fds})
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write(str(WORKER_OOM_SCORE_ADJ))
        # As host root, before setns takes away the right to write these.
        for fd in cgroup_fds:
            os.write(fd, b"0")
            os.close(fd)
        enter(init_pidfd, seccomp_program)
        result_fd = fds[0]
        data_fd = fds[1] if len(fds) > 1 else None
        status = files.run(
            message["action"], message.get("args", {}), result_fd, data_fd
        )
    except BaseException:  # the worker must exit, whatever happened
        status = 1
    finally:
        os._exit(status)


def enter(init_pidfd: int, seccomp_program: bytes) -> None:
    """Join the sandbox of ``init_pidfd`` and take the identity of its code."""
    # Supplementary groups survive setns and would keep the host's root group.
    os.setgroups([])
    libc.setns(init_pidfd, JOINED_NAMESPACES)
    os.close(init_pidfd)
    namespaces.become_root()
    os.chdir("/")
    capabilities.drop_bounding()
    capabilities.restrict()
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    seccomp.load_bpf(seccomp_program)


def _close_all_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
