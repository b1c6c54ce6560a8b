"""Messages between the Engine, the zygote and the sandbox supervisors.

Each message is one JSON object in one SOCK_SEQPACKET datagram, with up to
``MAX_FDS`` file descriptors attached as SCM_RIGHTS. Datagram boundaries keep
every descriptor with the message it belongs to.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import select
import socket
import termios
from typing import Any

# The Engine rejects argv and env larger than this before sending them, so a
# request that fits the kernel's exec limits always fits one message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_FDS = 16

Message = dict[str, Any]


def socketpair() -> tuple[socket.socket, socket.socket]:
    """Return a close-on-exec SOCK_SEQPACKET pair sized for MAX_MESSAGE_BYTES."""
    left, right = socket.socketpair(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
    )
    for sock in (left, right):
        # SO_SNDBUFFORCE ignores net.core.wmem_max; the engine runs as root.
        sock.setsockopt(socket.SOL_SOCKET, 32, MAX_MESSAGE_BYTES * 2)  # SO_SNDBUFFORCE
        sock.setsockopt(socket.SOL_SOCKET, 33, MAX_MESSAGE_BYTES * 2)  # SO_RCVBUFFORCE
    return left, right


def encode(message: Message) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
        )
    return data


def send(
    sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()
) -> None:
    """Send one message with ``fds`` attached; blocks until it is queued."""
    socket.send_fds(sock, [encode(message)], list(fds))


def decode(data: bytes, fds: list[int]) -> tuple[Message, list[int]]:
    try:
        message = json.loads(data)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def pending_bytes(sock: socket.socket) -> int:
    """Return the size of the next queued datagram (0 if none)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def recv(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """Receive one message and its descriptors, or None at end of stream."""
    # FIONREAD on a unix datagram socket returns the length of the next
    # datagram, so the buffer is as large as the message and no larger.
    size = pending_bytes(sock)
    if size == 0:
        # Nothing queued yet: block until a datagram or end of stream arrives.
        select.select([sock], [], [])
        size = pending_bytes(sock)
    data, fds, flags, _ = socket.recv_fds(
        sock, max(size, 1), MAX_FDS, socket.MSG_CMSG_CLOEXEC
    )
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError("message or its descriptors were truncated")
    for fd in fds:
        os.set_inheritable(fd, False)
    return decode(data, fds)
