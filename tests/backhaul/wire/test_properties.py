"""Property-based tests of the codec, the connection and flow control."""

from __future__ import annotations

import itertools
import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from backhaul.wire import (
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    FlowControlBlocked,
    Phase,
    RemoteProtocolError,
    ResponseReceived,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamUnavailable,
    WindowUpdated,
)
from backhaul.wire import frames as f
from backhaul.wire.streams import TRANSITIONS, Stream, StreamInput, StreamState
from tests.backhaul.wire.wire_pair import connect
from tests.fuzzing import budget

# ---------------------------------------------------------------- strategies

_SETTING_KEYS = ["stream_window", "tunnel_window", "max_data", "max_streams", "other"]


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


payloads = st.one_of(
    st.binary(max_size=40),
    st.just(b"{}"),
    st.dictionaries(
        st.sampled_from(["method", "status", "path", "x"]),
        st.one_of(st.integers(), st.text(max_size=4), st.none()),
        max_size=3,
    ).map(_json),
    st.fixed_dictionaries(
        {
            "settings": st.dictionaries(
                st.sampled_from(_SETTING_KEYS), st.integers(-2, 2**31), max_size=4
            )
        }
    ).map(_json),
    st.sampled_from([b"[]", b"null", b'"s"', b"[" * 3000]),
    st.integers(0, 2**32 - 1).map(struct.Struct("!I").pack),
    st.integers(0, 2**64 - 1).map(struct.Struct("!Q").pack),
    st.tuples(st.integers(0, 2**16 - 1), st.binary(max_size=8)).map(
        lambda t: struct.pack("!H", t[0]) + t[1]
    ),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1)).map(
        lambda t: struct.pack("!IH", *t)
    ),
    st.integers(0, 1100).map(lambda n: b"d" * n),
)
frame_types = st.one_of(st.sampled_from([int(t) for t in f.FrameType]), st.integers(0, 255))
stream_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11]), st.integers(0, 2**32 - 1))
flag_values = st.one_of(st.sampled_from([0, 1]), st.integers(0, 255))
structured = st.builds(
    lambda t, fl, sid, p: struct.pack("!BBI", t, fl, sid) + p,
    frame_types,
    flag_values,
    stream_ids,
    payloads,
)
messages = st.one_of(structured, st.binary(max_size=16))


# ---------------------------------------------------------------- (a) the decoder is total


@settings(max_examples=budget(2000), deadline=None)
@given(message=st.one_of(st.binary(max_size=64), structured), max_message=st.integers(0, 200))
def test_decode_returns_a_frame_or_raises_remote_protocol_error(
    message: bytes, max_message: int
) -> None:
    try:
        frame = f.decode(message, max_message)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE)
        assert (exc.code is ErrorCode.FRAME_TOO_LARGE) == (len(message) > max_message)
        return
    assert f.HEADER_SIZE <= len(message) <= max_message
    assert frame.stream_id <= f.MAX_STREAM_ID
    assert f.HEADER.pack(frame.type, frame.flags, frame.stream_id) + frame.payload == message


@settings(max_examples=budget(2000), deadline=None)
@given(message=structured)
def test_payload_decoders_are_total(message: bytes) -> None:
    try:
        frame = f.decode(message, 1 << 20)
    except RemoteProtocolError:
        return
    decoders = [f.decode_json, f.decode_window, f.decode_ping, f.decode_reset, f.decode_goaway]
    for decoder in decoders:
        try:
            decoder(frame)
        except RemoteProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            assert exc.stream_id in (0, frame.stream_id)


@settings(max_examples=budget(500), deadline=None)
@given(
    ftype=st.sampled_from(list(f.FrameType)),
    flags=st.integers(0, 255),
    stream_id=st.integers(0, f.MAX_STREAM_ID),
    payload=st.binary(max_size=100),
)
def test_encode_decode_round_trip(
    ftype: f.FrameType, flags: int, stream_id: int, payload: bytes
) -> None:
    frame = f.decode(f.encode(ftype, stream_id, payload, flags), 1 << 20)
    assert frame == f.Frame(int(ftype), flags, stream_id, payload)


