"""Head slots: a connection's fixed OPEN fields cross the tunnel once per slot."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.wire import (
    ConnectionTerminated,
    ErrorCode,
    Settings,
    StreamOpened,
    StreamReset,
)
from backhaul.wire import frames as f
from backhaul.wire.connection import HEAD_SLOT_MAX
from tests.backhaul.wire.wire_pair import Pair, connect, frames_of

REQUEST = {"method": "GET", "url": "http://api.internal/x", "timeout_ms": 30000}
SEALED = "s" * 1600


def _fixed(name: str, sealed: str = SEALED) -> bytes:
    fields = {"connection_id": name, "base_url": "http://api.internal/", "sealed": sealed}
    return json.dumps(fields, separators=(",", ":")).encode()


def _open(pair: Pair, fixed: bytes, request: dict[str, object] | None = None) -> StreamOpened:
    head = json.dumps(request or REQUEST, separators=(",", ":")).encode()
    pair.relay.open_stream(head, end_stream=True, fixed=fixed)
    events = pair.relay_to_agent()
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert len(opened) == 1, events
    return opened[0]


def _sent(pair: Pair) -> dict[str, object]:
    """The last OPEN's payload as it crossed the tunnel."""
    frame = [fr for fr in pair.to_agent if fr.type == f.FrameType.OPEN][-1]
    payload: dict[str, object] = json.loads(frame.payload)
    return payload


def _whole(fixed: bytes, request: dict[str, object] | None = None) -> dict[str, object]:
    return {**(request or REQUEST), **json.loads(fixed)}


def test_the_fixed_fields_cross_once_then_by_slot() -> None:
    pair = connect()
    fixed = _fixed("cxn_a")
    first = _open(pair, fixed)
    assert first.head == _whole(fixed)
    assert _sent(pair)["slot"] == 0
    assert _sent(pair)["fixed"] == json.loads(fixed)
    first_size = len(pair.to_agent[-1].payload)
    for _ in range(3):
        again = _open(pair, fixed)
        assert again.head == _whole(fixed)
        assert _sent(pair) == {**REQUEST, "slot": 0}
    assert len(pair.to_agent[-1].payload) < first_size - len(SEALED)


def test_a_peer_without_slots_gets_whole_heads() -> None:
    pair = connect(agent_settings=Settings(head_slots=0))
    fixed = _fixed("cxn_a")
    for _ in range(2):
        assert _open(pair, fixed).head == _whole(fixed)
        assert _sent(pair) == _whole(fixed)


def test_a_fixed_part_above_the_limit_goes_whole() -> None:
    pair = connect()
    fixed = _fixed("cxn_big", "b" * HEAD_SLOT_MAX)
    for _ in range(2):
        assert _open(pair, fixed).head == _whole(fixed)
        assert "slot" not in _sent(pair)


def test_a_definition_above_the_limit_with_a_large_head_goes_whole() -> None:
    """The limit is on the defining OPEN's whole payload: a fixed part that fits alone but not
    beside a large request head goes whole, and the tunnel stays up."""
    pair = connect()
    fixed = _fixed("cxn_edge", "e" * (HEAD_SLOT_MAX - 200))
    request = {**REQUEST, "headers": [["x-large", "v" * 1000]]}
    assert _open(pair, fixed, request).head == _whole(fixed, request)
    assert "slot" not in _sent(pair)
    assert not pair.agent.closed
    # The next request with a small head defines the slot.
    assert _open(pair, fixed).head == _whole(fixed)
    assert _sent(pair)["slot"] == 0


def test_the_least_recently_used_slot_is_replaced() -> None:
    pair = connect(agent_settings=Settings(head_slots=2))
    a, b, c = _fixed("cxn_a"), _fixed("cxn_b"), _fixed("cxn_c")
    expected = [  # (fixed part, slot, defined here)
        (a, 0, True),
        (b, 1, True),
        (a, 0, False),  # a is now the most recently used
        (c, 1, True),  # b was the least recently used
        (a, 0, False),
        (b, 1, True),  # c out
        (b, 1, False),
        (c, 0, True),  # a out
    ]
    for fixed, slot, defined in expected:
        assert _open(pair, fixed).head == _whole(fixed)
        sent = _sent(pair)
        assert sent["slot"] == slot
        assert ("fixed" in sent) is defined


