"""uvicorn's sans-I/O WebSocket protocol, with the tunnel's hot path beside its ASGI one.

Every agent tunnel is one of these connections. Its frames are parsed out of a chunk reader
(:mod:`backhaul.aio.wsreader` says why), and once the tunnel's handshake is done its binary
messages skip the ASGI ``send``: the connection's scope offers :meth:`send_message` under
the ``backhaul.send_message`` extension, which frames a message and hands it to the
transport with the same checks (open, not closing, not paused) that ``send`` makes.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from backhaul.aio.wsframes import binary_frame
from backhaul.aio.wsreader import install

#: The scope extension under which a tunnel connection offers :meth:`send_message`.
SEND_MESSAGE = "backhaul.send_message"

#: Received messages waiting for the tunnel before reading pauses (uvicorn pauses after one);
#: with 256 KiB DATA messages, about 2 MiB per tunnel at most.
QUEUE_HIGH = 8


class TunnelWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install(self.conn)

    def send_receive_event_to_app(self) -> None:
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

    async def send_message(self, data: bytes) -> None:
        """One binary message straight to the transport; raises ClientDisconnected (an
        OSError) once the connection is closing or gone, as ``send`` does."""
        if not self.writable.is_set():
            await self.writable.wait()
        if self.disconnected or self.close_sent or self.conn.state is not State.OPEN:
            raise ClientDisconnected()
        self.transport.writelines(binary_frame(data, masked=False))
