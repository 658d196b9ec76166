"""The byte buffer under both ends' WebSocket parsers, without a copy per received chunk.

``websockets`` parses frames out of a :class:`websockets.streams.StreamReader`, a bytearray
that every received chunk is appended to and every frame is cut from the front of. For the
tunnel's bulk messages (up to 256 KiB, arriving as many TLS records) that costs a copy per
append, a copy of the frame out of the buffer, and reallocations in between: a seventh of
the agent's CPU during an upload and a sixteenth of the relay's during a download.

:class:`ChunkReader` keeps the received chunks as they are and copies a frame's bytes once,
when the frame is complete (not at all when one chunk holds exactly the frame). It offers
the generator-based methods the parsers call (``read_line``, ``read_exact``,
``read_to_eof``, ``at_eof``, ``feed_data``, ``feed_eof``, ``discard``) with the same results
and errors; :func:`install` puts one under a ``websockets`` protocol before it has seen a
byte. The relay's uvicorn protocol and the agent's client connection both do so.
"""

from __future__ import annotations

import collections
from collections.abc import Generator
from typing import Any

from websockets.protocol import Protocol, State
from websockets.streams import StreamReader


class ChunkReader:
    """Received bytes as a queue of chunks; see the module docstring."""

    __slots__ = ("_chunks", "_offset", "_size", "eof")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of the first chunk already read
        self._size = 0  # bytes buffered and not yet read
        self.eof = False

    def __len__(self) -> int:
        return self._size

    # -- reading (generator-based coroutines, as websockets' parsers expect)

    def read_line(
        self, m: int, too_long_exc_type: type[Exception] = RuntimeError
    ) -> Generator[None, None, bytes]:
        """A LF-terminated line, LF included; only the opening handshake reads lines."""
        p = 0  # bytes known to hold no LF
        while True:
            n = self._flat().find(b"\n", p) + 1
            if n > 0:
                break
            p = self._size
            if p > m:
                raise too_long_exc_type(f"read {p} bytes, expected no more than {m} bytes")
            if self.eof:
                raise EOFError(f"stream ends after {p} bytes, before end of line")
            yield
        if n > m:
            raise too_long_exc_type(f"read {n} bytes, expected no more than {m} bytes")
        return self._take(n)

    def read_exact(self, n: int) -> Generator[None, None, bytes]:
        assert n >= 0
        while self._size < n:
            if self.eof:
                raise EOFError(f"stream ends after {self._size} bytes, expected {n} bytes")
            yield
        return self._take(n)

    def read_to_eof(
        self, m: int, too_long_exc_type: type[Exception] = RuntimeError
    ) -> Generator[None, None, bytes]:
        while not self.eof:
            if self._size > m:
                raise too_long_exc_type(f"read {self._size} bytes, expected no more than {m} bytes")
            yield
        return self._take(self._size)

    def at_eof(self) -> Generator[None, None, bool]:
        while True:
            if self._size:
                return False
            if self.eof:
                return True
            yield

    # -- feeding

    def feed_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof:
            raise EOFError("stream ended")
        if data:
            # A bytearray or memoryview may be reused by whoever passed it: keep a copy.
            chunk = data if type(data) is bytes else bytes(data)
            self._chunks.append(chunk)
            self._size += len(chunk)

    def feed_eof(self) -> None:
        if self.eof:
            raise EOFError("stream ended")
        self.eof = True

    def discard(self) -> None:
        self._chunks.clear()
        self._offset = 0
        self._size = 0

    # -- internals

    def _flat(self) -> bytes:
        """Everything buffered as one chunk (for line searches: a handshake's few bytes)."""
        chunks = self._chunks
        if not chunks:
            return b""
        if len(chunks) > 1 or self._offset:
            joined = b"".join([memoryview(chunks[0])[self._offset :], *list(chunks)[1:]])
            chunks.clear()
            chunks.append(joined)
            self._offset = 0
        return chunks[0]

    def _take(self, n: int) -> bytes:
        """The next ``n`` buffered bytes (``n`` at most what is buffered)."""
        if not n:
            return b""
        chunks = self._chunks
        first = chunks[0]
        start = self._offset
        end = start + n
        size = len(first)
        self._size -= n
        if end <= size:
            if end == size:
                chunks.popleft()
                self._offset = 0
                if not start:
                    return first  # the chunk is exactly what was asked for: no copy
            else:
                self._offset = end
            return first[start:end]
        parts: list[Any] = [memoryview(first)[start:]]
        chunks.popleft()
        need = end - size
        while True:
            chunk = chunks[0]
            size = len(chunk)
            if size > need:
                parts.append(memoryview(chunk)[:need])
                self._offset = need
                break
            parts.append(chunk)
            chunks.popleft()
            need -= size
            if not need:
                self._offset = 0
                break
        return b"".join(parts)


def install(protocol: Protocol) -> None:
    """Parse ``protocol``'s input out of a :class:`ChunkReader`; before any byte arrived."""
    reader: Any = protocol.reader
    if reader.eof or len(reader.buffer if isinstance(reader, StreamReader) else reader):
        raise RuntimeError("the protocol has already received data")
    old = protocol.parser
    protocol.reader = ChunkReader()  # type: ignore[assignment]
    protocol.parser = protocol.parse()
    next(protocol.parser)
    old.close()


def is_open(protocol: Protocol) -> bool:
    """``protocol.state is State.OPEN``, read without the property's interpreted frame.

    Both ends ask it of every tunnel message. The state is the protocol's ``_state`` in the
    websockets releases pyproject.toml allows; tests/backhaul/aio/test_wsreader.py holds them
    to it.
    """
    return protocol._state is State.OPEN