def test_an_empty_head_takes_the_fixed_fields_alone() -> None:
    pair = connect()
    fixed = _fixed("cxn_a")
    pair.relay.open_stream(b"{}", end_stream=True, fixed=fixed)
    pair.relay.open_stream(b"{}", end_stream=True, fixed=fixed)
    opened = [e for e in pair.relay_to_agent() if isinstance(e, StreamOpened)]
    assert [e.head for e in opened] == [json.loads(fixed)] * 2


def test_a_refused_stream_still_defines_its_slot() -> None:
    pair = connect(agent_settings=Settings(max_streams=1))
    a, b = _fixed("cxn_a"), _fixed("cxn_b")
    first = _open(pair, a)  # open until the agent answers it
    pair.relay.peer = dataclasses.replace(pair.relay.peer, max_streams=8)  # overlooks the limit
    pair.relay.open_stream(json.dumps(REQUEST).encode(), end_stream=True, fixed=b)
    assert pair.relay_to_agent() == []
    assert [fr.type for fr in frames_of(pair.agent.data_to_send())] == [f.FrameType.RESET]
    assert _sent(pair)["fixed"] == json.loads(b)
    pair.agent.send_response(first.stream_id, {"status": 200}, end_stream=True)
    # Slot 1 holds b on both sides: the next OPEN for b refers to it and resolves.
    assert _open(pair, b).head == _whole(b)
    assert _sent(pair) == {**REQUEST, "slot": 1}


def _raw_open(pair: Pair, stream_id: int, payload: dict[str, object]) -> list[object]:
    message = f.encode(f.FrameType.OPEN, stream_id, json.dumps(payload).encode(), 0)
    return list(pair.agent.receive_message(message))


def test_a_reference_to_an_empty_slot_ends_the_tunnel() -> None:
    pair = connect()
    events = _raw_open(pair, 1, {**REQUEST, "slot": 3})
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].code is ErrorCode.PROTOCOL_ERROR
    assert "slot 3 is empty" in events[-1].reason


def test_a_slot_out_of_range_or_malformed_ends_the_tunnel() -> None:
    for bad in (
        {"slot": 64},
        {"slot": -1},
        {"slot": "0"},
        {"slot": True},
        {"slot": 0, "fixed": ["not", "an", "object"]},
    ):
        pair = connect()
        events = _raw_open(pair, 1, {**REQUEST, **bad})
        assert isinstance(events[-1], ConnectionTerminated), bad
        assert events[-1].reason == "invalid head slot definition"


def test_an_oversized_definition_ends_the_tunnel() -> None:
    pair = connect()
    fixed = {"sealed": "x" * HEAD_SLOT_MAX}
    events = _raw_open(pair, 1, {**REQUEST, "slot": 0, "fixed": fixed})
    assert isinstance(events[-1], ConnectionTerminated)


def test_a_field_in_both_resets_the_stream_and_keeps_the_slot() -> None:
    pair = connect()
    events = _raw_open(pair, 1, {**REQUEST, "slot": 0, "fixed": {"url": "http://elsewhere/"}})
    assert [type(e) for e in events] == [StreamReset]
    assert not pair.agent.closed
    events = _raw_open(pair, 3, {"method": "GET", "slot": 0})
    assert [e.head for e in events if isinstance(e, StreamOpened)] == [
        {"method": "GET", "url": "http://elsewhere/"}
    ]


def test_a_malformed_open_forgets_every_slot() -> None:
    """A head that does not decode may have defined a slot: from then on a reference to any
    slot ends the tunnel, never resolves to fields the sender did not mean."""
    pair = connect()
    fixed = _fixed("cxn_a")
    _open(pair, fixed)
    bad = f.encode(f.FrameType.OPEN, 3, b'{"slot": 0, "fixed": {', 0)
    assert [type(e) for e in pair.agent.receive_message(bad)] == [StreamReset]
    events = _raw_open(pair, 5, {**REQUEST, "slot": 0})
    assert isinstance(events[-1], ConnectionTerminated)


@settings(max_examples=150, deadline=None)
@given(
    slots=st.integers(min_value=1, max_value=4),
    picks=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=40),
)
def test_the_agent_always_sees_the_head_the_relay_meant(slots: int, picks: list[int]) -> None:
    pair = connect(agent_settings=Settings(head_slots=slots))
    pool = [_fixed(f"cxn_{i}", f"sealed-{i}") for i in range(7)]
    for n, pick in enumerate(picks):
        request = {**REQUEST, "url": f"http://api.internal/{n}"}
        assert _open(pair, pool[pick], request).head == _whole(pool[pick], request)
        assert 0 <= int(str(_sent(pair)["slot"])) < slots
