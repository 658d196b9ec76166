"""The tunnel connection, sans I/O: WebSocket messages in, events and messages out.

Like ``websockets``' ``Protocol`` and h11's ``Connection``, this class owns no socket and no
event loop. The adapter feeds each received WebSocket message to :meth:`receive_message`,
acts on the returned events, calls the ``send_*`` methods, and writes out whatever
:meth:`data_to_send` returns. Errors from the peer never escape as exceptions: a stream-level
violation resets that stream, a tunnel-level one yields :class:`ConnectionTerminated`.

Roles: the relay sends the first HELLO (carrying its challenge), the agent answers with its
own HELLO (carrying its signature), and the relay accepts with WELCOME. Only the relay opens
streams (odd ids, increasing); the agent answers them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import Any

from backhaul import compact_json
from backhaul.wire import frames as f
from backhaul.wire.errors import (
    ErrorCode,
    FlowControlBlocked,
    LocalProtocolError,
    RemoteProtocolError,
    StreamUnavailable,
)
from backhaul.wire.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    NoticeReceived,
    PingReceived,
    PongReceived,
    ResponseReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    UnknownFrameReceived,
    WelcomeReceived,
    WindowUpdated,
)
from backhaul.wire.flow import (
    PROMPT_FRAME,
    PROMPT_IN_FLIGHT,
    YIELD_IN_FLIGHT,
    YIELD_SPAN,
    ReceiveWindow,
    SendWindow,
)
from backhaul.wire.settings import Settings
from backhaul.wire.streams import Stream, StreamInput, StreamState


class Role(Enum):
    RELAY = "relay"
    AGENT = "agent"


#: The largest OPEN payload that may define a head slot (a sender sends a larger one whole,
#: defining nothing): 64 slots keep at most 4 MiB.
HEAD_SLOT_MAX = 64 * 1024


class Phase(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


#: Wire type → FrameType, without an enum constructor call per frame.
_FRAME_TYPES: dict[int, f.FrameType] = {int(t): t for t in f.FrameType}


class Connection:
    """One tunnel's protocol state."""

    def __init__(self, role: Role, settings: Settings | None = None) -> None:
        self.role = role
        self.local = settings or Settings()
        #: Until the peer's HELLO says otherwise, it takes no BATCH frames and keeps no slots.
        self.peer = Settings(batch_frames=0, head_slots=0)
        self.phase = Phase.HANDSHAKE
        self._hello_sent = False
        self._hello_received = False
        self._out: list[f.Message] = []
        self._streams: dict[int, Stream] = {}
        self._next_stream_id = 1
        self._last_peer_stream_id = 0
        self._send_window = SendWindow(self.peer.tunnel_window)
        self._recv_window = ReceiveWindow(self.local.tunnel_window)
        #: Streams started so far, DATA bytes sent so far, and that count when the newest
        #: stream started: an older stream holds back while that is recent (max_sendable).
        self._starts = 0
        self._sent = 0
        self._sent_at_start = -YIELD_SPAN
        #: The credit a peer-granted stream window is cut by while it yields; 0: never.
        self._yield_cut = 0
        #: The peer returns the credit of DATA flagged PROMPT_CREDIT at once: a yielding
        #: stream sends frames of at most PROMPT_FRAME, flagged.
        self._prompt = False
        self.goaway_sent: int | None = None
        self.goaway_received: int | None = None
        #: Head slots (docs/protocol.md, "Head slots"). Sending: each fixed part the peer
        #: holds, and its slot, least recently used first. Receiving: each slot's fields.
        #: Made on first use: an idle tunnel carries neither (a relay holds thousands).
        self._slot_of: OrderedDict[bytes, int] | None = None
        self._slots: dict[int, dict[str, Any]] | None = None
        self._handlers: dict[f.FrameType, Callable[[f.Frame], list[Event]]] = {
            f.FrameType.HELLO: self._on_hello,
            f.FrameType.WELCOME: self._on_welcome,
            f.FrameType.OPEN: self._on_open,
            f.FrameType.RESPONSE: self._on_response,
            f.FrameType.DATA: self._on_data,
            f.FrameType.END: self._on_end,
            f.FrameType.RESET: self._on_reset,
            f.FrameType.WINDOW: self._on_window,
            f.FrameType.PING: self._on_ping,
            f.FrameType.PONG: self._on_pong,
            f.FrameType.GOAWAY: self._on_goaway,
            f.FrameType.NOTICE: self._on_notice,
        }

    # ------------------------------------------------------------------ queries

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def accepting_streams(self) -> bool:
        """True when the relay may open a new stream on this tunnel."""
        return (
            self.phase is Phase.OPEN
            and self.goaway_received is None
            and self.goaway_sent is None
            and len(self._streams) < self.peer.max_streams
        )

    def is_active(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def max_sendable(self, stream_id: int) -> int:
        """How many DATA bytes may be sent on ``stream_id`` right now (in one frame)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.can_send:
            return 0
        available = stream.send.available
        if self._yields(stream):
            # A newer stream shares the tunnel: keep little in flight, not the window.
            room = available - self._yield_cut
            if self._prompt:
                if room < PROMPT_FRAME and stream.send.credited >= stream.prompt_end:
                    # Everything in flight left before the yield began, so nothing in flight
                    # asks for prompt credit, and the peer may hold up to ``window_update``
                    # consumed bytes without returning them: one flagged frame goes, to
                    # fetch them.
                    room = PROMPT_FRAME
                room = min(room, PROMPT_FRAME)
            available = min(available, room)
        return max(0, min(available, self._send_window.available, self.peer.max_data))

    def _yields(self, stream: Stream) -> bool:
        """Whether ``stream`` holds back for a newer one (see backhaul.wire.flow)."""
        return bool(
            self._yield_cut
            and stream.order < self._starts
            and self._sent - self._sent_at_start < YIELD_SPAN
        )

    def _new_stream(self, stream_id: int) -> Stream:
        self._starts += 1
        self._sent_at_start = self._sent
        stream = Stream(
            stream_id,
            self.peer.stream_window,
            self.local.stream_window,
            self.local.stream_update,
            self._starts,
        )
        self._streams[stream_id] = stream
        return stream

    def _peer_settings(self, settings: Settings) -> None:
        self.peer = settings
        self._send_window = SendWindow(settings.tunnel_window)
        # Held below the window only where credit comes back well before it runs out: a peer
        # that takes PROMPT_CREDIT returns it frame by frame; one that does not, every
        # ``window_update`` bytes, so twice that stays in flight.
        self._prompt = bool(settings.prompt_credit)
        if self._prompt:
            keep = PROMPT_IN_FLIGHT
        elif settings.window_update:
            keep = max(YIELD_IN_FLIGHT, 2 * settings.window_update)
        else:
            keep = settings.stream_window
        self._yield_cut = max(0, settings.stream_window - keep)

    def data_to_send(self) -> list[bytes]:
        """The WebSocket messages to write, in order, one frame each; the buffer is emptied."""
        out, self._out = self._out, []
        return [m.join() if isinstance(m, f.BulkMessage) else m for m in out]

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def queued(self) -> int:
        """How many frames are waiting to be sent."""
        return len(self._out)

    @property
    def batching(self) -> bool:
        """True when what is queued could still join a BATCH: the peer takes them and the
        newest frame is a small one (a bulk DATA frame leaves alone anyway)."""
        return (
            bool(self.peer.batch_frames)
            and self.phase is Phase.OPEN
            and bool(self._out)
            and len(self._out[-1]) <= f.BATCH_MAX_ENTRY
        )

    def messages_to_send(self) -> list[f.Message]:
        """Like :meth:`data_to_send`, with runs of small frames packed into BATCH messages
        when the peer announced ``batch_frames``, and bulk DATA messages left in two parts
        (:class:`frames.BulkMessage`). Order is kept: a large frame (bulk DATA) ends the run
        before it and goes alone; handshake frames are never batched."""
        out, self._out = self._out, []
        limit = self.peer.batch_frames
        if len(out) < 2 or not limit or self.phase is not Phase.OPEN:
            return out
        budget = self.peer.max_message - f.HEADER_SIZE
        messages: list[f.Message] = []
        run: list[bytes] = []
        size = 0
        for message in out:
            if (
                type(message) is not bytes  # a BulkMessage
                or len(message) > f.BATCH_MAX_ENTRY
                or message[0] in _NEVER_BATCHED
            ):
                _close_run(run, messages)
                run, size = [], 0
                messages.append(message)
                continue
            if len(run) >= limit or size + 4 + len(message) > budget:
                _close_run(run, messages)
                run, size = [], 0
            run.append(message)
            size += 4 + len(message)
        _close_run(run, messages)
        return messages

    # ------------------------------------------------------------------ handshake

    def send_hello(self, payload: dict[str, Any]) -> None:
        """Send our HELLO. The relay sends it first; the agent answers the relay's HELLO."""
        if self._hello_sent or self.phase is not Phase.HANDSHAKE:
            raise LocalProtocolError("HELLO already sent")
        if self.role is Role.AGENT and not self._hello_received:
            raise LocalProtocolError("the agent answers the relay's HELLO")
        self._hello_sent = True
        body = dict(payload, settings=self.local.to_dict())
        self._out.append(f.encode_json(f.FrameType.HELLO, 0, body))

    def send_welcome(self, payload: dict[str, Any]) -> None:
        """Relay: accept the agent's HELLO; streams may flow from now on."""
        if (
            self.role is not Role.RELAY
            or not self._hello_received
            or self.phase is not Phase.HANDSHAKE
        ):
            raise LocalProtocolError("WELCOME is the relay's answer to the agent's HELLO")
        self.phase = Phase.OPEN
        self._out.append(f.encode_json(f.FrameType.WELCOME, 0, payload))

    # ------------------------------------------------------------------ sending

    def open_stream(
        self, head: dict[str, Any] | bytes, end_stream: bool = False, fixed: bytes | None = None
    ) -> int:
        """Open a stream with ``head``: a dict, or the JSON object already encoded (the relay
        encodes the parts that repeat on every request once).

        ``fixed``, a JSON object encoded, holds more fields of the head: the ones that are the
        same on every request of a connection. Toward a peer that keeps head slots they
        cross the tunnel once per slot (:meth:`_slotted_head`); otherwise they join ``head``."""
        if self.role is not Role.RELAY:
            raise LocalProtocolError("only the relay opens streams")
        if not self.accepting_streams:
            raise StreamUnavailable("the tunnel takes no new streams")
        stream_id = self._next_stream_id
        if stream_id > f.MAX_STREAM_ID:
            raise StreamUnavailable("stream ids exhausted; reconnect")
        self._next_stream_id += 2
        stream = self._new_stream(stream_id)
        if fixed is not None:
            if not isinstance(head, bytes):
                head = compact_json.dumps(head).encode()
            head = self._slotted_head(head, fixed)
        if isinstance(head, bytes):
            frame = f.encode(f.FrameType.OPEN, stream_id, head, _flags(end_stream))
        else:
            frame = f.encode_json(f.FrameType.OPEN, stream_id, head, _flags(end_stream))
        self._out.append(frame)
        if end_stream:
            stream.transition(StreamInput.SEND_END)
        return stream_id

    def _slotted_head(self, head: bytes, fixed: bytes) -> bytes:
        """``head`` with ``fixed``'s fields: by reference to the slot the peer keeps them in
        (``"slot": n``), or defining that slot (``"slot": n, "fixed": {...}``) and evicting
        the least recently used one when all are taken, or joined in whole. The peer reads
        OPENs in the order they are queued here, so its slots are always these."""
        slots = self.peer.head_slots
        joint = b"," if len(head) > 2 else b""
        if not slots:
            return head[:-1] + joint + fixed[1:]
        table = self._slot_of
        if table is None:
            table = self._slot_of = OrderedDict()
        slot = table.get(fixed)
        if slot is not None:
            table.move_to_end(fixed)
            return head[:-1] + joint + b'"slot":%d}' % slot
        full = len(table) >= slots
        slot = next(iter(table.values())) if full else len(table)
        defining = head[:-1] + joint + b'"slot":%d,"fixed":' % slot + fixed + b"}"
        if len(defining) > HEAD_SLOT_MAX:  # the peer would refuse to keep it
            return head[:-1] + joint + fixed[1:]
        if full:
            table.popitem(last=False)
        table[fixed] = slot
        return defining

    def send_response(self, stream_id: int, head: dict[str, Any], end_stream: bool = False) -> None:
        if self.role is not Role.AGENT:
            raise LocalProtocolError("only the agent sends responses")
        stream = self._sendable(stream_id)
        self._out.append(f.encode_json(f.FrameType.RESPONSE, stream_id, head, _flags(end_stream)))
        if end_stream:
            self._send_end_transition(stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue DATA; raise FlowControlBlocked if it exceeds :meth:`max_sendable`."""
        stream = self._sendable(stream_id)
        size = len(data)
        if size > self.max_sendable(stream_id):
            raise FlowControlBlocked(f"{size} bytes exceed the window on stream {stream_id}")
        stream.send.consume(size)
        self._send_window.consume(size)
        self._sent += size
        stream.sent += size
        flags = _flags(end_stream)
        if self._prompt and self._yields(stream):
            flags |= f.PROMPT_CREDIT_BIT
            stream.prompt_end = stream.sent
        self._out.append(f.encode_data(stream_id, data, flags))
        if end_stream:
            self._send_end_transition(stream)

    def end_stream(self, stream_id: int) -> None:
        stream = self._sendable(stream_id)
        self._out.append(f.encode(f.FrameType.END, stream_id))
        self._send_end_transition(stream)

    def reset_stream(self, stream_id: int, code: ErrorCode, reason: str = "") -> None:
        """Abandon a stream; a no-op when it is already gone."""
        if self._streams.pop(stream_id, None) is not None and self.phase is not Phase.CLOSED:
            self._out.append(f.encode_reset(stream_id, code, reason))

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` body bytes of ``stream_id``: return the credit."""
        if size <= 0 or self.phase is Phase.CLOSED:
            return
        increment = self._recv_window.consumed(size)
        if increment:
            self._out.append(f.encode_window(0, increment))
        stream = self._streams.get(stream_id)
        if stream is not None and stream.can_receive:
            increment = stream.recv.consumed(size)
            if increment:
                self._out.append(f.encode_window(stream_id, increment))

    def ping(self, opaque: int) -> None:
        self._out.append(f.encode_ping(f.FrameType.PING, opaque & (2**64 - 1)))

    def send_notice(self, payload: dict[str, Any]) -> None:
        self._out.append(f.encode_json(f.FrameType.NOTICE, 0, payload))

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Announce a drain: streams already opened finish, no new ones are taken."""
        if self.goaway_sent is None:
            self.goaway_sent = self._last_peer_stream_id
            self._out.append(f.encode_goaway(self._last_peer_stream_id, code, reason))

    def terminate(self, code: ErrorCode, reason: str) -> ConnectionTerminated:
        """End the tunnel: every stream is dropped, a final GOAWAY is queued."""
        if self.phase is not Phase.CLOSED:
            self._out.append(f.encode_goaway(self._last_peer_stream_id, code, reason))
            self.phase = Phase.CLOSED
        self._streams.clear()
        return ConnectionTerminated(code, reason)

    # ------------------------------------------------------------------ receiving

    def receive_message(self, message: bytes) -> list[Event]:
        """Process one WebSocket message. Never raises for anything the peer sends."""
        if self.phase is Phase.CLOSED:
            return []
        try:
            frame = f.decode(message, self.local.max_message)
            if frame.type != f.FrameType.BATCH:
                return self._receive_frame(frame)
            self._check_placement(f.FrameType.BATCH, frame.stream_id)
            if not self.local.batch_frames:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "BATCH was not announced")
            entries = f.decode_batch(frame, self.local.batch_frames)
        except RemoteProtocolError as exc:
            return self._refuse(exc)
        # Each frame of a batch is handled as if it had come alone: a stream-level violation
        # resets that stream and the rest of the batch still counts.
        events: list[Event] = []
        for entry in entries:
            try:
                inner = f.decode(entry, self.local.max_message)
                if inner.type == f.FrameType.BATCH:
                    raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "BATCH inside a BATCH")
                events.extend(self._receive_frame(inner))
            except RemoteProtocolError as exc:
                events.extend(self._refuse(exc))
            if self.closed:
                break
        return events

    def _receive_frame(self, frame: f.Frame) -> list[Event]:
        ftype = _FRAME_TYPES.get(frame.type)
        if ftype is None:
            return [UnknownFrameReceived(frame.type, frame.stream_id)]
        self._check_placement(ftype, frame.stream_id)
        return self._handlers[ftype](frame)

    def _refuse(self, exc: RemoteProtocolError) -> list[Event]:
        if exc.stream_id and exc.stream_id in self._streams:
            self.reset_stream(exc.stream_id, exc.code, exc.reason)
            return [StreamReset(exc.stream_id, exc.code, exc.reason, remote=False)]
        if exc.stream_id:
            # A stream refused before it existed (e.g. a malformed OPEN): reset it and
            # still report it, so the adapter can log what the peer did.
            self._out.append(f.encode_reset(exc.stream_id, exc.code, exc.reason))
            return [StreamReset(exc.stream_id, exc.code, exc.reason, remote=False)]
        return [self.terminate(exc.code, exc.reason)]

    def close_events(self, code: ErrorCode, reason: str) -> list[Event]:
        """The transport closed: report every open stream as reset."""
        events: list[Event] = [StreamReset(sid, code, reason) for sid in self._streams]
        self._streams.clear()
        self.phase = Phase.CLOSED
        return events

    def _check_placement(self, ftype: f.FrameType, stream_id: int) -> None:
        if ftype in f.TUNNEL_FRAMES:
            if stream_id != 0:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{ftype.name} on a stream")
        elif stream_id == 0 and ftype is not f.FrameType.WINDOW:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{ftype.name} on stream 0")
        if self.phase is Phase.HANDSHAKE and ftype not in (f.FrameType.HELLO, f.FrameType.WELCOME):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{ftype.name} before WELCOME")

    def _on_hello(self, frame: f.Frame) -> list[Event]:
        if self._hello_received or (self.role is Role.RELAY and not self._hello_sent):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected HELLO")
        payload = f.decode_json(frame)
        self._peer_settings(Settings.from_dict(payload.get("settings")))
        self._hello_received = True
        return [HelloReceived(payload)]

    def _on_welcome(self, frame: f.Frame) -> list[Event]:
        if self.role is not Role.AGENT or not self._hello_sent or self.phase is not Phase.HANDSHAKE:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected WELCOME")
        payload = f.decode_json(frame)
        self.phase = Phase.OPEN
        return [WelcomeReceived(payload)]

    def _on_open(self, frame: f.Frame) -> list[Event]:
        sid = frame.stream_id
        if self.role is not Role.AGENT:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "the agent cannot open streams")
        if sid % 2 == 0 or sid <= self._last_peer_stream_id:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream id {sid} reused or even")
        self._last_peer_stream_id = sid
        # Decoded first: a head that defines a slot defines it even when the stream is refused.
        try:
            head = f.decode_json(frame)
        except RemoteProtocolError:
            self._slots = None  # it may have defined one: refer to none of them from now on
            raise
        if "slot" in head:
            self._fill_from_slot(head, frame)
        if self.goaway_sent is not None:
            self._out.append(f.encode_reset(sid, ErrorCode.REFUSED_STREAM, "draining"))
            return []
        if len(self._streams) >= self.local.max_streams:
            self._out.append(f.encode_reset(sid, ErrorCode.REFUSED_STREAM, "too many streams"))
            return []
        stream = self._new_stream(sid)
        stream.head_received = True
        events: list[Event] = [StreamOpened(sid, head, frame.end_stream)]
        if frame.end_stream:
            events.extend(self._recv_end(stream))
        return events

    def _fill_from_slot(self, head: dict[str, Any], frame: f.Frame) -> None:
        """Resolve an OPEN head's ``slot`` (and store its ``fixed`` fields, if any): its
        fields join ``head``. A slot out of range, an empty one or a malformed definition
        ends the tunnel, since the two sides' slots no longer agree; a field in both the head
        and its slot resets the stream."""
        slot = head.pop("slot")
        fixed = head.pop("fixed", None)
        if (
            type(slot) is not int
            or not 0 <= slot < self.local.head_slots
            or (fixed is not None and type(fixed) is not dict)
            or (fixed is not None and len(frame.payload) > HEAD_SLOT_MAX)
        ):
            self._slots = None
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "invalid head slot definition")
        slots = self._slots
        if fixed is None:
            fixed = slots.get(slot) if slots is not None else None
            if fixed is None:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"head slot {slot} is empty")
        elif slots is None:
            self._slots = {slot: fixed}
        else:
            slots[slot] = fixed
        for name, value in fixed.items():
            if name in head:
                raise RemoteProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    "a head field is both in the OPEN and in its slot",
                    frame.stream_id,
                )
            head[name] = value

    def _on_response(self, frame: f.Frame) -> list[Event]:
        if self.role is not Role.RELAY:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "the relay sends no responses")
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return self._ignore_or_fail(frame.stream_id)
        if stream.head_received or not stream.can_receive:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, "second RESPONSE on a stream", frame.stream_id
            )
        head = f.decode_json(frame)
        stream.head_received = True
        events: list[Event] = [ResponseReceived(frame.stream_id, head, frame.end_stream)]
        if frame.end_stream:
            events.extend(self._recv_end(stream))
        return events

    def _on_data(self, frame: f.Frame) -> list[Event]:
        size = len(frame.payload)
        if size > self.local.max_data:
            raise RemoteProtocolError(ErrorCode.FRAME_TOO_LARGE, "DATA larger than max_data")
        self._recv_window.received(size, 0)
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            # Late DATA for a stream we already reset: give the tunnel credit straight back.
            self.acknowledge(frame.stream_id, size)
            return self._ignore_or_fail(frame.stream_id)
        if not stream.can_receive or not stream.head_received:
            self.acknowledge(frame.stream_id, size)
            raise RemoteProtocolError(
                ErrorCode.STREAM_CLOSED, "DATA outside an open stream", frame.stream_id
            )
        try:
            stream.recv.received(size, frame.stream_id)
        except RemoteProtocolError:
            # The stream is reset for this: give the dropped bytes' tunnel credit back.
            self.acknowledge(0, size)
            raise
        if frame.flags & f.PROMPT_CREDIT_BIT and self.local.prompt_credit:
            stream.recv.prompt()
        events: list[Event] = [DataReceived(frame.stream_id, frame.payload, frame.end_stream)]
        if frame.end_stream:
            events.extend(self._recv_end(stream))
        return events

    def _on_end(self, frame: f.Frame) -> list[Event]:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return self._ignore_or_fail(frame.stream_id)
        if not stream.head_received:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "END before RESPONSE", stream.id)
        return self._recv_end(stream)

    def _on_reset(self, frame: f.Frame) -> list[Event]:
        code, reason = f.decode_reset(frame)
        if self._streams.pop(frame.stream_id, None) is None:
            return []
        return [StreamReset(frame.stream_id, code, reason)]

    def _on_window(self, frame: f.Frame) -> list[Event]:
        increment = f.decode_window(frame)
        if frame.stream_id == 0:
            self._send_window.grant(increment, 0)
        else:
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                return []
            stream.send.grant(increment, frame.stream_id)
        return [WindowUpdated(frame.stream_id)]

    def _on_ping(self, frame: f.Frame) -> list[Event]:
        opaque = f.decode_ping(frame)
        self._out.append(f.encode_ping(f.FrameType.PONG, opaque))
        return [PingReceived(opaque)]

    def _on_pong(self, frame: f.Frame) -> list[Event]:
        return [PongReceived(f.decode_ping(frame))]

    def _on_goaway(self, frame: f.Frame) -> list[Event]:
        last, code, reason = f.decode_goaway(frame)
        self.goaway_received = last
        events: list[Event] = [GoAwayReceived(last, code, reason)]
        if self.role is Role.RELAY:
            # Streams above `last` were never processed: the caller may safely retry them.
            for sid in [s for s in self._streams if s > last]:
                del self._streams[sid]
                events.append(StreamReset(sid, ErrorCode.REFUSED_STREAM, "agent draining"))
        return events

    def _on_notice(self, frame: f.Frame) -> list[Event]:
        return [NoticeReceived(f.decode_json(frame))]

    # ------------------------------------------------------------------ helpers

    def _sendable(self, stream_id: int) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.can_send or self.phase is Phase.CLOSED:
            raise StreamUnavailable(f"stream {stream_id} cannot send")
        return stream

    def _send_end_transition(self, stream: Stream) -> None:
        if stream.transition(StreamInput.SEND_END) is StreamState.CLOSED:
            del self._streams[stream.id]

    def _recv_end(self, stream: Stream) -> list[Event]:
        if stream.transition(StreamInput.RECV_END) is None:
            raise RemoteProtocolError(ErrorCode.STREAM_CLOSED, "stream already ended", stream.id)
        if stream.state is StreamState.CLOSED:
            del self._streams[stream.id]
        return [StreamEnded(stream.id)]

    def _ignore_or_fail(self, stream_id: int) -> list[Event]:
        """A frame for a stream we don't hold: fine if it was closed, an error if never opened."""
        highest = self._next_stream_id - 2 if self.role is Role.RELAY else self._last_peer_stream_id
        if stream_id <= highest:
            return []
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"frame for idle stream {stream_id}")


_NEVER_BATCHED = frozenset({int(f.FrameType.HELLO), int(f.FrameType.WELCOME)})


def _close_run(run: list[bytes], messages: list[f.Message]) -> None:
    if len(run) == 1:
        messages.append(run[0])
    elif run:
        messages.append(f.encode_batch(run))


def _flags(end_stream: bool) -> int:
    return f.END_STREAM_BIT if end_stream else 0
