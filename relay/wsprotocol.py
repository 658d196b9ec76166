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
from websockets.protocol import State

from backhaul.aio.wsframes import binary_frame
from backhaul.aio.wsreader import install

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
        self._feed: Callable[[bytes], bool] | None = None

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

    async def send_message(self, data: bytes) -> None:
        """One binary message straight to the transport; raises ClientDisconnected (an
        OSError) once the connection is closing or gone, as ``send`` does."""
        if not self.writable.is_set():
            await self.writable.wait()
        if self.disconnected or self.close_sent or self.conn.state is not State.OPEN:
            raise ClientDisconnected()
        self.transport.writelines(binary_frame(data, masked=False))
