"""Bounded, offset-addressed buffers for process output.

Each stream of each process keeps at most ``capacity`` bytes. When a process
writes more, the oldest bytes are dropped, never the newest, and the daemon's
memory stays bounded however much a sandbox prints. Offsets are absolute byte
positions in the stream, so any number of readers, early, late or repeated,
read the same bytes, and a reader whose offset fell out of the buffer is told
how many bytes it missed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from engine.core.models import OutputChunk, Stream

# Largest chunk a reader receives at once.
MAX_CHUNK_BYTES = 64 * 1024


class OutputBuffer:
    def __init__(self, stream: Stream, capacity: int) -> None:
        self.stream = stream
        self.capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._size = 0
        # Absolute offset of the first byte still held.
        self.start = 0
        self.closed = False
        self._changed = asyncio.Event()

    @property
    def end(self) -> int:
        """Absolute offset one past the last byte written so far."""
        return self.start + self._size

    @property
    def dropped(self) -> int:
        """Bytes dropped from the front so far."""
        return self.start

    def append(self, data: bytes) -> None:
        if not data:
            return
        if len(data) > self.capacity:
            skipped = len(data) - self.capacity
            data = data[skipped:]
            self.start += self._size + skipped
            self._chunks.clear()
            self._size = 0
        self._chunks.append(data)
        self._size += len(data)
        while self._size > self.capacity:
            first = self._chunks[0]
            excess = self._size - self.capacity
            if len(first) <= excess:
                self._chunks.popleft()
                self._size -= len(first)
                self.start += len(first)
            else:
                self._chunks[0] = first[excess:]
                self._size -= excess
                self.start += excess
        self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def read(self, offset: int, max_bytes: int = MAX_CHUNK_BYTES) -> OutputChunk:
        """Return up to ``max_bytes`` from ``offset`` without waiting.

        ``offset`` below the buffer's start is moved up to it and the gap is
        reported as ``dropped``. ``eof`` is set when the stream is closed and
        the chunk reaches its end.
        """
        offset = max(offset, 0)
        dropped = 0
        if offset < self.start:
            dropped = self.start - offset
            offset = self.start
        offset = min(offset, self.end)
        parts: list[bytes] = []
        position = self.start
        wanted = max_bytes
        for chunk in self._chunks:
            chunk_end = position + len(chunk)
            if chunk_end > offset and wanted > 0:
                piece = chunk[max(offset - position, 0) :][:wanted]
                parts.append(piece)
                wanted -= len(piece)
            position = chunk_end
            if wanted <= 0:
                break
        data = b"".join(parts)
        eof = self.closed and offset + len(data) >= self.end
        return OutputChunk(self.stream, offset, data, dropped, eof)

    async def follow(self, offset: int = 0) -> AsyncIterator[OutputChunk]:
        """Yield chunks from ``offset`` as they arrive; the last one has eof set."""
        while True:
            changed = self._changed
            chunk = self.read(offset)
            if chunk.data or chunk.dropped or chunk.eof:
                yield chunk
                if chunk.eof:
                    return
                offset = chunk.offset + len(chunk.data)
                continue
            await changed.wait()
