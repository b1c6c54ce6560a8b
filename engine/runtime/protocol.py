"""Messages between the Engine, the zygote, the supervisors and each PID 1.

Each message is one SOCK_SEQPACKET datagram, with up to ``MAX_FDS`` file
descriptors attached as SCM_RIGHTS. Datagram boundaries keep every descriptor
with the message it belongs to. The zygote speaks JSON objects. Each
sandbox's supervisor and PID 1 are engine-init, a C program (native/), which
speaks fixed binary messages that start with the byte ``INIT_MAGIC``;
``recv`` turns them into the same dicts, so callers see one kind of message.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import select
import socket
import struct
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


# The binary messages of init.c: a header of magic, op and request id.
INIT_MAGIC = 0xE1
INIT_HEADER = struct.Struct("<BBHI")
INIT_EXEC, INIT_KILL, INIT_TERMINATE, INIT_START = 1, 2, 3, 4
INIT_READY, INIT_STARTED, INIT_FAILED, INIT_EXIT = 0x81, 0x82, 0x83, 0x84
INIT_KILLED, INIT_FORKED, INIT_INVALID = 0x85, 0x86, 0x87
_EXEC_FIELDS = struct.Struct("<III")
_KILL_FIELDS = struct.Struct("<iiI")
_INT32 = struct.Struct("<i")
_TWO_INT32 = struct.Struct("<ii")


def encode_exec(
    request_id: int,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    nofile: int,
) -> bytes:
    """Encode an exec request for PID 1; strings must not contain NUL."""
    strings = [cwd, *argv, *(f"{key}={value}" for key, value in env.items())]
    payload = b"".join(os.fsencode(text) + b"\0" for text in strings)
    data = (
        INIT_HEADER.pack(INIT_MAGIC, INIT_EXEC, 0, request_id)
        + _EXEC_FIELDS.pack(nofile, len(argv), len(env))
        + payload
    )
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"exec request of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte"
            " limit"
        )
    return data


def encode_start(spec: Message) -> bytes:
    """Encode a sandbox's spec for its supervisor, engine-init (native/setup.c).

    The body is NUL-terminated "key=value" strings. Each bind and volume is
    a "bind=", "volume_ro=" or "volume_rw=" string with the host source,
    followed by its target path on its own.
    """
    root = spec["root"]
    fields = [
        ("hostname", spec["hostname"]),
        ("root", root["root"]),
        ("lower", root["lower"]),
        ("upper", root["upper"]),
        ("work", root["work"]),
        ("workdir", spec["workdir"]),
    ]
    for name in ("tmp", "shm"):
        for key, value in (spec.get(name) or {}).items():
            if value is not None:
                fields.append((f"{name}_{key}", str(int(value))))
    for key in ("address", "resolv_conf"):
        if spec.get(key) is not None:
            fields.append((key, spec[key]))
    strings = [f"{key}={value}" for key, value in fields]
    for source, target in root["binds"]:
        strings += [f"bind={source}", target]
    for volume in spec.get("volumes", ()):
        mode = "ro" if volume["read_only"] else "rw"
        strings += [f"volume_{mode}={volume['source']}", volume["target"]]
    for text in strings:
        if "\0" in text:
            raise ValueError(f"sandbox spec field {text[:80]!r} contains a NUL byte")
    payload = b"".join(os.fsencode(text) + b"\0" for text in strings)
    return INIT_HEADER.pack(INIT_MAGIC, INIT_START, 0, 0) + payload


def encode_kill(pid: int, signal: int, group: bool) -> bytes:
    return INIT_HEADER.pack(INIT_MAGIC, INIT_KILL, 0, 0) + _KILL_FIELDS.pack(
        pid, signal, int(group)
    )


def encode_terminate() -> bytes:
    return INIT_HEADER.pack(INIT_MAGIC, INIT_TERMINATE, 0, 0)


def _decode_init(data: bytes) -> Message:
    """Turn a binary message of PID 1 into the dict form of the JSON messages."""
    if len(data) < INIT_HEADER.size:
        raise ValueError(f"message of PID 1 is {len(data)} bytes, under its header")
    _, op, _, request_id = INIT_HEADER.unpack_from(data)
    body = data[INIT_HEADER.size :]
    if op == INIT_READY:
        return {"op": "ready"}
    if op == INIT_STARTED:
        return {"op": "started", "id": request_id, "pid": _INT32.unpack_from(body)[0]}
    if op in (INIT_FAILED, INIT_INVALID):
        (number,) = _INT32.unpack_from(body)
        message = body[_INT32.size :].decode(errors="replace")
        decoded = {
            "op": "failed",
            "id": request_id,
            "errno": number,
            "message": message,
        }
        if op == INIT_INVALID:
            # The request itself cannot work, such as a workdir below a file.
            decoded["invalid"] = True
        return decoded
    if op == INIT_KILLED:
        return {"op": "killed"}
    if op == INIT_FORKED:
        return {"op": "init", "pid": _INT32.unpack_from(body)[0]}
    if op == INIT_EXIT:
        pid, status = _TWO_INT32.unpack_from(body)
        return {"op": "exit", "pid": pid, "status": status}
    raise ValueError(f"message of PID 1 has unknown op {op:#x}")


def send_raw(
    sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()
) -> None:
    """Send one encoded message with ``fds`` attached; blocks until it is queued."""
    socket.send_fds(sock, [data], list(fds))


def decode(data: bytes, fds: list[int]) -> tuple[Message, list[int]]:
    try:
        if data and data[0] == INIT_MAGIC:
            message = _decode_init(data)
        else:
            message = json.loads(data)
    except (ValueError, struct.error) as error:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"undecodable message: {error}") from error
    return message, fds


def wait_readable(fd: int | socket.socket, timeout: float | None = None) -> bool:
    """Wait until ``fd`` is readable or at end of stream; False after ``timeout`` s.

    poll(2), unlike select(2), takes descriptors of any number: a daemon with
    a thousand sandboxes holds descriptors far above 1024.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    milliseconds = None if timeout is None else max(0, round(timeout * 1000))
    return bool(poller.poll(milliseconds))


