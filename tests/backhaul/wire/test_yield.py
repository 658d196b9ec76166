"""An older stream holds its bytes in flight to YIELD_IN_FLIGHT while newer streams share the
tunnel, so what they send does not queue behind a bulk transfer's whole window."""

from __future__ import annotations

import pytest

from backhaul.wire import DataReceived, Settings
from backhaul.wire.flow import YIELD_IN_FLIGHT, YIELD_SPAN, ReceiveWindow
from tests.backhaul.wire.wire_pair import Pair, connect, windows

MIB = 1024 * 1024
WINDOW = 2 * MIB
CHUNK = 256 * 1024


def download_pair(agent_settings: Settings | None = None) -> tuple[Pair, int]:
    """A relay that opened one stream; the agent answers it (it sends the DATA)."""
    pair = connect(agent_settings=agent_settings)
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {"status": 200})
    return pair, sid


def fill(pair: Pair, sid: int) -> int:
    """Send DATA on ``sid`` while the agent may; the bytes sent."""
    sent = 0
    while (allowed := pair.agent.max_sendable(sid)) > 0:
        size = min(allowed, CHUNK)
        pair.agent.send_data(sid, b"x" * size)
        sent += size
    return sent


def test_defaults_announce_credit_every_eighth_of_the_window() -> None:
    assert Settings().window_update == Settings().stream_window // 8 == CHUNK
    assert Settings(stream_window=4096).window_update == 512
    assert Settings.from_dict(Settings().to_dict()) == Settings()
    # A peer that announces nothing returns credit at half the window, as before.
    assert Settings.from_dict({}).stream_update == Settings().stream_window // 2
    assert Settings.from_dict(None).window_update == 0


def test_receive_window_grants_at_its_threshold() -> None:
    window = ReceiveWindow(WINDOW, CHUNK)
    window.received(2 * CHUNK, 1)
    assert window.consumed(CHUNK - 1) == 0
    assert window.consumed(1) == CHUNK
    default = ReceiveWindow(WINDOW)
    default.received(2 * CHUNK, 1)
    assert default.consumed(CHUNK) == 0  # h2's half by default


def test_a_stream_alone_keeps_its_whole_window_in_flight() -> None:
    pair, sid = download_pair()
    assert fill(pair, sid) == WINDOW


def test_an_older_stream_yields_to_a_newer_one_and_the_newer_does_not() -> None:
    pair, bulk = download_pair()
    pair.agent.send_data(bulk, b"x" * CHUNK)
    small = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    # The bulk stream may top its bytes in flight up to YIELD_IN_FLIGHT, not the window.
    assert fill(pair, bulk) == YIELD_IN_FLIGHT - CHUNK
    assert pair.agent.max_sendable(bulk) == 0
    pair.agent.send_response(small, {"status": 200})
    assert pair.agent.max_sendable(small) == CHUNK  # a whole frame, from its own window


def test_credit_keeps_a_yielding_stream_moving() -> None:
    """Each window_update bytes the relay consumes come back, so a stream held at
    YIELD_IN_FLIGHT never waits for credit that would only come at half the window."""
    pair, bulk = download_pair()
    pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    delivered = 0
    for _ in range(40):
        fill(pair, bulk)
        for event in pair.agent_to_relay():
            if isinstance(event, DataReceived) and event.stream_id == bulk:
                pair.relay.acknowledge(bulk, len(event.data))
                delivered += len(event.data)
        credit = pair.relay.data_to_send()
        assert windows(credit), "no credit came back: the stream would stall"
        for message in credit:
            pair.agent.receive_message(message)
    assert delivered >= 40 * CHUNK


def test_the_yield_ends_once_enough_has_been_sent_since_the_newer_stream() -> None:
    pair, bulk = download_pair()
    pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    sent = 0
    while sent < YIELD_SPAN:
        sent += fill(pair, bulk)
        for event in pair.agent_to_relay():
            if isinstance(event, DataReceived):
                pair.relay.acknowledge(event.stream_id, len(event.data))
        for message in pair.relay.data_to_send():
            pair.agent.receive_message(message)
    # Past the span the bulk stream has its whole window again.
    assert fill(pair, bulk) >= WINDOW - YIELD_IN_FLIGHT


@pytest.mark.parametrize("window_update", [0, MIB])
def test_no_yield_where_credit_would_come_back_too_late(window_update: int) -> None:
    """A peer that returns credit at half the window (one that predates the setting, or
    says so) is never held below the window: the stream would stall."""
    relay_settings = Settings(window_update=window_update)
    pair = connect(relay_settings=relay_settings)
    bulk = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(bulk, {"status": 200})
    pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    assert fill(pair, bulk) == WINDOW


def test_uploads_yield_the_same_way() -> None:
    """The relay sends the request bodies: its older upload yields to a newer request."""
    pair = connect()
    upload = pair.relay.open_stream({})
    pair.relay.send_data(upload, b"x" * CHUNK)
    pair.relay.open_stream({}, end_stream=True)
    sent = CHUNK
    while (allowed := pair.relay.max_sendable(upload)) > 0:
        pair.relay.send_data(upload, b"x" * min(allowed, CHUNK))
        sent += min(allowed, CHUNK)
    assert sent == YIELD_IN_FLIGHT
