"""Serve SandboxService on the daemon's direct socket.

``engine.direct`` describes the wire format. A call here takes the same steps
as on gRPC: its token selects the workspace (``auth.resolve_workspace``), the
SandboxServicer method runs, and ``interceptor.status_of`` turns an exception
into a status. Only the transport differs: frames on a unix socket, read and
written by the daemon's event loop with no thread in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any, NamedTuple

from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from engine import direct
from engine.core.tenancy import enter_workspace
from engine.errors import FailedPrecondition, InvalidArgument, Unavailable
from engine.server.auth import TokenLookup, resolve_workspace
from engine.server.interceptor import status_of
from engine.server.servicer import SandboxServicer
from engine.v1 import sandbox_pb2

logger = logging.getLogger(__name__)

SERVICE = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"]


class DirectMethod(NamedTuple):
    name: str
    request_type: type[Message]
    streaming: bool


def served_methods() -> dict[str, DirectMethod]:
    """Return SandboxService's unary and server-streaming methods, by name."""
    methods = {}
    for method in SERVICE.methods:
        if method.client_streaming:
            continue
        request_type = message_factory.GetMessageClass(method.input_type)
        methods[method.name] = DirectMethod(
            method.name, request_type, method.server_streaming
        )
    return methods


class DirectServer:
    """The direct socket's listener and its connections.

    ``bind`` creates the socket with mode 0600 before the engine starts, as
    the gRPC socket is; ``start`` accepts connections on the running loop.
    """

    def __init__(
        self, servicer: SandboxServicer, lookup: TokenLookup, max_request_bytes: int
    ) -> None:
        self.servicer = servicer
        self.lookup = lookup
        self.max_request_bytes = max_request_bytes
        self.methods = served_methods()
        self.connections: set[_Connection] = set()
        self.path: Path | None = None
        self._listener: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        # Set when the daemon starts to stop. Requests that arrive later get
        # UNAVAILABLE, because grpc.aio's server also takes no new calls then.
        self.stopping = False

    def bind(self, path: Path) -> None:
        """Create the listening socket at ``path``, replacing a stale one.

        A socket file there that no process accepts connections on is left
        by a daemon that died. One that a process still serves, such as the
        gRPC socket of a daemon started with ``--socket`` set to this path,
        raises FailedPrecondition.
        """
        # app imports this module, so its helper is imported here.
        from engine.server.app import socket_accepts

        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FailedPrecondition(
                    f"{path} exists and is not a socket; remove it or choose"
                    " another --socket"
                )
            if socket_accepts(path):
                raise FailedPrecondition(
                    f"another process accepts connections on {path}, which this"
                    " daemon needs for its direct socket; stop that process or"
                    " choose another --socket"
                )
            os.unlink(path)
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        # The umask keeps the socket private from the moment it exists.
        previous_umask = os.umask(0o177)
        try:
            listener.bind(str(path))
            listener.listen(socket.SOMAXCONN)
        except OSError as error:
            listener.close()
            raise FailedPrecondition(f"failed to bind {path}: {error}") from error
        finally:
            os.umask(previous_umask)
        self._listener = listener
        self.path = path
        self._inode = os.stat(path).st_ino

    async def start(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        # create_unix_server calls listen again, with a backlog of 100 unless
        # it is given one, so a burst of more clients would get EAGAIN.
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), sock=self._listener, backlog=socket.SOMAXCONN
        )

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let calls in progress run for ``grace`` seconds, then cancel.

        Connections that wait for their next request close at once. A request
        that arrives later, on a connection whose call was in progress, gets
        UNAVAILABLE.
        """
        self.stopping = True
        if self._server is not None:
            self._server.close()
        calls = [c.call for c in self.connections if c.call is not None]
        for connection in list(self.connections):
            if connection.call is None:
                connection.close()
        if calls:
            _, pending = await asyncio.wait(calls, timeout=grace)
            for call in pending:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        for connection in list(self.connections):
            connection.close()
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the socket file, unless another process replaced it."""
        if self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        if self._server is None and self._listener is not None:
            self._listener.close()


