"""The sans-I/O connection driven end to end: a relay and an agent joined by hand."""

from __future__ import annotations

import json

import pytest

from backhaul.wire import (
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    FlowControlBlocked,
    GoAwayReceived,
    HelloReceived,
    LocalProtocolError,
    NoticeReceived,
    Phase,
    PingReceived,
    PongReceived,
    ResponseReceived,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamUnavailable,
    UnknownFrameReceived,
    WelcomeReceived,
    WindowUpdated,
)
from backhaul.wire import frames as f
from tests.backhaul.wire.wire_pair import Pair, connect, deliver, frames_of, windows

SMALL = Settings(
    stream_window=4096, tunnel_window=10_000, max_data=1024, max_streams=8, window_update=2048
)


def _terminated(events: list, code: ErrorCode) -> ConnectionTerminated:
    assert len(events) == 1, events
    event = events[0]
    assert isinstance(event, ConnectionTerminated), event
    assert event.code is code, event
    return event


def _goaway_sent(conn: Connection, code: ErrorCode) -> None:
    out = frames_of(conn.data_to_send())
    assert [fr.type for fr in out][-1] == f.FrameType.GOAWAY
    assert f.decode_goaway(out[-1])[1] is code


def _reset_frames(messages: list[bytes]) -> list[tuple[int, ErrorCode]]:
    return [
        (fr.stream_id, f.decode_reset(fr)[0])
        for fr in frames_of(messages)
        if fr.type == f.FrameType.RESET
    ]


# ---------------------------------------------------------------- handshake


def test_handshake_sequence() -> None:
    relay = Connection(Role.RELAY, Settings(stream_window=5000))
    agent = Connection(Role.AGENT, Settings(max_streams=7))
    assert relay.phase is agent.phase is Phase.HANDSHAKE
    assert not relay.accepting_streams

    relay.send_hello({"challenge": "abc", "version": 1})
    (hello,) = frames_of(relay.data_to_send())
    assert (hello.type, hello.stream_id) == (f.FrameType.HELLO, 0)
    assert json.loads(hello.payload)["settings"] == Settings(stream_window=5000).to_dict()

    relay.send_hello
    relay.receive_message
    events = agent.receive_message(f.encode(f.FrameType.HELLO, 0, hello.payload))
    assert events == [
        HelloReceived(
            {"challenge": "abc", "version": 1, "settings": Settings(stream_window=5000).to_dict()}
        )
    ]
    assert agent.peer == Settings(stream_window=5000)

    agent.send_hello({"signature": "sig"})
    events = deliver(agent, relay)
    assert events == [HelloReceived({"signature": "sig", "settings": agent.local.to_dict()})]
    assert relay.peer == Settings(max_streams=7)
    assert relay.phase is Phase.HANDSHAKE

    relay.send_welcome({"session_id": "ses_1"})
    assert relay.phase is Phase.OPEN
    assert deliver(relay, agent) == [WelcomeReceived({"session_id": "ses_1"})]
    assert agent.phase is Phase.OPEN
    assert relay.accepting_streams


def test_handshake_local_misuse() -> None:
    relay = Connection(Role.RELAY)
    agent = Connection(Role.AGENT)
    with pytest.raises(LocalProtocolError):
        agent.send_hello({})  # the agent answers; it never speaks first
    with pytest.raises(LocalProtocolError):
        relay.send_welcome({})  # no HELLO from the agent yet
    relay.send_hello({})
    with pytest.raises(LocalProtocolError):
        relay.send_hello({})
    deliver(relay, agent)
    with pytest.raises(LocalProtocolError):
        agent.send_welcome({})
    with pytest.raises(LocalProtocolError):
        agent.open_stream({})
    with pytest.raises(StreamUnavailable):
        relay.open_stream({})


def test_settings_exchange_sets_the_send_limits() -> None:
    relay_settings = Settings(stream_window=3000, tunnel_window=9000, max_data=2048, max_streams=2)
    agent_settings = Settings(stream_window=1500, tunnel_window=5000, max_data=1024, max_streams=3)
    pair = connect(relay_settings, agent_settings)
    assert pair.relay.peer == agent_settings
    assert pair.agent.peer == relay_settings
    sid = pair.relay.open_stream({})
    assert pair.relay.max_sendable(sid) == 1024  # the agent's max_data
    pair.relay_to_agent()
    pair.agent.send_response(sid, {})
    assert pair.agent.max_sendable(sid) == 2048  # the relay's max_data
    pair.agent.send_data(sid, b"x" * 2048)
    assert pair.agent.max_sendable(sid) == 3000 - 2048  # the relay's stream window


def test_settings_defaults_when_absent() -> None:
    relay = Connection(Role.RELAY)
    agent = Connection(Role.AGENT, SMALL)
    relay.send_hello({})
    deliver(relay, agent)
    # An agent HELLO without settings: the relay assumes the defaults, no BATCH frames and
    # credit returned at half the window, no prompt credit (an agent that announces nothing
    # predates all three).
    assert relay.receive_message(f.encode_json(f.FrameType.HELLO, 0, {"x": 1})) == [
        HelloReceived({"x": 1})
    ]
    assert relay.peer == Settings(batch_frames=0, window_update=0, prompt_credit=0, head_slots=0)
    assert relay.peer.stream_update == relay.peer.stream_window // 2