@settings(max_examples=budget(300), deadline=None)
@given(
    stream_id=st.integers(0, f.MAX_STREAM_ID),
    code=st.sampled_from(list(ErrorCode)),
    reason=st.text(max_size=50),
    increment=st.integers(1, f.MAX_WINDOW),
    opaque=st.integers(0, 2**64 - 1),
)
def test_packed_frames_round_trip(
    stream_id: int, code: ErrorCode, reason: str, increment: int, opaque: int
) -> None:
    expected = reason.encode("utf-8", "replace").decode("utf-8", "replace")
    reset = f.decode(f.encode_reset(stream_id, code, reason), 1 << 20)
    assert f.decode_reset(reset) == (code, expected)
    goaway = f.decode(f.encode_goaway(stream_id, code, reason), 1 << 20)
    assert f.decode_goaway(goaway) == (stream_id, code, expected)
    window = f.decode(f.encode_window(stream_id, increment), 1 << 20)
    assert f.decode_window(window) == increment
    ping = f.decode(f.encode_ping(f.FrameType.PING, opaque), 1 << 20)
    assert f.decode_ping(ping) == opaque


# ---------------------------------------------------------------- (b) receive_message is total

LIMITS = Settings(stream_window=2048, tunnel_window=4096, max_data=1024, max_streams=4)
#: The most one incoming message may cause us to queue: a WINDOW for the tunnel, one for
#: the stream, and a RESET or GOAWAY.
MAX_REPLIES = 3
MAX_REPLY_SIZE = f.HEADER_SIZE + 6 + f.MAX_REASON


def _subject(role: Role, handshaken: bool) -> tuple[Connection, int]:
    """A connection to fuzz, and the most streams it may ever hold."""
    if handshaken:
        pair = connect(LIMITS, LIMITS)
        if role is Role.AGENT:
            return pair.agent, LIMITS.max_streams
        for _ in range(3):
            pair.relay.open_stream({})
        pair.relay.data_to_send()
        return pair.relay, 3
    conn = Connection(role, LIMITS)
    if role is Role.RELAY:
        conn.send_hello({"challenge": "c"})
        conn.data_to_send()
    return conn, 0 if role is Role.RELAY else LIMITS.max_streams


@settings(max_examples=budget(400), deadline=None)
@given(
    role=st.sampled_from(list(Role)),
    handshaken=st.booleans(),
    inputs=st.lists(messages, max_size=40),
)
def test_receive_message_never_raises_and_stays_bounded(
    role: Role, handshaken: bool, inputs: list[bytes]
) -> None:
    conn, max_streams = _subject(role, handshaken)
    for message in inputs:
        closed_before = conn.phase is Phase.CLOSED
        events = conn.receive_message(message)
        assert isinstance(events, list)
        assert all(isinstance(e, Event) for e in events)
        if closed_before:
            assert events == []
        if any(isinstance(e, ConnectionTerminated) for e in events):
            assert conn.phase is Phase.CLOSED
            assert conn.open_streams == 0
        assert conn.open_streams <= max_streams
        out = conn.data_to_send()
        assert len(out) <= MAX_REPLIES
        assert all(len(m) <= MAX_REPLY_SIZE for m in out)
        for reply in out:
            # Whatever we answer is itself well-formed.
            frame = f.decode(reply, LIMITS.max_message)
            assert frame.type in {int(t) for t in f.FrameType}


@settings(max_examples=budget(100), deadline=None)
@given(inputs=st.lists(messages, max_size=30))
def test_fuzzed_agent_still_serves_a_real_stream(inputs: list[bytes]) -> None:
    """Garbage that does not end the tunnel leaves it able to carry a fresh stream."""
    pair = connect(LIMITS, LIMITS)
    for message in inputs:
        pair.agent.receive_message(message)
    pair.agent.data_to_send()
    if pair.agent.phase is Phase.CLOSED or pair.agent.open_streams >= LIMITS.max_streams:
        return
    if pair.agent.goaway_sent is not None:
        return
    sid = f.MAX_STREAM_ID  # above anything the fuzz could have used
    events = pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, sid, {"m": 1}, 1))
    assert events == [StreamOpened(sid, {"m": 1}, True), StreamEnded(sid)]


# ---------------------------------------------------------------- (c) stream transition table


def _model_state(sent_end: bool, recv_end: bool) -> StreamState:
    return {
        (False, False): StreamState.OPEN,
        (True, False): StreamState.HALF_CLOSED_LOCAL,
        (False, True): StreamState.HALF_CLOSED_REMOTE,
        (True, True): StreamState.CLOSED,
    }[(sent_end, recv_end)]


