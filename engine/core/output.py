"""Bounded, offset-addressed buffers for process output.

Each stream of each process keeps at most ``capacity`` bytes, and all the
streams of one sandbox together at most their ``OutputBudget``. When more
arrives, the oldest bytes are dropped, never the newest: first from streams
that have ended, then from the oldest streams still open. The daemon's memory
stays bounded however much a sandbox prints and however many processes it
starts. Offsets are absolute byte positions in the stream, so any number of
readers, early, late or repeated, read the same bytes, and a reader whose
offset fell out of the buffer is told how many bytes it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from engine.core.models import OutputChunk, Stream

# Largest chunk a reader receives at once, and the size at which small writes
# are gathered into one chunk, so that a process writing one byte at a time
# costs the same memory per byte as one writing megabytes.
MAX_CHUNK_BYTES = 64 * 1024


# Bytes per second of output that the daemon reads from one sandbox, and the
# bytes it reads at full speed before that rate applies. A process that writes
# faster blocks on its full pipe, so a flood costs the daemon bounded CPU.
DEFAULT_OUTPUT_RATE_BYTES = 64 * 1024 * 1024
DEFAULT_OUTPUT_BURST_BYTES = 16 * 1024 * 1024


class OutputRate:
    """Token bucket for the output bytes that the daemon reads from one sandbox."""

    def __init__(
        self,
        rate: float = DEFAULT_OUTPUT_RATE_BYTES,
        burst: float = DEFAULT_OUTPUT_BURST_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.last = clock()

    def take(self, count: int) -> float:
        """Spend ``count`` bytes; return the seconds to wait before reading more."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= count
        if self.tokens >= 0 or math.isinf(self.rate):
            return 0.0
        return -self.tokens / self.rate

    def lift(self) -> None:
        """Stop limiting, so that the last output drains at once."""
        self.rate = math.inf


class OutputBudget:
    """The bytes that all output buffers of one sandbox may hold together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.buffers: list[OutputBuffer] = []

    def reclaim(self) -> None:
        """Drop the oldest bytes until the buffers fit the limit again."""
        if self.used <= self.limit:
            return
        # Ended streams go first, then open ones, each oldest first.
        for only_closed in (True, False):
            for buffer in self.buffers:
                if self.used <= self.limit:
                    break
                if buffer.closed or not only_closed:
                    buffer.drop_front(self.used - self.limit)
        # Ended streams with nothing left need no more visits.
        self.buffers = [b for b in self.buffers if b.held or not b.closed]

    def release(self) -> None:
        """Drop everything every buffer holds; their readers see the gap as dropped."""
        for buffer in self.buffers:
            buffer.drop_front(buffer.held)
        self.buffers.clear()


class OutputBuffer:
    def __init__(
        self, stream: Stream, capacity: int, budget: OutputBudget | None = None
    ) -> None:
        self.stream = stream
        self.capacity = capacity
        self.budget = budget
        self._chunks: deque[bytes] = deque()
        # Small writes gather here until MAX_CHUNK_BYTES.
        self._tail = bytearray()
        self.held = 0
        # Absolute offset of the first byte still held.
        self.start = 0
        self.closed = False
        self._changed = asyncio.Event()
        # Futures that the next change completes, each once.
        self._waiters: list[asyncio.Future[None]] = []
        if budget is not None:
            budget.buffers.append(self)

    @property
    def end(self) -> int:
        """Absolute offset one past the last byte written so far."""
        return self.start + self.held

    @property
    def dropped(self) -> int:
        """Bytes dropped from the front so far."""
        return self.start

    def append(self, data: bytes) -> None:
        if not data:
            return
        self._tail += data
        if len(self._tail) >= MAX_CHUNK_BYTES:
            self._chunks.append(bytes(self._tail))
            self._tail = bytearray()
        self._grow(len(data))
        if self.held > self.capacity:
            self.drop_front(self.held - self.capacity)
        if self.budget is not None:
            self.budget.reclaim()
        self._notify()

    def _grow(self, count: int) -> None:
        self.held += count
        if self.budget is not None:
            self.budget.used += count

    def drop_front(self, count: int) -> None:
        """Drop up to ``count`` of the oldest bytes held."""
        count = min(count, self.held)
        remaining = count
        while remaining and self._chunks:
            first = self._chunks[0]
            if len(first) <= remaining:
                self._chunks.popleft()
                remaining -= len(first)
            else:
                self._chunks[0] = first[remaining:]
                remaining = 0
        if remaining:
            del self._tail[:remaining]
        self.start += count
        self._grow(-count)

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def add_waiter(self, waiter: asyncio.Future[None]) -> None:
        """Complete ``waiter`` at the next append or close."""
        self._waiters.append(waiter)

    def remove_waiter(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

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
        for chunk in (*self._chunks, self._tail):
            chunk_end = position + len(chunk)
            if chunk_end > offset and wanted > 0:
                piece = bytes(chunk[max(offset - position, 0) :][:wanted])
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