@pytest.mark.parametrize(
    "settings",
    [
        [],
        {"stream_window": 0},
        {"tunnel_window": 2**31},
        {"max_data": 10},
        {"max_data": 16 * 1024 * 1024 + 1},
        {"max_streams": True},
        {"max_streams": "4"},
        {"stream_window": 1.5},
    ],
)
def test_invalid_settings_end_the_tunnel(settings: object) -> None:
    relay = Connection(Role.RELAY)
    relay.send_hello({})
    relay.data_to_send()
    events = relay.receive_message(f.encode_json(f.FrameType.HELLO, 0, {"settings": settings}))
    _terminated(events, ErrorCode.PROTOCOL_ERROR)
    assert relay.phase is Phase.CLOSED
    _goaway_sent(relay, ErrorCode.PROTOCOL_ERROR)


# ---------------------------------------------------------------- streams


def test_request_with_end_stream_and_response() -> None:
    pair = connect()
    sid = pair.relay.open_stream({"method": "GET", "path": "/x"}, end_stream=True)
    assert sid == 1
    assert pair.relay.max_sendable(sid) == 0  # half-closed (local)
    assert pair.relay_to_agent() == [
        StreamOpened(1, {"method": "GET", "path": "/x"}, True),
        StreamEnded(1),
    ]
    pair.agent.send_response(1, {"status": 200})
    pair.agent.send_data(1, b"hello ")
    pair.agent.send_data(1, b"world")
    pair.agent.end_stream(1)
    assert not pair.agent.is_active(1)
    assert pair.agent_to_relay() == [
        ResponseReceived(1, {"status": 200}, False),
        DataReceived(1, b"hello ", False),
        DataReceived(1, b"world", False),
        StreamEnded(1),
    ]
    assert not pair.relay.is_active(1)
    assert pair.relay.open_streams == pair.agent.open_streams == 0


def test_body_both_ways_and_end_stream_flags() -> None:
    pair = connect()
    sid = pair.relay.open_stream({"method": "POST"})
    pair.relay.send_data(sid, b"part1")
    pair.relay.send_data(sid, b"part2", end_stream=True)
    assert pair.relay_to_agent() == [
        StreamOpened(sid, {"method": "POST"}, False),
        DataReceived(sid, b"part1", False),
        DataReceived(sid, b"part2", True),
        StreamEnded(sid),
    ]
    with pytest.raises(StreamUnavailable):
        pair.relay.send_data(sid, b"more")
    with pytest.raises(StreamUnavailable):
        pair.relay.end_stream(sid)
    pair.agent.send_response(sid, {"status": 201})
    pair.agent.send_data(sid, b"", end_stream=True)
    assert pair.agent_to_relay() == [
        ResponseReceived(sid, {"status": 201}, False),
        DataReceived(sid, b"", True),
        StreamEnded(sid),
    ]
    assert pair.relay.open_streams == pair.agent.open_streams == 0


def test_response_with_end_stream() -> None:
    pair = connect()
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {"status": 204}, end_stream=True)
    assert not pair.agent.is_active(sid)
    assert pair.agent_to_relay() == [ResponseReceived(sid, {"status": 204}, True), StreamEnded(sid)]
    assert not pair.relay.is_active(sid)


def test_agent_may_answer_before_the_request_body_ends() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    pair.agent.send_response(sid, {"status": 413}, end_stream=True)
    pair.agent_to_relay()
    assert pair.relay.is_active(sid)  # our side is still open
    pair.relay.send_data(sid, b"tail", end_stream=True)
    assert not pair.relay.is_active(sid)
    assert pair.relay_to_agent() == [DataReceived(sid, b"tail", True), StreamEnded(sid)]
    assert pair.agent.open_streams == 0


def test_stream_ids_are_odd_and_increasing() -> None:
    pair = connect()
    assert [pair.relay.open_stream({}) for _ in range(4)] == [1, 3, 5, 7]


