"""BATCH frames: many small frames in one WebSocket message, byte by byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.wire import (
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from backhaul.wire import frames as f
from backhaul.wire.connection import Phase
from tests.backhaul.wire.wire_pair import connect, deliver, frames_of

HEAD = {"method": "GET", "url": "http://api.internal/x"}


def _batch(*messages: bytes) -> bytes:
    return f.encode_batch(list(messages))


def test_concurrent_opens_leave_in_one_batch() -> None:
    pair = connect()
    ids = [pair.relay.open_stream(HEAD, end_stream=True) for _ in range(5)]
    messages = pair.relay.messages_to_send()
    assert len(messages) == 1
    assert messages[0][0] == f.FrameType.BATCH
    events = pair.agent.receive_message(messages[0])
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert [e.stream_id for e in opened] == ids
    assert all(e.head == HEAD and e.end_stream for e in opened)
    assert [e.stream_id for e in events if isinstance(e, StreamEnded)] == ids


def test_batch_layout_is_length_prefixed_frames() -> None:
    one = f.encode(f.FrameType.END, 1)
    two = f.encode(f.FrameType.DATA, 3, b"abc", int(f.Flags.END_STREAM))
    wire = f.encode_batch([one, two])
    assert (
        wire
        == (bytes([f.FrameType.BATCH, 0]) + b"\0\0\0\0" + struct.pack("!I", 6) + one)
        + struct.pack("!I", 9)
        + two
    )
    frame = f.decode(wire, 2**20)
    assert f.decode_batch(frame, 16) == [one, two]


def test_a_single_frame_is_never_wrapped() -> None:
    pair = connect()
    pair.relay.open_stream(HEAD)
    messages = pair.relay.messages_to_send()
    assert [m[0] for m in messages] == [f.FrameType.OPEN]


def test_large_frames_go_alone_and_order_is_kept() -> None:
    pair = connect()
    sid = pair.relay.open_stream(HEAD)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {"status": 200})
    pair.agent.send_data(sid, b"a" * 10)
    pair.agent.send_data(sid, b"b" * (f.BATCH_MAX_ENTRY + 1))
    pair.agent.send_data(sid, b"c" * 10)
    pair.agent.send_data(sid, b"d" * 10, end_stream=True)
    messages = pair.agent.messages_to_send()
    bulk = messages[1]
    assert isinstance(bulk, f.BulkMessage)  # the bulk one in its two parts, not copied
    wire = [m.join() if isinstance(m, f.BulkMessage) else m for m in messages]
    assert [m[0] for m in wire] == [f.FrameType.BATCH, f.FrameType.DATA, f.FrameType.BATCH]
    events = [e for m in wire for e in pair.relay.receive_message(m)]
    data = [e.data for e in events if isinstance(e, DataReceived)]
    assert data == [b"a" * 10, b"b" * (f.BATCH_MAX_ENTRY + 1), b"c" * 10, b"d" * 10]
    assert isinstance(events[-1], StreamEnded)


def test_batches_respect_the_peer_frame_limit() -> None:
    pair = connect(agent_settings=Settings(batch_frames=3))
    for _ in range(7):
        pair.relay.open_stream(HEAD, end_stream=True)
    messages = pair.relay.messages_to_send()
    sizes = [len(f.decode_batch(f.decode(m, 2**20), 3)) for m in messages[:2]]
    assert sizes == [3, 3]
    assert messages[2][0] == f.FrameType.OPEN  # the seventh, alone


def test_no_batches_for_a_peer_that_did_not_announce_them() -> None:
    pair = connect(agent_settings=Settings(batch_frames=0))
    for _ in range(3):
        pair.relay.open_stream(HEAD, end_stream=True)
    assert [m[0] for m in pair.relay.messages_to_send()] == [f.FrameType.OPEN] * 3


def test_an_old_peer_hello_without_the_setting_means_no_batches() -> None:
    relay = Connection(Role.RELAY)
    agent = Connection(Role.AGENT)
    relay.send_hello({})
    deliver(relay, agent)
    settings_without = {k: v for k, v in agent.local.to_dict().items() if k != "batch_frames"}
    relay.receive_message(f.encode_json(f.FrameType.HELLO, 0, {"settings": settings_without}))
    assert relay.peer.batch_frames == 0


def test_handshake_frames_are_never_batched() -> None:
    relay = Connection(Role.RELAY)
    relay.send_hello({"challenge": "c"})
    assert [m[0] for m in relay.messages_to_send()] == [f.FrameType.HELLO]


def _terminated(events: list[object]) -> ConnectionTerminated:
    assert len(events) == 1 and isinstance(events[0], ConnectionTerminated), events
    return events[0]


def test_a_batch_to_a_side_that_takes_none_ends_the_tunnel() -> None:
    pair = connect(agent_settings=Settings(batch_frames=0))
    message = _batch(f.encode_json(f.FrameType.OPEN, 1, HEAD), f.encode(f.FrameType.END, 1))
    ended = _terminated(pair.agent.receive_message(message))
    assert ended.code is ErrorCode.PROTOCOL_ERROR
    assert "not announced" in ended.reason
    assert pair.agent.phase is Phase.CLOSED


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\0\0", "length truncated"),
        (struct.pack("!I", 50) + b"x" * 10, "entry truncated"),
        (b"", "empty BATCH"),
    ],
)
def test_malformed_batches_end_the_tunnel(payload: bytes, reason: str) -> None:
    pair = connect()
    message = f.encode(f.FrameType.BATCH, 0, payload)
    assert reason in _terminated(pair.agent.receive_message(message)).reason


def test_too_many_frames_in_a_batch_end_the_tunnel() -> None:
    pair = connect(agent_settings=Settings(batch_frames=2))
    ends = [f.encode(f.FrameType.END, 1)] * 3
    assert "more than 2" in _terminated(pair.agent.receive_message(_batch(*ends))).reason


def test_a_batch_inside_a_batch_ends_the_tunnel() -> None:
    pair = connect()
    inner = _batch(f.encode(f.FrameType.END, 1), f.encode(f.FrameType.END, 3))
    events = pair.agent.receive_message(_batch(inner, f.encode(f.FrameType.END, 5)))
    assert "inside a BATCH" in _terminated(events).reason


def test_a_batch_on_a_stream_or_before_welcome_ends_the_tunnel() -> None:
    pair = connect()
    on_stream = f.encode(f.FrameType.BATCH, 1, struct.pack("!I", 6) + f.encode(f.FrameType.END, 1))
    assert "on a stream" in _terminated(pair.agent.receive_message(on_stream)).reason

    relay = Connection(Role.RELAY)
    agent = Connection(Role.AGENT)
    relay.send_hello({})
    deliver(relay, agent)
    ping = f.encode(f.FrameType.PING, 0, b"\0" * 8)
    early = _batch(ping, ping)
    assert "before WELCOME" in _terminated(agent.receive_message(early)).reason


def test_a_bad_frame_inside_a_batch_resets_only_its_stream() -> None:
    pair = connect()
    good = f.encode_json(f.FrameType.OPEN, 1, HEAD, int(f.Flags.END_STREAM))
    bad = f.encode(f.FrameType.OPEN, 3, b"not json")
    also_good = f.encode_json(f.FrameType.OPEN, 5, HEAD, int(f.Flags.END_STREAM))
    events = pair.agent.receive_message(_batch(good, bad, also_good))
    opened = [e.stream_id for e in events if isinstance(e, StreamOpened)]
    reset = [e for e in events if isinstance(e, StreamReset)]
    assert opened == [1, 5]
    assert [(e.stream_id, e.code, e.remote) for e in reset] == [
        (3, ErrorCode.PROTOCOL_ERROR, False)
    ]
    assert pair.agent.phase is Phase.OPEN
    assert [fr.type for fr in frames_of(pair.agent.data_to_send())] == [f.FrameType.RESET]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["open", "open_end", "data", "end"]), st.binary(max_size=64)),
        min_size=1,
        max_size=40,
    )
)
def test_batched_delivery_means_the_same_as_one_frame_per_message(
    steps: list[tuple[str, bytes]],
) -> None:
    """Whatever the relay queues, the agent sees the same events batched or not."""
    plain, batched = connect(), connect()
    for pair in (plain, batched):
        open_ids: list[int] = []
        for action, data in steps:
            if action.startswith("open") or not open_ids:
                end = action == "open_end"
                sid = pair.relay.open_stream(HEAD, end_stream=end)
                if not end:
                    open_ids.append(sid)
            elif action == "data":
                pair.relay.send_data(open_ids[-1], data)
            else:
                pair.relay.end_stream(open_ids.pop())
    one_by_one = [e for m in plain.relay.data_to_send() for e in plain.agent.receive_message(m)]
    together = [
        e for m in batched.relay.messages_to_send() for e in batched.agent.receive_message(m)
    ]
    assert together == one_by_one


def test_batching_is_offered_only_for_small_frames_to_a_peer_that_takes_them() -> None:
    pair = connect()
    assert not pair.relay.batching  # nothing queued
    sid = pair.relay.open_stream(HEAD)
    assert pair.relay.batching
    pair.relay.send_data(sid, b"x" * (f.BATCH_MAX_ENTRY + 1))
    assert not pair.relay.batching  # a bulk frame is last: nothing to wait for
    plain = connect(agent_settings=Settings(batch_frames=0))
    plain.relay.open_stream(HEAD)
    assert not plain.relay.batching