def _flags_of(state: StreamState) -> tuple[bool, bool]:
    return {
        StreamState.OPEN: (False, False),
        StreamState.HALF_CLOSED_LOCAL: (True, False),
        StreamState.HALF_CLOSED_REMOTE: (False, True),
        StreamState.CLOSED: (True, True),
    }[state]


@pytest.mark.parametrize(("state", "event"), list(itertools.product(StreamState, StreamInput)))
def test_every_state_input_pair(state: StreamState, event: StreamInput) -> None:
    sent_end, recv_end = _flags_of(state)
    if event is StreamInput.SEND_END:
        expected = None if sent_end else _model_state(True, recv_end)
    else:
        expected = None if recv_end else _model_state(sent_end, True)
    assert TRANSITIONS.get((state, event)) is expected
    stream = Stream(1, 10, 10)
    stream.state = state
    assert stream.transition(event) is expected
    assert stream.state is (expected or state)


@settings(max_examples=budget(300), deadline=None)
@given(inputs=st.lists(st.sampled_from(list(StreamInput)), max_size=8))
def test_stream_sequences_match_the_model(inputs: list[StreamInput]) -> None:
    stream = Stream(1, 10, 10)
    sent_end = recv_end = False
    for event in inputs:
        allowed = not (sent_end if event is StreamInput.SEND_END else recv_end)
        result = stream.transition(event)
        if allowed:
            if event is StreamInput.SEND_END:
                sent_end = True
            else:
                recv_end = True
            assert result is _model_state(sent_end, recv_end)
        else:
            assert result is None
        assert stream.state is _model_state(sent_end, recv_end)
        assert stream.can_send is not sent_end
        assert stream.can_receive is not recv_end


@dataclass
class _Side:
    """The model of one stream as one side sees it."""

    known: bool = False
    sent_end: bool = False
    got_end: bool = False
    gone: bool = False
    responded: bool = False
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    unacked: int = 0

    @property
    def active(self) -> bool:
        return self.known and not self.gone and not (self.sent_end and self.got_end)


@dataclass
class _Model:
    head: dict[str, int]
    open_end: bool
    relay: _Side
    agent: _Side
    reset_code: dict[str, ErrorCode] = field(default_factory=dict)


def _can_send(side: str) -> Callable[[_Model], bool]:
    """Legal to send DATA or END: the agent only after its RESPONSE."""

    def ok(m: _Model) -> bool:
        me: _Side = getattr(m, side)
        return me.active and not me.sent_end and (side == "relay" or me.responded)

    return ok


MACHINE_SETTINGS = Settings(stream_window=3000, tunnel_window=6000, max_data=1024, max_streams=6)