def test_many_concurrent_streams_interleaved() -> None:
    pair = connect()
    ids = [pair.relay.open_stream({"n": n}) for n in range(40)]
    for round_ in range(3):
        for n, sid in enumerate(ids):
            pair.relay.send_data(sid, f"{n}:{round_};".encode())
    for sid in ids[::2]:
        pair.relay.end_stream(sid)
    events = pair.relay_to_agent()
    opened = [e.stream_id for e in events if isinstance(e, StreamOpened)]
    assert opened == ids
    bodies: dict[int, bytes] = {}
    for e in events:
        if isinstance(e, DataReceived):
            bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
    assert bodies == {sid: f"{n}:0;{n}:1;{n}:2;".encode() for n, sid in enumerate(ids)}
    assert [e.stream_id for e in events if isinstance(e, StreamEnded)] == ids[::2]

    # Answer in reverse order, interleaving the response bodies.
    for sid in reversed(ids):
        pair.agent.send_response(sid, {"for": sid})
    for chunk in range(2):
        for sid in reversed(ids):
            pair.agent.send_data(sid, bytes([sid]) * (chunk + 1))
    for sid in ids:
        pair.agent.end_stream(sid)
    events = pair.agent_to_relay()
    heads = {e.stream_id: e.head for e in events if isinstance(e, ResponseReceived)}
    assert heads == {sid: {"for": sid} for sid in ids}
    replies: dict[int, bytes] = {}
    for e in events:
        if isinstance(e, DataReceived):
            replies[e.stream_id] = replies.get(e.stream_id, b"") + e.data
    assert replies == {sid: bytes([sid]) * 3 for sid in ids}
    # Half of the requests still have their request body open.
    assert pair.relay.open_streams == 20
    assert pair.agent.open_streams == 20
    for sid in ids[1::2]:
        pair.relay.end_stream(sid)
    pair.relay_to_agent()
    assert pair.relay.open_streams == pair.agent.open_streams == 0


def test_max_streams_of_the_peer_is_respected() -> None:
    pair = connect(agent_settings=Settings(max_streams=2))
    pair.relay.open_stream({})
    pair.relay.open_stream({})
    assert not pair.relay.accepting_streams
    with pytest.raises(StreamUnavailable):
        pair.relay.open_stream({})
    pair.relay.reset_stream(1, ErrorCode.CANCEL)
    assert pair.relay.accepting_streams
    assert pair.relay.open_stream({}) == 5


def test_agent_refuses_streams_beyond_max_streams() -> None:
    pair = connect(agent_settings=Settings(max_streams=1))
    assert pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, 1, {})) == [
        StreamOpened(1, {}, False)
    ]
    assert pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, 3, {})) == []
    assert _reset_frames(pair.agent.data_to_send()) == [(3, ErrorCode.REFUSED_STREAM)]
    assert pair.agent.open_streams == 1


def test_agent_only_answers() -> None:
    pair = connect()
    with pytest.raises(LocalProtocolError):
        pair.agent.open_stream({})
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    with pytest.raises(LocalProtocolError):
        pair.relay.send_response(sid, {})
    with pytest.raises(StreamUnavailable):
        pair.agent.send_response(99, {})


def test_notice_is_delivered() -> None:
    pair = connect()
    pair.relay.send_notice({"kind": "rotate"})
    assert pair.relay_to_agent() == [NoticeReceived({"kind": "rotate"})]


# ---------------------------------------------------------------- flow control


def test_sender_cannot_exceed_max_sendable() -> None:
    pair = connect(agent_settings=SMALL)
    sid = pair.relay.open_stream({})
    assert pair.relay.max_sendable(sid) == 1024
    with pytest.raises(FlowControlBlocked):
        pair.relay.send_data(sid, b"x" * 1025)
    for _ in range(4):
        pair.relay.send_data(sid, b"x" * 1024)
    assert pair.relay.max_sendable(sid) == 0
    with pytest.raises(FlowControlBlocked):
        pair.relay.send_data(sid, b"x")
    # A refused send changes nothing.
    assert pair.relay.max_sendable(sid) == 0
    assert len(pair.relay.data_to_send()) == 5  # OPEN and four DATA frames


def test_credit_returns_only_after_acknowledge_and_batches_at_half_window() -> None:
    pair = connect(agent_settings=SMALL)
    sid = pair.relay.open_stream({})
    for _ in range(3):
        pair.relay.send_data(sid, b"x" * 1024)
    events = pair.relay_to_agent()
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 3072
    assert pair.agent.data_to_send() == []  # arrival alone grants nothing

    pair.agent.acknowledge(sid, 1024)
    assert pair.agent.data_to_send() == []  # 1024 < 4096 // 2
    pair.agent.acknowledge(sid, 1023)
    assert pair.agent.data_to_send() == []
    pair.agent.acknowledge(sid, 1)
    out = pair.agent.data_to_send()
    assert windows(out) == [(sid, 2048)]  # the tunnel (2048 < 10000 // 2) waits
    assert pair.relay.max_sendable(sid) == 1024
    pair.relay.send_data(sid, b"x" * 1024)
    assert pair.relay.max_sendable(sid) == 0
    for message in out:
        assert pair.relay.receive_message(message) == [WindowUpdated(sid)]
    assert pair.relay.max_sendable(sid) == 1024

    pair.agent.acknowledge(sid, 0)
    pair.agent.acknowledge(sid, -5)
    assert pair.agent.data_to_send() == []


def test_a_full_window_is_granted_on_any_consumption() -> None:
    pair = connect(agent_settings=SMALL)
    sid = pair.relay.open_stream({})
    for _ in range(4):
        pair.relay.send_data(sid, b"x" * 1024)
    pair.relay_to_agent()
    # The sender is stalled: waiting for half the window could deadlock, so even a
    # small consumption is granted at once.
    pair.agent.acknowledge(sid, 10)
    assert windows(pair.agent.data_to_send()) == [(sid, 10)]