class _Connection(asyncio.Protocol):
    """One client connection: it reads request frames and runs one call at a time.

    The client's hangup (EOF or a reset) cancels the call in progress, as the
    cancellation of a gRPC call does.
    """

    def __init__(self, server: DirectServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._closed = False
        # Set while writing waits for the client to read.
        self._writable: asyncio.Future[None] | None = None
        # Frames written in this loop iteration, and their total size.
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0
        self.call: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.call is None:
            self._start_next_call()
        elif len(self._buffer) > self._server.max_request_bytes + _MAX_HEADERS_BYTES:
            # A client never sends while its call runs, so this one is broken.
            logger.info("direct socket: closing a connection that sent data mid-call")
            self.close()

    def eof_received(self) -> bool:
        self._hang_up()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._hang_up()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._server.connections.discard(self)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def close(self) -> None:
        """Send the queued frames, then close the connection."""
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def write(self, frame: bytes) -> None:
        """Queue ``frame``, to be sent with the others of this loop iteration.

        Frames written together, such as a stream's last message and its END
        frame, then reach the client in one send and wake it once.
        """
        if self._closed or self._transport is None:
            return
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unsent.append(frame)
        self._unsent_bytes += len(frame)
        if self._unsent_bytes >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._unsent and not self._closed and self._transport is not None:
            self._transport.write(b"".join(self._unsent))
        self._unsent.clear()
        self._unsent_bytes = 0

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        if self._unsent_bytes >= _FLUSH_BYTES:
            self._flush()
        if self._writable is not None:
            await self._writable
        if self._closed:
            raise ConnectionResetError("the direct socket's client hung up")

    def _hang_up(self) -> None:
        if self.call is not None:
            self.call.cancel()
        self.close()

    def _start_next_call(self) -> None:
        """Start the call whose request is complete in the buffer, if any."""
        header_size = direct.REQUEST_HEADER.size
        if len(self._buffer) < header_size or self._closed:
            return
        sizes = direct.REQUEST_HEADER.unpack_from(self._buffer)
        body_size, method_size, token_size = sizes
        problem = self._check_sizes(body_size, method_size, token_size)
        if problem is not None:
            logger.info("direct socket: rejected a request: %s", problem)
            self.write(direct.encode_end(InvalidArgument.code, problem))
            self.close()
            return
        end = header_size + method_size + token_size + body_size
        if len(self._buffer) < end:
            return

        if self._server.stopping:
            logger.info("direct socket: rejected a request: the daemon is stopping")
            self.write(
                direct.encode_end(
                    Unavailable.code,
                    "the engine daemon is stopping; retry once it runs again",
                )
            )
            self.close()
            return

        frame = bytes(self._buffer[header_size:end])
        del self._buffer[:end]
        name = frame[:method_size].decode("ascii", errors="replace")
        # An empty token field means no token. A sent one loses surrounding
        # whitespace, as the gRPC bearer token does.
        token = None
        if token_size:
            token_bytes = frame[method_size : method_size + token_size]
            token = token_bytes.decode(errors="replace").strip()
        body = frame[method_size + token_size :]
        self.call = asyncio.get_running_loop().create_task(self._run(name, token, body))
        self.call.add_done_callback(self._call_done)

    def _call_done(self, call: asyncio.Task[None]) -> None:
        self.call = None
        if not call.cancelled() and call.exception() is not None:
            # _run turns every error into an END frame, so this is a broken
            # connection, such as a reset while writing.
            self.close()
            return
        self._start_next_call()

    def _check_sizes(
        self, body_size: int, method_size: int, token_size: int
    ) -> str | None:
        if method_size > direct.MAX_METHOD_BYTES:
            return (
                f"invalid method name of {method_size} bytes; names are at most"
                f" {direct.MAX_METHOD_BYTES} bytes"
            )
        if token_size > direct.MAX_TOKEN_BYTES:
            return (
                f"invalid token of {token_size} bytes; tokens are at most"
                f" {direct.MAX_TOKEN_BYTES} bytes"
            )
        limit = self._server.max_request_bytes
        if body_size > limit:
            return (
                f"request of {body_size} bytes is larger than the daemon's maximum"
                f" of {limit} bytes"
            )
        return None

    async def _run(self, name: str, token: str | None, body: bytes) -> None:
        """Run method ``name`` and write its responses, then its END frame."""
        method = self._server.methods.get(name)
        if method is None:
            served = ", ".join(sorted(self._server.methods))
            self.write(
                direct.encode_end(
                    "UNIMPLEMENTED",
                    f"method {name!r} is not served on the direct socket; it serves"
                    f" SandboxService's {served}",
                )
            )
            return
        full_name = f"{SERVICE.name}.{method.name}"
        request: Any = None
        try:
            workspace, local_admin = resolve_workspace(
                token, unix_peer=True, lookup=self._server.lookup
            )
            enter_workspace(workspace, local_admin=local_admin)
            try:
                request = method.request_type.FromString(body)
            except DecodeError as error:
                raise InvalidArgument(
                    f"invalid request to {full_name}: {error}"
                ) from None
            # SandboxServicer's methods take a gRPC context but never use it.
            handler = getattr(self._server.servicer, method.name)
            if method.streaming:
                async for response in handler(request, None):
                    self.write(direct.encode_message(response.SerializeToString()))
                    await self.drain()
            else:
                response = await handler(request, None)
                self.write(direct.encode_message(response.SerializeToString()))
            self.write(direct.encode_end("OK"))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as error:
            code, details, _ = status_of(full_name, request, error)
            self.write(direct.encode_end(code.name, details))


# Queued reply bytes past which ``write`` sends at once.
_FLUSH_BYTES = 64 * 1024
# The request header plus the largest method name and token.
_MAX_HEADERS_BYTES = (
    direct.REQUEST_HEADER.size + direct.MAX_METHOD_BYTES + direct.MAX_TOKEN_BYTES
)