class TunnelMachine(RuleBasedStateMachine):
    """Random legal use of both ends; the model says what each side must see."""

    @initialize()
    def start(self) -> None:
        self.pair = connect(MACHINE_SETTINGS, MACHINE_SETTINGS)
        self.to_agent: deque[bytes] = deque()
        self.to_relay: deque[bytes] = deque()
        self.streams: dict[int, _Model] = {}

    def _collect(self) -> None:
        self.to_agent.extend(self.pair.relay.data_to_send())
        self.to_relay.extend(self.pair.agent.data_to_send())

    def _any(self, ok: Callable[[_Model], bool]) -> bool:
        return hasattr(self, "streams") and any(ok(m) for m in self.streams.values())

    def _pick(self, index: int, ok: Callable[[_Model], bool]) -> int | None:
        ids = [sid for sid, m in sorted(self.streams.items()) if ok(m)]
        return ids[index % len(ids)] if ids else None

    # -- relay actions

    @precondition(lambda self: self.pair.relay.accepting_streams)
    @rule(end=st.booleans(), n=st.integers(0, 99))
    def open(self, end: bool, n: int) -> None:
        sid = self.pair.relay.open_stream({"n": n}, end_stream=end)
        assert sid not in self.streams
        self.streams[sid] = _Model({"n": n}, end, _Side(known=True, sent_end=end), _Side())
        self._collect()

    @precondition(lambda self: self._any(_can_send("relay")))
    @rule(index=st.integers(0, 50), size=st.integers(0, 2000), end=st.booleans())
    def relay_send(self, index: int, size: int, end: bool) -> None:
        self._send("relay", index, size, end)

    @precondition(lambda self: self._any(_can_send("agent")))
    @rule(index=st.integers(0, 50), size=st.integers(0, 2000), end=st.booleans())
    def agent_send(self, index: int, size: int, end: bool) -> None:
        self._send("agent", index, size, end)

    def _send(self, side: str, index: int, size: int, end: bool) -> None:
        conn = getattr(self.pair, side)
        sid = self._pick(index, _can_send(side))
        if sid is None:
            return
        me: _Side = getattr(self.streams[sid], side)
        room = conn.max_sendable(sid)
        if size > room:
            with pytest.raises(FlowControlBlocked):
                conn.send_data(sid, b"x" * size)
            size = room
        data = bytes([sid % 251]) * size
        conn.send_data(sid, data, end_stream=end)
        me.sent += data
        me.sent_end = me.sent_end or end
        self._collect()

    @precondition(lambda self: self._any(lambda m: m.agent.active and not m.agent.responded))
    @rule(index=st.integers(0, 50), end=st.booleans())
    def respond(self, index: int, end: bool) -> None:
        sid = self._pick(index, lambda m: m.agent.active and not m.agent.responded)
        if sid is None:
            return
        self.pair.agent.send_response(sid, {"for": sid}, end_stream=end)
        self.streams[sid].agent.responded = True
        self.streams[sid].agent.sent_end = end
        self._collect()

    @precondition(lambda self: self._any(_can_send("relay")) or self._any(_can_send("agent")))
    @rule(index=st.integers(0, 50), side=st.sampled_from(["relay", "agent"]))
    def end(self, index: int, side: str) -> None:
        sid = self._pick(index, _can_send(side))
        if sid is None:
            return
        getattr(self.pair, side).end_stream(sid)
        getattr(self.streams[sid], side).sent_end = True
        self._collect()

    @precondition(lambda self: self._any(lambda m: m.relay.active or m.agent.active))
    @rule(
        index=st.integers(0, 50),
        side=st.sampled_from(["relay", "agent"]),
        code=st.sampled_from([ErrorCode.CANCEL, ErrorCode.UPSTREAM_ERROR]),
    )
    def reset(self, index: int, side: str, code: ErrorCode) -> None:
        sid = self._pick(index, lambda m: getattr(m, side).active)
        if sid is None:
            return
        getattr(self.pair, side).reset_stream(sid, code, "r")
        model = self.streams[sid]
        getattr(model, side).gone = True
        model.reset_code[side] = code
        self._collect()

    @rule(index=st.integers(0, 50), side=st.sampled_from(["relay", "agent"]))
    def misuse_raises(self, index: int, side: str) -> None:
        """Sending on a stream this side can no longer send on is refused locally."""
        sid = self._pick(
            index, lambda m: getattr(m, side).known and not getattr(m, side).active
        ) or self._pick(index, lambda m: getattr(m, side).sent_end)
        if sid is None:
            return
        conn = getattr(self.pair, side)
        assert conn.max_sendable(sid) == 0
        with pytest.raises(StreamUnavailable):
            conn.send_data(sid, b"")
        with pytest.raises(StreamUnavailable):
            conn.end_stream(sid)

    @rule(side=st.sampled_from(["relay", "agent"]))
    def consume(self, side: str) -> None:
        conn = getattr(self.pair, side)
        for sid, model in self.streams.items():
            me: _Side = getattr(model, side)
            if me.unacked:
                conn.acknowledge(sid, me.unacked)
                me.unacked = 0
        self._collect()

    # -- delivery

    @precondition(lambda self: bool(getattr(self, "to_agent", None)))
    @rule(count=st.integers(1, 6))
    def deliver_to_agent(self, count: int) -> None:
        for _ in range(min(count, len(self.to_agent))):
            for event in self.pair.agent.receive_message(self.to_agent.popleft()):
                self._on_event("agent", event)
        self._collect()

    @precondition(lambda self: bool(getattr(self, "to_relay", None)))
    @rule(count=st.integers(1, 6))
    def deliver_to_relay(self, count: int) -> None:
        for _ in range(min(count, len(self.to_relay))):
            for event in self.pair.relay.receive_message(self.to_relay.popleft()):
                self._on_event("relay", event)
        self._collect()

    @rule()
    def pump(self) -> None:
        """Deliver everything in flight, both ways, until both sides are quiet."""
        while self.to_agent or self.to_relay:
            self.deliver_to_agent(len(self.to_agent))
            self.deliver_to_relay(len(self.to_relay))

    def _on_event(self, side: str, event: Event) -> None:
        other = "agent" if side == "relay" else "relay"
        if isinstance(event, WindowUpdated):
            return
        assert not isinstance(event, ConnectionTerminated), event
        sid = event.stream_id  # type: ignore[attr-defined]
        model = self.streams[sid]
        me: _Side = getattr(model, side)
        them: _Side = getattr(model, other)
        assert not me.gone, event
        if isinstance(event, StreamOpened):
            assert side == "agent" and not me.known
            assert (event.head, event.end_stream) == (model.head, model.open_end)
            me.known = True
        elif isinstance(event, ResponseReceived):
            assert side == "relay" and not me.responded
            assert event.head == {"for": sid}
            me.responded = True
        elif isinstance(event, DataReceived):
            assert not me.got_end
            me.received += event.data
            me.unacked += len(event.data)
        elif isinstance(event, StreamEnded):
            assert not me.got_end
            assert them.sent_end
            me.got_end = True
        elif isinstance(event, StreamReset):
            assert event.remote, event
            assert event.code is model.reset_code[other]
            me.gone = True
        else:
            raise AssertionError(f"unexpected event {event!r}")

    # -- invariants

    @invariant()
    def views_agree(self) -> None:
        if not hasattr(self, "pair"):
            return
        for side in ("relay", "agent"):
            conn: Connection = getattr(self.pair, side)
            assert conn.phase is Phase.OPEN
            active = 0
            for sid, model in self.streams.items():
                me: _Side = getattr(model, side)
                them: _Side = getattr(model, "agent" if side == "relay" else "relay")
                assert conn.is_active(sid) is me.active, (side, sid, me)
                active += me.active
                # Bytes arrive in order and unaltered.
                assert bytes(them.sent[: len(me.received)]) == bytes(me.received)
            assert conn.open_streams == active
            assert conn.open_streams <= MACHINE_SETTINGS.max_streams