def test_tunnel_window_is_batched_too() -> None:
    pair = connect(agent_settings=SMALL)
    a = pair.relay.open_stream({})
    b = pair.relay.open_stream({})
    c = pair.relay.open_stream({})
    for sid in (a, b):
        for _ in range(2):
            pair.relay.send_data(sid, b"y" * 1024)
    pair.relay.send_data(c, b"z" * 1000)
    pair.relay_to_agent()
    pair.agent.acknowledge(a, 2048)
    assert windows(pair.agent.data_to_send()) == [(a, 2048)]
    pair.agent.acknowledge(b, 2048)
    assert windows(pair.agent.data_to_send()) == [(b, 2048)]
    pair.agent.acknowledge(c, 1000)  # tunnel: 5096 >= 10000 // 2
    assert windows(pair.agent.data_to_send()) == [(0, 5096)]


def test_tunnel_window_is_shared_across_streams() -> None:
    agent_settings = Settings(stream_window=2048, tunnel_window=3000, max_data=1024)
    pair = connect(agent_settings=agent_settings)
    s1 = pair.relay.open_stream({})
    s2 = pair.relay.open_stream({})
    pair.relay.send_data(s1, b"a" * 1024)
    pair.relay.send_data(s1, b"a" * 1024)
    assert pair.relay.max_sendable(s1) == 0
    assert pair.relay.max_sendable(s2) == 952  # what is left of the tunnel window
    pair.relay.send_data(s2, b"b" * 952)
    assert pair.relay.max_sendable(s2) == 0
    with pytest.raises(FlowControlBlocked):
        pair.relay.send_data(s2, b"b")
    s3 = pair.relay.open_stream({})
    assert pair.relay.max_sendable(s3) == 0

    pair.relay_to_agent()
    pair.agent.acknowledge(s1, 2048)
    out = pair.agent.data_to_send()
    assert windows(out) == [(0, 2048), (s1, 2048)]
    events = [e for m in out for e in pair.relay.receive_message(m)]
    assert events == [WindowUpdated(0), WindowUpdated(s1)]
    assert pair.relay.max_sendable(s2) == 1024
    assert pair.relay.max_sendable(s3) == 1024
    assert pair.relay.max_sendable(s1) == 1024


def test_flow_control_in_the_response_direction() -> None:
    relay_settings = Settings(stream_window=2048, tunnel_window=2048, max_data=1024)
    pair = connect(relay_settings=relay_settings)
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {})
    pair.agent.send_data(sid, b"r" * 1024)
    pair.agent.send_data(sid, b"r" * 1024)
    with pytest.raises(FlowControlBlocked):
        pair.agent.send_data(sid, b"r")
    pair.agent_to_relay()
    pair.relay.acknowledge(sid, 1024)
    # Tunnel and stream both reach half of 2048.
    assert windows(pair.relay.data_to_send()) == [(0, 1024), (sid, 1024)]


def test_acknowledge_after_the_stream_ended_returns_only_tunnel_credit() -> None:
    relay_settings = Settings(stream_window=2048, tunnel_window=2048, max_data=1024)
    pair = connect(relay_settings=relay_settings)
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {})
    pair.agent.send_data(sid, b"r" * 1024, end_stream=True)
    pair.agent_to_relay()
    assert not pair.relay.is_active(sid)
    pair.relay.acknowledge(sid, 1024)
    assert windows(pair.relay.data_to_send()) == [(0, 1024)]


def test_max_sendable_is_zero_for_unknown_or_ended_streams() -> None:
    pair = connect()
    assert pair.relay.max_sendable(1) == 0
    sid = pair.relay.open_stream({})
    pair.relay.end_stream(sid)
    assert pair.relay.max_sendable(sid) == 0


# ---------------------------------------------------------------- GOAWAY


def test_goaway_from_the_agent_refuses_streams_above_last_id() -> None:
    pair = connect()
    ids = [pair.relay.open_stream({}) for _ in range(3)]
    messages = pair.relay.data_to_send()
    for message in messages[:2]:
        pair.agent.receive_message(message)
    held = messages[2]

    pair.agent.goaway(ErrorCode.NO_ERROR, "shutting down")
    assert pair.agent.goaway_sent == ids[1]
    events = pair.agent_to_relay()
    assert events == [
        GoAwayReceived(ids[1], ErrorCode.NO_ERROR, "shutting down"),
        StreamReset(ids[2], ErrorCode.REFUSED_STREAM, "agent draining"),
    ]
    assert pair.relay.goaway_received == ids[1]
    assert not pair.relay.accepting_streams
    with pytest.raises(StreamUnavailable):
        pair.relay.open_stream({})
    assert [pair.relay.is_active(sid) for sid in ids] == [True, True, False]

    # The OPEN that crossed the GOAWAY is refused by the agent, and ignored by the relay.
    assert pair.agent.receive_message(held) == []
    out = pair.agent.data_to_send()
    assert _reset_frames(out) == [(ids[2], ErrorCode.REFUSED_STREAM)]
    assert [e for m in out for e in pair.relay.receive_message(m)] == []

    # The streams below the line finish normally.
    for sid in ids[:2]:
        pair.relay.end_stream(sid)
        pair.relay_to_agent()
        pair.agent.send_response(sid, {"ok": True}, end_stream=True)
        events = pair.agent_to_relay()
        assert events == [ResponseReceived(sid, {"ok": True}, True), StreamEnded(sid)]
    assert pair.relay.open_streams == pair.agent.open_streams == 0


