"""uvicorn's sans-I/O WebSocket protocol, with the tunnel's hot path beside its ASGI one.

Every agent tunnel is one of these connections. Its frames are parsed out of a chunk reader
(:mod:`backhaul.aio.wsreader` says why), and once the tunnel's handshake is done its binary
messages skip the ASGI ``send``: the connection's scope offers :meth:`send_message` under
the ``backhaul.send_message`` extension, which frames a message and hands it to the
transport with the same checks (open, not closing, not paused) that ``send`` makes. Under
``backhaul.push_to`` it offers :meth:`push_to`: received binary messages handed to the
tunnel as they are parsed, instead of queued for the ASGI ``receive`` and the task behind
it (``backhaul.aio.tunnel.MessageTransport``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from backhaul.aio.waitflag import WaitFlag
from backhaul.aio.wsframes import binary_frame
from backhaul.aio.wsreader import install, is_open
from backhaul.aio.wssplit import FrameSplitter, limit_of
from backhaul.wire.frames import BulkMessage

#: The scope extension under which a tunnel connection offers :meth:`send_message`.
SEND_MESSAGE = "backhaul.send_message"
#: The scope extension under which a tunnel connection offers :meth:`push_to`.
PUSH_TO = "backhaul.push_to"

#: Received messages waiting for the tunnel before reading pauses (uvicorn pauses after one);
#: with 256 KiB DATA messages, about 2 MiB per tunnel at most.
QUEUE_HIGH = 8


class TunnelWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install(self.conn)
        # Checked before every message: asyncio.Event's interface without its interpreted
        # code (uvicorn made it set; pause_writing and resume_writing move it as before).
        self.writable = WaitFlag()  # type: ignore[assignment]
        self.writable.set()
        self._feed: Callable[[bytes], bool] | None = None
        #: The opening handshake's request has not been read yet.
        self._before_head = True
        #: Cuts out the frames once the handshake's request has been read; None: websockets
        #: parses them (before that, after a close or a failure, or for good).
        self._splitter: FrameSplitter | None = None

    def data_received(self, data: bytes) -> None:
        """Frames are cut out by a :class:`FrameSplitter` once the opening handshake's
        request has been read: whole binary messages go from there to the application (or
        the tunnel's feed), every other frame to websockets whole."""
        splitter = self._splitter
        if splitter is not None:
            splitter.feed(data)
            if splitter.done:
                self._splitter = None
            return
        super().data_received(data)
        if self._before_head:
            self._before_head = False
            # uvicorn hands over exactly the request's head (handle_websocket_upgrade): once
            # websockets has read it, its parser waits at the first frame's first byte. A
            # first chunk of any other shape leaves the frames to websockets.
            conn = self.conn
            end = data.find(b"\r\n\r\n")
            whole = end == len(data) - 4 and len(conn.reader) == 0  # type: ignore[arg-type]
            if whole and conn.parser_exc is None:
                limit = limit_of(conn.max_message_size, conn.max_fragment_size)
                self._splitter = FrameSplitter(True, limit, self._message, self._frame)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # References back to this object, each a cycle that would keep the connection's TLS
        # object and buffers until one of the collector's full collections (as in
        # relay.edge_http's connection_lost): the splitter's callbacks, the tunnel's feed and
        # the scope's extensions. Nothing feeds or reads them once the connection is lost.
        self._splitter = None
        self._feed = None
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"].pop(SEND_MESSAGE, None)
            scope["extensions"].pop(PUSH_TO, None)

    def _message(self, payload: bytes) -> bool:
        """A whole binary message, handed on as uvicorn's handle_bytes would, without the
        Frame websockets would build; declined while websockets holds part of a message or
        the connection is not open."""
        conn = self.conn
        if conn.current_size is not None or not is_open(conn):
            return False
        self.curr_msg_data_type = "bytes"
        self.frames = [payload]
        self.send_receive_event_to_app()
        return True

    def _frame(self, raw: bytes) -> bool:
        """Any other frame, or what follows the splitter's end, parsed by websockets."""
        super().data_received(raw)
        conn = self.conn
        return is_open(conn) and conn.parser_exc is None

    def push_to(self, feed: Callable[[bytes], bool]) -> bool:
        """Hand binary messages to ``feed`` from now on, if none wait in the queue."""
        if not self.queue.empty():
            return False
        self._feed = feed
        return True

    def send_receive_event_to_app(self) -> None:
        """A binary message goes to the tunnel's ``feed`` when it pushes, nothing is queued
        ahead of the message and the feed takes it; anything else goes to the queue below."""
        feed = self._feed
        if (
            feed is not None
            and self.curr_msg_data_type == "bytes"
            and not self.close_sent
            and self.queue.empty()
        ):
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            if feed(data if type(data) is bytes else bytes(data)):
                self.frames = []
                return
        self._queue_for_app()

    def _queue_for_app(self) -> None:
        """Queue a received message as uvicorn does, but pause reading only once
        :data:`QUEUE_HIGH` of them wait: uvicorn pauses after every message and resumes when
        the app has taken them all, a pause and a resume (and a loop turn before the next
        TLS read) per message or batch of a busy tunnel. Resuming stays uvicorn's: when the
        queue is empty."""
        paused = self.read_paused
        self.read_paused = True  # uvicorn's method pauses unless reading already is
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = paused
        if not paused and self.queue.qsize() >= QUEUE_HIGH:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)
        if scope is not None:  # an upgrade that was accepted
            scope["extensions"][SEND_MESSAGE] = self.send_message
            scope["extensions"][PUSH_TO] = self.push_to

    async def send_message(self, data: bytes | BulkMessage) -> None:
        """One binary message straight to the transport (a bulk DATA message in its two
        parts, not joined); raises ClientDisconnected (an OSError) once the connection is
        closing or gone, as ``send`` does."""
        if not self.writable.is_set():
            await self.writable.wait()
        if self.disconnected or self.close_sent or not is_open(self.conn):
            raise ClientDisconnected("agent disconnected")
        self.transport.writelines(binary_frame(data, masked=False))