TunnelMachine.TestCase.settings = settings(
    max_examples=budget(150), stateful_step_count=50, deadline=None
)
test_tunnel_machine = TunnelMachine.TestCase


# ---------------------------------------------------------------- (d) flow control

RELAY_FC = Settings(stream_window=3000, tunnel_window=5000, max_data=1024)
AGENT_FC = Settings(stream_window=2500, tunnel_window=7000, max_data=2048)
SIDES = ("relay", "agent")
_ops = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(SIDES), st.integers(0, 2), st.integers(1, 2500)),
    st.tuples(st.just("deliver"), st.sampled_from(SIDES), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("consume"), st.sampled_from(SIDES), st.integers(0, 2), st.integers(1, 3000)),
)


@dataclass
class _Direction:
    """Accounting for the data one side sends to the other."""

    limits: Settings  # the receiver's settings
    sent: dict[int, int] = field(default_factory=dict)
    credited: dict[int, int] = field(default_factory=dict)
    tunnel_sent: int = 0
    tunnel_credited: int = 0
    unconsumed: dict[int, int] = field(default_factory=dict)


@settings(max_examples=budget(300), deadline=None)
@given(ops=st.lists(_ops, max_size=80))
def test_bytes_in_flight_never_exceed_the_windows(ops: list[tuple[str, str, int, int]]) -> None:
    pair = connect(RELAY_FC, AGENT_FC)
    ids = [pair.relay.open_stream({}) for _ in range(3)]
    pair.relay_to_agent()
    for sid in ids:
        pair.agent.send_response(sid, {})
    pair.agent_to_relay()
    conns = {"relay": pair.relay, "agent": pair.agent}
    peer = {"relay": "agent", "agent": "relay"}
    # Keyed by sender.
    flows = {
        "relay": _Direction(AGENT_FC, *(dict.fromkeys(ids, 0) for _ in range(2))),
        "agent": _Direction(RELAY_FC, *(dict.fromkeys(ids, 0) for _ in range(2))),
    }
    for flow in flows.values():
        flow.unconsumed = dict.fromkeys(ids, 0)
    queues: dict[str, deque[bytes]] = {"relay": deque(), "agent": deque()}  # keyed by sender

    def collect() -> None:
        for name, conn in conns.items():
            queues[name].extend(conn.data_to_send())

    def in_transit(sender: str, sid: int) -> tuple[int, int, int, int]:
        """DATA bytes from ``sender`` on the way (stream, tunnel), and the credit the
        receiver granted that has not reached ``sender`` yet (stream, tunnel)."""
        data = sum(
            len(fr.payload)
            for fr in map(lambda m: f.decode(m, 1 << 20), queues[sender])
            if fr.type == f.FrameType.DATA and fr.stream_id == sid
        )
        tunnel_data = sum(
            len(fr.payload)
            for fr in map(lambda m: f.decode(m, 1 << 20), queues[sender])
            if fr.type == f.FrameType.DATA
        )
        grants = [
            (fr.stream_id, f.decode_window(fr))
            for fr in map(lambda m: f.decode(m, 1 << 20), queues[peer[sender]])
            if fr.type == f.FrameType.WINDOW
        ]
        return (
            data,
            tunnel_data,
            sum(n for s, n in grants if s == sid),
            sum(n for s, n in grants if s == 0),
        )

    def deliver(sender: str, count: int) -> None:
        receiver = peer[sender]
        for _ in range(min(count, len(queues[sender]))):
            message = queues[sender].popleft()
            frame = f.decode(message, 1 << 20)
            for event in conns[receiver].receive_message(message):
                assert isinstance(event, DataReceived | WindowUpdated), event
                if isinstance(event, DataReceived):
                    flows[sender].unconsumed[event.stream_id] += len(event.data)
            if frame.type == f.FrameType.WINDOW:
                increment = f.decode_window(frame)
                if frame.stream_id == 0:
                    flows[receiver].tunnel_credited += increment
                else:
                    flows[receiver].credited[frame.stream_id] += increment

    def check() -> None:
        for sender, flow in flows.items():
            limits = flow.limits
            tunnel_out = flow.tunnel_sent - flow.tunnel_credited
            assert 0 <= tunnel_out <= limits.tunnel_window
            for sid in ids:
                out = flow.sent[sid] - flow.credited[sid]
                assert 0 <= out <= limits.stream_window
                expected = max(
                    0,
                    min(
                        limits.stream_window - out,
                        limits.tunnel_window - tunnel_out,
                        limits.max_data,
                    ),
                )
                assert conns[sender].max_sendable(sid) == expected
                data, tunnel_data, grant, tunnel_grant = in_transit(sender, sid)
                # Credit comes back only for bytes the application consumed.
                assert out - grant >= data + flow.unconsumed[sid]
                consumed_all = sum(flow.unconsumed.values())
                assert tunnel_out - tunnel_grant >= tunnel_data + consumed_all

    for op, side, index, size in ops:
        if op == "send":
            sid = ids[index]
            room = conns[side].max_sendable(sid)
            if size > room:
                with pytest.raises(FlowControlBlocked):
                    conns[side].send_data(sid, b"s" * size)
                size = room
            conns[side].send_data(sid, b"s" * size)
            flows[side].sent[sid] += size
            flows[side].tunnel_sent += size
        elif op == "deliver":
            deliver(side, index)
        else:
            # ``side`` consumes what the other side sent it.
            sid = ids[index]
            flow = flows[peer[side]]
            take = min(size, flow.unconsumed[sid])
            conns[side].acknowledge(sid, take)
            flow.unconsumed[sid] -= take
        collect()
        check()

    # Liveness: once everything is delivered and consumed, no sender is left stalled,
    # and what is still withheld is less than the batching threshold.
    for _ in range(2):
        for side in SIDES:
            deliver(side, len(queues[side]))
        for side in SIDES:
            flow = flows[peer[side]]
            for sid in ids:
                conns[side].acknowledge(sid, flow.unconsumed[sid])
                flow.unconsumed[sid] = 0
        collect()
    for side in SIDES:
        deliver(side, len(queues[side]))
    check()
    for sender, flow in flows.items():
        assert flow.tunnel_sent - flow.tunnel_credited < flow.limits.tunnel_window // 2
        for sid in ids:
            assert flow.sent[sid] - flow.credited[sid] < flow.limits.stream_window // 2
            assert conns[sender].max_sendable(sid) > 0