def test_goaway_is_sent_once() -> None:
    pair = connect()
    pair.agent.goaway()
    pair.agent.goaway()
    assert len(pair.agent.data_to_send()) == 1


def test_agent_refuses_open_after_its_goaway() -> None:
    pair = connect()
    pair.agent.goaway()
    pair.agent.data_to_send()
    assert pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, 1, {})) == []
    assert _reset_frames(pair.agent.data_to_send()) == [(1, ErrorCode.REFUSED_STREAM)]
    assert pair.agent.open_streams == 0
    # The refused id still counts: it can't be reused.
    events = pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, 1, {}))
    _terminated(events, ErrorCode.PROTOCOL_ERROR)


def test_relay_goaway_stops_new_streams() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay.goaway(ErrorCode.NO_ERROR, "relay restart")
    assert not pair.relay.accepting_streams
    with pytest.raises(StreamUnavailable):
        pair.relay.open_stream({})
    events = pair.relay_to_agent()
    assert events[-1] == GoAwayReceived(0, ErrorCode.NO_ERROR, "relay restart")
    assert pair.agent.is_active(sid)  # the agent keeps serving what it has


# ---------------------------------------------------------------- RESET, PING, unknown


def test_reset_from_the_relay() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    pair.relay.reset_stream(sid, ErrorCode.CANCEL, "client went away")
    assert not pair.relay.is_active(sid)
    assert pair.relay_to_agent() == [StreamReset(sid, ErrorCode.CANCEL, "client went away")]
    assert not pair.agent.is_active(sid)
    with pytest.raises(StreamUnavailable):
        pair.agent.send_response(sid, {})


def test_reset_from_the_agent() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    pair.agent.send_response(sid, {})
    pair.agent.reset_stream(sid, ErrorCode.UPSTREAM_ERROR, "boom")
    assert pair.agent_to_relay() == [
        ResponseReceived(sid, {}, False),
        StreamReset(sid, ErrorCode.UPSTREAM_ERROR, "boom"),
    ]
    with pytest.raises(StreamUnavailable):
        pair.relay.send_data(sid, b"x")


def test_reset_of_an_unknown_stream_is_a_noop() -> None:
    pair = connect()
    pair.relay.reset_stream(41, ErrorCode.CANCEL)
    assert pair.relay.data_to_send() == []
    assert pair.agent.receive_message(f.encode_reset(1, ErrorCode.CANCEL, "")) == []
    assert pair.agent.data_to_send() == []


def test_frames_crossing_a_reset_are_ignored() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    pair.agent.send_response(sid, {})
    pair.agent.end_stream(sid)
    pair.relay.reset_stream(sid, ErrorCode.CANCEL)
    assert pair.agent_to_relay() == []  # RESPONSE and END cross the RESET: ignored
    # The agent's side was still half-closed (local): the RESET reaches it.
    assert pair.relay_to_agent() == [StreamReset(sid, ErrorCode.CANCEL, "")]
    assert pair.relay.open_streams == pair.agent.open_streams == 0


def test_ping_pong() -> None:
    pair = connect()
    pair.relay.ping(42)
    assert pair.relay_to_agent() == [PingReceived(42)]
    assert pair.agent_to_relay() == [PongReceived(42)]
    pair.agent.ping(-1)
    assert pair.agent_to_relay() == [PingReceived(2**64 - 1)]
    assert pair.relay_to_agent() == [PongReceived(2**64 - 1)]


def test_unknown_frame_type_is_reported_and_skipped() -> None:
    pair = connect()
    message = f.HEADER.pack(0x7F, 0x3, 5) + b"future"
    assert pair.agent.receive_message(message) == [UnknownFrameReceived(0x7F, 5)]
    assert pair.relay.receive_message(message) == [UnknownFrameReceived(0x7F, 5)]
    assert pair.agent.data_to_send() == pair.relay.data_to_send() == []
    sid = pair.relay.open_stream({}, end_stream=True)
    assert pair.relay_to_agent() == [StreamOpened(sid, {}, True), StreamEnded(sid)]


# ---------------------------------------------------------------- protocol violations


