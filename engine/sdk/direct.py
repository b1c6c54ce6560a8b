"""The SDK's side of the daemon's direct socket.

``engine.direct`` describes the wire format. ``DirectChannel`` keeps a few
idle connections and gives each call in flight a connection of its own, so
one channel serves many threads. A call that cannot connect raises
``DirectUnreachable`` before it sends anything, and the caller then makes the
same call over gRPC.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from google.protobuf import message_factory
from google.protobuf.message import Message

from engine import direct, errors
from engine.v1 import sandbox_pb2

_SERVICE = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"]
# Idle connections kept per channel. Others are closed when their call ends.
MAX_IDLE_CONNECTIONS = 8
# Largest reply frame the SDK reads, in bytes. A Run reply contains at most
# 1 MiB of each stream, and a streamed output chunk at most 1 MiB.
MAX_REPLY_BYTES = 64 * 1024 * 1024
_RECV_BYTES = 64 * 1024


class DirectUnreachable(Exception):
    """The direct socket does not accept connections, so nothing was sent."""


def response_types() -> dict[str, type[Message]]:
    """Return the response class of each SandboxService method, by name."""
    return {
        method.name: message_factory.GetMessageClass(method.output_type)
        for method in _SERVICE.methods
    }


class _Connection:
    """A connected socket and the bytes read from it but not yet consumed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def is_idle(self) -> bool:
        """Return whether the daemon neither closed this connection nor sent on it."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0) and not self.buffer

    def send(self, frame: bytes, deadline: float | None) -> None:
        self._set_timeout(deadline)
        self.sock.sendall(frame)

    def read_frame(self, deadline: float | None) -> tuple[int, bytes]:
        """Return the kind and payload of the next reply frame."""
        header = self._read_exactly(direct.REPLY_HEADER.size, deadline)
        size, kind = direct.REPLY_HEADER.unpack(header)
        if size > MAX_REPLY_BYTES:
            raise ConnectionError(
                f"reply frame of {size} bytes is larger than the SDK's maximum"
                f" of {MAX_REPLY_BYTES} bytes"
            )
        return kind, self._read_exactly(size, deadline)

    def _read_exactly(self, size: int, deadline: float | None) -> bytes:
        while len(self.buffer) < size:
            self._set_timeout(deadline)
            chunk = self.sock.recv(max(_RECV_BYTES, size - len(self.buffer)))
            if not chunk:
                raise ConnectionResetError("the daemon closed the connection")
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(remaining)

    def close(self) -> None:
        self.sock.close()


class ChannelBase:
    """The socket path, token and message types that both channel classes use."""

    def __init__(self, path: str, token: str | None, address: str) -> None:
        self.path = path
        self._token = token
        self._address = address
        self._response_types = response_types()

    def _request_frame(self, method: str, request: Message) -> bytes:
        body = request.SerializeToString()
        return direct.encode_request(method, self._token, body)

    def _response(self, method: str, payload: bytes) -> Any:
        return self._response_types[method].FromString(payload)


class DirectChannel(ChannelBase):
    """Calls of SandboxService over the direct socket at ``path``."""

    def __init__(self, path: str, token: str | None, address: str) -> None:
        super().__init__(path, token, address)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def call(self, method: str, request: Message, timeout: float | None) -> Any:
        """Call unary ``method`` and return its response.

        Raises DirectUnreachable when no connection could be made, and the
        engine.errors class of the daemon's status on failure.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        connection = self._send(method, request, deadline)
        try:
            response = None
            while True:
                kind, payload = connection.read_frame(deadline)
                if kind != direct.MESSAGE:
                    break
                response = self._response(method, payload)
        except BaseException as error:
            connection.close()
            raise transport_error(self._address, method, error) from None
        self._release(connection)
        raise_for_status(payload)
        return response

    def start_stream(self, method: str, request: Message) -> Iterator[Any]:
        """Send a call of server-streaming ``method`` and return its responses.

        Raises DirectUnreachable at once when no connection could be made.
        Closing the iterator before its end closes the connection, which
        cancels the call in the daemon.
        """
        connection = self._send(method, request, None)
        return self._responses(method, connection)

    def _responses(self, method: str, connection: _Connection) -> Iterator[Any]:
        finished = False
        try:
            while True:
                try:
                    kind, payload = connection.read_frame(None)
                except (OSError, ValueError) as error:
                    raise transport_error(self._address, method, error) from None
                if kind != direct.MESSAGE:
                    finished = True
                    break
                yield self._response(method, payload)
        finally:
            if finished:
                self._release(connection)
            else:
                connection.close()
        raise_for_status(payload)

    def _send(
        self, method: str, request: Message, deadline: float | None
    ) -> _Connection:
        frame = self._request_frame(method, request)
        connection = self._take_idle()
        if connection is not None:
            try:
                connection.send(frame, deadline)
                return connection
            except (BrokenPipeError, ConnectionResetError):
                # The daemon closed the idle connection as it stopped. The
                # request is incomplete on its side, so it never ran.
                connection.close()
            except BaseException as error:
                connection.close()
                raise transport_error(self._address, method, error) from None
        connection = self._connect()
        try:
            connection.send(frame, deadline)
        except BaseException as error:
            connection.close()
            raise transport_error(self._address, method, error) from None
        return connection

    def _connect(self) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as error:
            sock.close()
            raise DirectUnreachable(f"{self.path}: {error}") from None
        return _Connection(sock)

    def _take_idle(self) -> _Connection | None:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child shares its parent's sockets, so it must not
                # read the parent's replies.
                self._idle.clear()
                self._pid = os.getpid()
            while self._idle:
                connection = self._idle.pop()
                if connection.is_idle():
                    return connection
                connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS and self._pid == os.getpid():
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def transport_error(address: str, method: str, error: BaseException) -> BaseException:
    """Return the engine.errors exception for a failure of the connection itself.

    Exceptions other than timeouts and socket errors, such as
    KeyboardInterrupt, come back unchanged.
    """
    if isinstance(error, TimeoutError):
        return errors.DeadlineExceeded(
            f"the engine daemon at {address} did not reply to {method} in time"
        )
    if isinstance(error, (OSError, ValueError)):
        return errors.Unavailable(
            f"the connection to the engine daemon at {address} failed during"
            f" {method}: {error}. Check that the daemon still runs"
        )
    return error


def raise_for_status(payload: bytes) -> None:
    """Raise the engine.errors class of an END frame's status, unless it is OK."""
    code, details = direct.decode_end(payload)
    if code != "OK":
        raise errors.BY_CODE.get(code, errors.InternalError)(details)
