"""A caller connection's transport that sends the small writes of one loop iteration together.

uvicorn writes a response's head when the application starts the response and its body when
the application sends it: two TLS records, two system calls, and on the caller's side two
wake-ups for one small answer. :class:`CoalescingTransport` holds a small write until the end
of the event-loop iteration that made it, so the head and a body sent right after it leave in
one ``writelines`` (one system call). Large writes (bulk bodies) go straight through, and so
does everything queued before them, so a transfer is neither delayed nor buffered here.

Anything else done to the transport (close, write_eof, abort) first deals with what is
queued, so the order of bytes and the end of the connection are those the protocol asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

#: Writes from this size on are not held back; held-back writes go out once they add up to it.
DIRECT_WRITE = 64 * 1024
#: Held-back writes adding up to less than this leave joined in one buffer.
JOIN_BELOW = 16 * 1024


class CoalescingTransport:
    """Wraps a transport; see the module docstring."""

    __slots__ = ("_loop", "_pending", "_pending_size", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if not size:
            return
        if not self._pending:
            if size >= DIRECT_WRITE:
                self.transport.write(data)
                return
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._pending_size += size
        if self._pending_size >= DIRECT_WRITE:
            self.flush()

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what is held back now (the scheduled call finds nothing left to do)."""
        pending = self._pending
        if not pending:
            return
        size = self._pending_size
        self._pending = []
        self._pending_size = 0
        if self.transport.is_closing():
            return
        if len(pending) == 1:
            self.transport.write(pending[0])
        elif size < JOIN_BELOW:
            # One buffer, so one TLS record: a TLS transport makes a record of every buffer
            # it is handed, and the head and body of a small answer fit in one.
            self.transport.write(b"".join(pending))
        else:
            self.transport.writelines(pending)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._pending_size = 0
        self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self._pending_size

    def __getattr__(self, name: str) -> Any:
        # get_extra_info, is_closing, pause_reading, set_protocol...: the transport's own.
        return getattr(self.transport, name)