@pytest.mark.parametrize(
    "message",
    [
        f.encode_json(f.FrameType.OPEN, 1, {}),
        f.encode_ping(f.FrameType.PING, 1),
        f.encode(f.FrameType.DATA, 1, b"x"),
        f.encode_window(0, 10),
        f.encode_goaway(0, ErrorCode.NO_ERROR, ""),
    ],
)
def test_frames_before_the_handshake_end_the_tunnel(message: bytes) -> None:
    agent = Connection(Role.AGENT)
    _terminated(agent.receive_message(message), ErrorCode.PROTOCOL_ERROR)
    assert agent.phase is Phase.CLOSED
    _goaway_sent(agent, ErrorCode.PROTOCOL_ERROR)
    # A closed connection ignores everything afterwards.
    assert agent.receive_message(f.encode_json(f.FrameType.HELLO, 0, {})) == []
    assert agent.data_to_send() == []


def test_frames_before_welcome_end_the_tunnel_for_the_agent() -> None:
    relay = Connection(Role.RELAY)
    agent = Connection(Role.AGENT)
    relay.send_hello({})
    deliver(relay, agent)
    agent.send_hello({})
    agent.data_to_send()
    events = agent.receive_message(f.encode_json(f.FrameType.OPEN, 1, {}))
    _terminated(events, ErrorCode.PROTOCOL_ERROR)


def test_hello_out_of_turn() -> None:
    relay = Connection(Role.RELAY)
    _terminated(
        relay.receive_message(f.encode_json(f.FrameType.HELLO, 0, {})), ErrorCode.PROTOCOL_ERROR
    )
    pair = connect()
    _terminated(
        pair.agent.receive_message(f.encode_json(f.FrameType.HELLO, 0, {})),
        ErrorCode.PROTOCOL_ERROR,
    )


def test_welcome_out_of_turn() -> None:
    relay = Connection(Role.RELAY)
    agent = Connection(Role.AGENT)
    relay.send_hello({})
    deliver(relay, agent)
    # The agent hasn't sent its HELLO yet.
    welcome = f.encode_json(f.FrameType.WELCOME, 0, {})
    _terminated(agent.receive_message(welcome), ErrorCode.PROTOCOL_ERROR)
    # The relay never receives a WELCOME.
    pair = connect()
    _terminated(pair.relay.receive_message(welcome), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "message",
    [
        f.encode_ping(f.FrameType.PING, 1)[:2] + b"\x00\x00\x00\x01" + bytes(8),
        f.encode_json(f.FrameType.NOTICE, 3, {}),
        f.encode_goaway(0, ErrorCode.NO_ERROR, "")[:2] + b"\x00\x00\x00\x05" + bytes(6),
        f.encode_json(f.FrameType.OPEN, 0, {}),
        f.encode(f.FrameType.DATA, 0, b"x"),
        f.encode(f.FrameType.END, 0),
        f.encode_reset(0, ErrorCode.CANCEL, ""),
    ],
)
def test_frames_on_the_wrong_stream_end_the_tunnel(message: bytes) -> None:
    pair = connect()
    _terminated(pair.agent.receive_message(message), ErrorCode.PROTOCOL_ERROR)


def test_data_on_an_idle_stream_ends_the_tunnel() -> None:
    pair = connect()
    pair.relay.open_stream({})
    pair.relay_to_agent()
    _terminated(
        pair.agent.receive_message(f.encode(f.FrameType.DATA, 3, b"x")), ErrorCode.PROTOCOL_ERROR
    )
    assert pair.agent.open_streams == 0
    with pytest.raises(StreamUnavailable):
        pair.agent.send_response(1, {})

    pair = connect()
    pair.relay.open_stream({})
    _terminated(
        pair.relay.receive_message(f.encode(f.FrameType.DATA, 3, b"x")), ErrorCode.PROTOCOL_ERROR
    )


@pytest.mark.parametrize("ftype", [f.FrameType.END, f.FrameType.RESPONSE])
def test_other_frames_on_an_idle_stream_end_the_tunnel(ftype: f.FrameType) -> None:
    pair = connect()
    message = f.encode_json(ftype, 5, {}) if ftype is f.FrameType.RESPONSE else f.encode(ftype, 5)
    target = pair.relay
    _terminated(target.receive_message(message), ErrorCode.PROTOCOL_ERROR)


def test_data_beyond_the_stream_window_resets_only_that_stream() -> None:
    agent_settings = Settings(stream_window=1024, tunnel_window=4096, max_data=2048)
    pair = connect(agent_settings=agent_settings)
    s1 = pair.relay.open_stream({})
    s2 = pair.relay.open_stream({})
    pair.relay_to_agent()

    events = pair.agent.receive_message(f.encode(f.FrameType.DATA, s1, b"x" * 1025))
    assert len(events) == 1
    reset = events[0]
    assert isinstance(reset, StreamReset)
    assert (reset.stream_id, reset.code, reset.remote) == (s1, ErrorCode.FLOW_CONTROL_ERROR, False)
    assert _reset_frames(pair.agent.data_to_send()) == [(s1, ErrorCode.FLOW_CONTROL_ERROR)]
    assert pair.agent.phase is Phase.OPEN
    assert not pair.agent.is_active(s1)

    # The other stream still works, and the offending bytes' tunnel credit was returned:
    # 1025 + 1024 consumed reaches half of the 4096-byte tunnel window.
    pair.relay.send_data(s2, b"y" * 1024, end_stream=True)
    assert pair.relay_to_agent() == [DataReceived(s2, b"y" * 1024, True), StreamEnded(s2)]
    pair.agent.acknowledge(s2, 1024)
    assert windows(pair.agent.data_to_send()) == [(0, 2049)]
    pair.agent.send_response(s2, {}, end_stream=True)
    assert pair.agent_to_relay() == [ResponseReceived(s2, {}, True), StreamEnded(s2)]


