"""The asyncio form of ``engine.sdk.direct``, for ``AsyncClient``.

``AsyncDirectChannel`` belongs to the event loop that first uses it, as a
grpc.aio channel does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.message import Message

from engine import direct
from engine.sdk.direct import (
    MAX_IDLE_CONNECTIONS,
    MAX_REPLY_BYTES,
    ChannelBase,
    DirectUnreachable,
    raise_for_status,
    transport_error,
)


class _AsyncConnection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer

    def is_idle(self) -> bool:
        """Return whether the daemon neither closed this connection nor sent on it."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        """Return the kind and payload of the next reply frame."""
        try:
            header = await self.reader.readexactly(direct.REPLY_HEADER.size)
            size, kind = direct.REPLY_HEADER.unpack(header)
            if size > MAX_REPLY_BYTES:
                raise ConnectionError(
                    f"reply frame of {size} bytes is larger than the SDK's maximum"
                    f" of {MAX_REPLY_BYTES} bytes"
                )
            return kind, await self.reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the daemon closed the connection") from None

    def close(self) -> None:
        self.writer.close()


class AsyncDirectChannel(ChannelBase):
    """Calls of SandboxService over the direct socket at ``path``, from asyncio."""

    def __init__(self, path: str, token: str | None, address: str) -> None:
        super().__init__(path, token, address)
        self._idle: list[_AsyncConnection] = []

    async def call(self, method: str, request: Message, timeout: float | None) -> Any:
        """Call unary ``method`` and return its response, as DirectChannel.call does."""
        connection = await self._send(method, request)
        try:
            async with asyncio.timeout(timeout):
                response = None
                while True:
                    kind, payload = await connection.read_frame()
                    if kind != direct.MESSAGE:
                        break
                    response = self._response(method, payload)
        except BaseException as error:
            connection.close()
            raise transport_error(self._address, method, error) from None
        self._release(connection)
        raise_for_status(payload)
        return response

    async def start_stream(self, method: str, request: Message) -> AsyncIterator[Any]:
        """Send a call of ``method`` and return its responses, as DirectChannel does."""
        connection = await self._send(method, request)
        return self._responses(method, connection)

    async def _responses(
        self, method: str, connection: _AsyncConnection
    ) -> AsyncIterator[Any]:
        finished = False
        try:
            while True:
                try:
                    kind, payload = await connection.read_frame()
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

    async def _send(self, method: str, request: Message) -> _AsyncConnection:
        frame = self._request_frame(method, request)
        connection = self._take_idle()
        if connection is not None:
            try:
                await connection.send(frame)
                return connection
            except (BrokenPipeError, ConnectionResetError):
                # The daemon closed the idle connection as it stopped, before
                # the loop read the EOF. The request never ran, so it goes
                # out again on a new connection, as DirectChannel does.
                connection.close()
            except BaseException as error:
                connection.close()
                raise transport_error(self._address, method, error) from None
        try:
            reader, writer = await asyncio.open_unix_connection(self.path)
        except OSError as error:
            raise DirectUnreachable(f"{self.path}: {error}") from None
        connection = _AsyncConnection(reader, writer)
        try:
            await connection.send(frame)
        except BaseException as error:
            connection.close()
            raise transport_error(self._address, method, error) from None
        return connection

    def _take_idle(self) -> _AsyncConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.is_idle():
                return connection
            connection.close()
        return None

    def _release(self, connection: _AsyncConnection) -> None:
        if len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append(connection)
        else:
            connection.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for connection in idle:
            await connection.writer.wait_closed()