class TruncatedMessage(OSError):
    """A message whose descriptors did not fit, often for lack of free descriptors.

    ``message`` is the decoded message; its descriptors are closed.
    """

    def __init__(self, message: Message) -> None:
        super().__init__(
            errno.EMFILE,
            "a message's descriptors were lost; the receiving process may be out"
            " of file descriptors (raise its RLIMIT_NOFILE)",
        )
        self.message = message


# The socket module's MSG_* constants are enum.IntFlag members, and ``int &
# IntFlag`` builds a new flag object on every call, so recv tests plain ints.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_FD_BYTES = array.array("i").itemsize
_ANCILLARY_BYTES = socket.CMSG_LEN(MAX_FDS * _FD_BYTES)


def pending_bytes(sock: socket.socket) -> int:
    """Return the size of the next queued datagram (0 if none)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def recv(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """Receive one message and its descriptors, or None at end of stream.

    The descriptors are close-on-exec from the moment they arrive.
    """
    # FIONREAD on a unix datagram socket returns the length of the next
    # datagram, so the buffer is as large as the message and no larger.
    size = pending_bytes(sock)
    if size == 0:
        # Nothing queued yet: block until a datagram or end of stream arrives.
        wait_readable(sock)
        size = pending_bytes(sock)
    # socket.recv_fds (CPython 3.11) drops its flags argument, so it cannot
    # pass MSG_CMSG_CLOEXEC.
    data, ancillary, flags, _ = sock.recvmsg(
        max(size, 1), _ANCILLARY_BYTES, _MSG_CMSG_CLOEXEC
    )
    fds = _received_fds(ancillary)
    if not data:
        _close_all(fds)
        return None
    if flags & _MSG_TRUNC:
        _close_all(fds)
        raise OSError(errno.EMSGSIZE, "a message was truncated")
    if flags & _MSG_CTRUNC:
        _close_all(fds)
        raise TruncatedMessage(decode(data, [])[0])
    return decode(data, fds)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """Return the descriptors of the SCM_RIGHTS items of a recvmsg result."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _FD_BYTES
            fds.extend(array.array("i", payload[:whole]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