def test_data_beyond_the_tunnel_window_ends_the_tunnel() -> None:
    agent_settings = Settings(stream_window=4096, tunnel_window=2000, max_data=4096)
    pair = connect(agent_settings=agent_settings)
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    events = pair.agent.receive_message(f.encode(f.FrameType.DATA, sid, b"x" * 2001))
    _terminated(events, ErrorCode.FLOW_CONTROL_ERROR)


def test_reused_or_even_stream_ids_end_the_tunnel() -> None:
    for ids in ([2], [1, 1], [5, 3], [0x7FFFFFFE]):
        pair = connect()
        events = []
        for sid in ids:
            events = pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, sid, {}))
        _terminated(events, ErrorCode.PROTOCOL_ERROR)


def test_agent_sending_open_ends_the_tunnel() -> None:
    pair = connect()
    _terminated(
        pair.relay.receive_message(f.encode_json(f.FrameType.OPEN, 1, {})),
        ErrorCode.PROTOCOL_ERROR,
    )


def test_relay_sending_response_ends_the_tunnel() -> None:
    pair = connect()
    pair.relay.open_stream({})
    pair.relay_to_agent()
    _terminated(
        pair.agent.receive_message(f.encode_json(f.FrameType.RESPONSE, 1, {})),
        ErrorCode.PROTOCOL_ERROR,
    )


def test_second_response_resets_the_stream() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    response = f.encode_json(f.FrameType.RESPONSE, sid, {"status": 200})
    assert pair.relay.receive_message(response) == [ResponseReceived(sid, {"status": 200}, False)]
    events = pair.relay.receive_message(response)
    assert len(events) == 1
    assert isinstance(events[0], StreamReset)
    assert (events[0].code, events[0].remote) == (ErrorCode.PROTOCOL_ERROR, False)
    assert _reset_frames(pair.relay.data_to_send()) == [(sid, ErrorCode.PROTOCOL_ERROR)]
    assert pair.relay.phase is Phase.OPEN


def test_malformed_open_head_resets_that_stream_only() -> None:
    pair = connect()
    events = pair.agent.receive_message(f.encode(f.FrameType.OPEN, 1, b"[1]"))
    assert [(e.stream_id, e.code, e.remote) for e in events if isinstance(e, StreamReset)] == [
        (1, ErrorCode.PROTOCOL_ERROR, False)
    ]
    assert not pair.agent.is_active(1)
    assert _reset_frames(pair.agent.data_to_send()) == [(1, ErrorCode.PROTOCOL_ERROR)]
    assert pair.agent.receive_message(f.encode_json(f.FrameType.OPEN, 3, {})) == [
        StreamOpened(3, {}, False)
    ]


def test_data_before_response_resets_the_stream() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    events = pair.relay.receive_message(f.encode(f.FrameType.DATA, sid, b"early"))
    assert [(e.stream_id, e.code) for e in events if isinstance(e, StreamReset)] == [
        (sid, ErrorCode.STREAM_CLOSED)
    ]
    assert pair.relay.phase is Phase.OPEN


def test_end_before_response_resets_the_stream() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    events = pair.relay.receive_message(f.encode(f.FrameType.END, sid))
    assert [(e.stream_id, e.code) for e in events if isinstance(e, StreamReset)] == [
        (sid, ErrorCode.PROTOCOL_ERROR)
    ]


def test_data_after_end_resets_the_stream_and_returns_tunnel_credit() -> None:
    agent_settings = Settings(stream_window=4096, tunnel_window=2048, max_data=1024)
    pair = connect(agent_settings=agent_settings)
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    events = pair.agent.receive_message(f.encode(f.FrameType.DATA, sid, b"z" * 1024))
    assert [(e.stream_id, e.code) for e in events if isinstance(e, StreamReset)] == [
        (sid, ErrorCode.STREAM_CLOSED)
    ]
    out = pair.agent.data_to_send()
    assert windows(out) == [(0, 1024)]
    assert _reset_frames(out) == [(sid, ErrorCode.STREAM_CLOSED)]


def test_second_end_resets_the_stream() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay.end_stream(sid)
    pair.relay_to_agent()
    events = pair.agent.receive_message(f.encode(f.FrameType.END, sid))
    assert [(e.stream_id, e.code) for e in events if isinstance(e, StreamReset)] == [
        (sid, ErrorCode.STREAM_CLOSED)
    ]


