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

try:
    from websockets.speedups import apply_mask
except ImportError:  # a websockets built without its C extension
    from websockets.utils import apply_mask

from backhaul.aio.wsframes import binary_frame
from backhaul.aio.wsreader import install

#: The scope extension under which a tunnel connection offers :meth:`send_message`.
SEND_MESSAGE = "backhaul.send_message"
#: The scope extension under which a tunnel connection offers :meth:`push_to`.
PUSH_TO = "backhaul.push_to"

#: Received messages waiting for the tunnel before reading pauses (uvicorn pauses after one);
#: with 256 KiB DATA messages, about 2 MiB per tunnel at most.
QUEUE_HIGH = 8


#: Who parses the frames of a connection (:meth:`TunnelWebSocketProtocol.data_received`).
_HANDSHAKE = 0  # websockets, until the opening handshake's request has been read
_HERE = 1  # the connection itself for whole binary messages, websockets for other frames
_WEBSOCKETS = 2  # websockets, for good (after a close, a failure, an unusual frame)

#: The first byte of a whole binary message: FIN, no RSV bits, opcode 2.
_BINARY_FIN = 0x82


class TunnelWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install(self.conn)
        self._feed: Callable[[bytes], bool] | None = None
        self._framing = _HANDSHAKE
        #: The received pieces of a frame not yet whole (while frames are parsed here), kept
        #: as they came and joined once, when the frame is: a 256 KiB message arrives in
        #: many reads, and joining at every read would copy it again and again.
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        #: The size of the frame the pieces start, once its header is in (0: not yet).
        self._need = 0

    def data_received(self, data: bytes) -> None:
        """Frames are parsed here once the opening handshake's request has been read.

        websockets parses frames with a generator per frame, one interpreted layer per read
        and per field: about 8 % of the relay's CPU at one client. A whole, masked binary
        frame within the size limit (every tunnel message) is unmasked here and handed on as
        websockets would hand it; every other frame goes to websockets whole, so its parser,
        which has seen nothing but whole frames, handles it with all its checks (control
        frames, fragments, close, errors). After anything that is not an open connection's
        frame, websockets parses everything that follows.
        """
        framing = self._framing
        if framing == _HERE:
            pending = self._pending
            if pending:
                pending.append(data)
                self._pending_size += len(data)
                if self._pending_size < self._need:
                    return
                data = b"".join(pending)
                self._pending = []
                self._pending_size = 0
            self._parse(data)
            return
        super().data_received(data)
        if framing == _HANDSHAKE:
            # uvicorn hands over exactly the request's head (handle_websocket_upgrade): once
            # websockets has read it, its parser waits at the first frame's first byte. A
            # first chunk of any other shape leaves the frames to websockets.
            end = data.find(b"\r\n\r\n")
            whole = end == len(data) - 4 and len(self.conn.reader) == 0  # type: ignore[arg-type]
            self._framing = _HERE if whole and self.conn.parser_exc is None else _WEBSOCKETS

    def _parse(self, buffer: bytes) -> None:
        size = len(buffer)
        pos = 0
        need = 0
        conn = self.conn
        while size - pos >= 2:
            second = buffer[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                head = 10
            masked = second & 0x80
            if masked:
                head += 4
            limit = conn.max_message_size
            if limit is not None and length > limit:
                # websockets refuses this one from its header (1009): give it the rest.
                self._hand_over(buffer[pos:])
                return
            end = pos + head + length
            if end > size:
                need = end - pos
                break
            if (
                buffer[pos] == _BINARY_FIN
                and masked
                and conn.current_size is None
                and conn.state is State.OPEN
                and (conn.max_fragment_size is None or length <= conn.max_fragment_size)
            ):
                payload = apply_mask(buffer[pos + head : end], buffer[pos + head - 4 : pos + head])
                pos = end
                # As uvicorn's handle_bytes, without the Frame websockets would build.
                self.curr_msg_data_type = "bytes"
                self.frames = [payload]
                self.send_receive_event_to_app()
                continue
            frame = buffer[pos:end]
            pos = end
            super().data_received(frame)
            if conn.state is not State.OPEN or conn.parser_exc is not None:
                self._hand_over(buffer[pos:])
                return
        if pos < size:
            self._pending = [memoryview(buffer)[pos:] if pos else buffer]
            self._pending_size = size - pos
            self._need = need

    def _hand_over(self, rest: bytes) -> None:
        """websockets parses everything from now on, starting with ``rest``."""
        self._framing = _WEBSOCKETS
        if rest:
            super().data_received(rest)

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
