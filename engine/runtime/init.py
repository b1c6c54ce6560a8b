"""The sandbox's PID 1, from its fork to the C program that serves the Engine.

The supervisor forks PID 1 into the new PID namespace. PID 1 finishes the
isolation steps in Python (``isolation.finish_in_init``) and then replaces
itself with engine-init (init.c, built by initbin.py) from the zygote's
sealed memfd. engine-init forks, watches and reaps every sandbox process and
serves the Engine's requests on the control socket. It is a few hundred KiB of C rather
than a Python interpreter, so an idle sandbox costs little memory.

PID 1 runs engine code, not sandbox code. The memfd is owned by host root and
not readable, so after execve the kernel keeps PID 1 non-dumpable with its
memory in the host's user namespace: sandbox code can neither ptrace it nor
open its /proc/1/mem or /proc/1/exe. The kernel drops every signal sent to it
from inside the namespace, because it handles none, except SIGCHLD, which it
blocks and reads from a signalfd. A SIGCHLD from sandbox code only makes it
look for children to reap.
"""

from __future__ import annotations

import os
import socket

# argv[0] of engine-init, which ps shows inside the sandbox.
INIT_NAME = "init"


def exec_init(
    init_fd: int, control: socket.socket, supervisor_pidfd: int, zygote_pidfd: int
) -> None:
    """Replace this process with engine-init serving ``control``; raise on failure.

    engine-init waits for the supervisor's exit through ``supervisor_pidfd``
    and then makes the zygote's death kill it, unless ``zygote_pidfd`` shows
    that the zygote has died already.
    """
    fds = (control.fileno(), supervisor_pidfd, zygote_pidfd)
    for fd in fds:
        os.set_inheritable(fd, True)
    os.execve(init_fd, [INIT_NAME, *map(str, fds)], {})