def test_data_larger_than_max_data_ends_the_tunnel() -> None:
    pair = connect(agent_settings=SMALL)
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    assert pair.agent.receive_message(f.encode(f.FrameType.DATA, sid, b"x" * 1024)) == [
        DataReceived(sid, b"x" * 1024, False)
    ]
    events = pair.agent.receive_message(f.encode(f.FrameType.DATA, sid, b"x" * 1025))
    _terminated(events, ErrorCode.FRAME_TOO_LARGE)


def test_message_larger_than_max_message_ends_the_tunnel() -> None:
    pair = connect()
    message = f.encode(f.FrameType.DATA, 1, bytes(pair.agent.local.max_message))
    _terminated(pair.agent.receive_message(message), ErrorCode.FRAME_TOO_LARGE)


def test_stream_window_overflow_resets_the_stream() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    pair.relay_to_agent()
    events = pair.relay.receive_message(f.encode_window(sid, f.MAX_WINDOW))
    assert len(events) == 1
    assert isinstance(events[0], StreamReset)
    assert (events[0].code, events[0].remote) == (ErrorCode.FLOW_CONTROL_ERROR, False)
    assert pair.relay.phase is Phase.OPEN


def test_window_exactly_up_to_the_limit_is_accepted() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    increment = f.MAX_WINDOW - pair.agent.local.stream_window
    assert pair.relay.receive_message(f.encode_window(sid, increment)) == [WindowUpdated(sid)]
    assert pair.relay.max_sendable(sid) == pair.agent.local.max_data


def test_tunnel_window_overflow_ends_the_tunnel() -> None:
    pair = connect()
    events = pair.relay.receive_message(f.encode_window(0, f.MAX_WINDOW))
    _terminated(events, ErrorCode.FLOW_CONTROL_ERROR)


def test_zero_window_increment() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    zero = f.encode(f.FrameType.WINDOW, sid, b"\x00\x00\x00\x00")
    events = pair.relay.receive_message(zero)
    assert [(e.stream_id, e.code) for e in events if isinstance(e, StreamReset)] == [
        (sid, ErrorCode.PROTOCOL_ERROR)
    ]
    zero = f.encode(f.FrameType.WINDOW, 0, b"\x00\x00\x00\x00")
    _terminated(pair.relay.receive_message(zero), ErrorCode.PROTOCOL_ERROR)


def test_window_for_a_closed_stream_is_ignored() -> None:
    pair = connect()
    assert pair.relay.receive_message(f.encode_window(1, 100)) == []


def test_malformed_reset_ends_the_tunnel() -> None:
    pair = connect()
    events = pair.agent.receive_message(f.encode(f.FrameType.RESET, 1, b"\x00"))
    _terminated(events, ErrorCode.PROTOCOL_ERROR)


def test_late_data_for_a_reset_stream_is_ignored_and_credit_returned() -> None:
    relay_settings = Settings(stream_window=4096, tunnel_window=2048, max_data=1024)
    pair = connect(relay_settings=relay_settings)
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {})
    pair.agent.send_data(sid, b"d" * 1024)
    in_flight = pair.agent.data_to_send()
    pair.relay.reset_stream(sid, ErrorCode.CANCEL, "gone")
    pair.relay.data_to_send()

    events = [e for m in in_flight for e in pair.relay.receive_message(m)]
    assert events == []
    assert pair.relay.phase is Phase.OPEN
    assert windows(pair.relay.data_to_send()) == [(0, 1024)]


def test_terminate_is_final() -> None:
    pair = connect()
    sid = pair.relay.open_stream({})
    event = pair.relay.terminate(ErrorCode.INTERNAL_ERROR, "bye")
    assert event == ConnectionTerminated(ErrorCode.INTERNAL_ERROR, "bye")
    _goaway_sent(pair.relay, ErrorCode.INTERNAL_ERROR)
    pair.relay.terminate(ErrorCode.INTERNAL_ERROR, "again")
    assert pair.relay.data_to_send() == []
    with pytest.raises(StreamUnavailable):
        pair.relay.send_data(sid, b"x")
    with pytest.raises(StreamUnavailable):
        pair.relay.open_stream({})
    pair.relay.acknowledge(sid, 100)
    assert pair.relay.data_to_send() == []


def test_close_events_reset_every_open_stream() -> None:
    pair = connect()
    ids = [pair.relay.open_stream({}) for _ in range(3)]
    events = pair.relay.close_events(ErrorCode.CANCEL, "transport gone")
    assert events == [StreamReset(sid, ErrorCode.CANCEL, "transport gone") for sid in ids]
    assert pair.relay.open_streams == 0
    assert pair.relay.phase is Phase.CLOSED


def test_pair_log_records_frames() -> None:
    pair: Pair = connect()
    pair.relay.ping(1)
    pair.relay_to_agent()
    assert [fr.type for fr in pair.to_agent] == [f.FrameType.PING]
