"""An older stream holds its bytes in flight low while newer streams share the tunnel, so what
they send does not queue behind a bulk transfer's whole window: to PROMPT_IN_FLIGHT in frames
of PROMPT_FRAME that ask for their credit back at once, toward a peer that takes prompt
credit; to YIELD_IN_FLIGHT toward one that only returns credit every window_update bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.wire import DataReceived, Settings
from backhaul.wire import frames as f
from backhaul.wire.flow import (
    PROMPT_FRAME,
    PROMPT_IN_FLIGHT,
    YIELD_IN_FLIGHT,
    YIELD_SPAN,
    ReceiveWindow,
)
from tests.backhaul.wire.wire_pair import Pair, connect, windows
from tests.fuzzing import budget

MIB = 1024 * 1024
WINDOW = 2 * MIB
CHUNK = 256 * 1024


#: A relay that returns credit every window_update bytes only (it predates prompt credit).
NO_PROMPT = Settings(prompt_credit=0)


def download_pair(relay_settings: Settings | None = None) -> tuple[Pair, int]:
    """A relay that opened one stream; the agent answers it (it sends the DATA)."""
    pair = connect(relay_settings=relay_settings)
    sid = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {"status": 200})
    return pair, sid


def data_frames(messages: list[bytes]) -> list[f.Frame]:
    """The DATA frames in ``messages``, BATCH messages opened."""
    found = []
    for message in messages:
        frame = f.decode(message, 2**32)
        inner = f.decode_batch(frame, 2**16) if frame.type == f.FrameType.BATCH else [message]
        found += [f.decode(m, 2**32) for m in inner]
    return [x for x in found if x.type == f.FrameType.DATA]


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


def test_prompt_credit_covers_the_flagged_frames_even_after_unflagged_ones_arrived() -> None:
    """A flagged frame, then an unflagged one (the sender's yield ended), both received
    before the application reads: reading the flagged one still returns its credit, which
    is what the sender waits for before it may send its next flagged frame."""
    window = ReceiveWindow(WINDOW, CHUNK)
    window.received(PROMPT_FRAME, 1)
    window.prompt()
    window.received(100_000, 1)
    assert window.consumed(PROMPT_FRAME) == PROMPT_FRAME
    assert window.consumed(100_000) == 0  # past the flagged bytes: the threshold again
    window.received(PROMPT_FRAME, 1)
    window.prompt()
    # Everything pending goes back with the next flagged frame's bytes.
    assert window.consumed(PROMPT_FRAME) == 100_000 + PROMPT_FRAME


def test_a_stream_alone_keeps_its_whole_window_in_flight() -> None:
    pair, sid = download_pair()
    assert fill(pair, sid) == WINDOW


def test_an_older_stream_yields_to_a_newer_one_and_the_newer_does_not() -> None:
    pair, bulk = download_pair()
    pair.agent.send_data(bulk, b"x" * CHUNK)
    small = pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    # In flight already: CHUNK, more than PROMPT_IN_FLIGHT, none of it asking for prompt
    # credit. One flagged frame may go (it fetches the credit back), then nothing.
    assert pair.agent.max_sendable(bulk) == PROMPT_FRAME
    pair.agent.send_data(bulk, b"x" * PROMPT_FRAME)
    assert pair.agent.max_sendable(bulk) == 0
    pair.agent.send_response(small, {"status": 200})
    assert pair.agent.max_sendable(small) == CHUNK  # a whole frame, from its own window


def test_a_yielding_stream_sends_small_frames_that_ask_for_prompt_credit() -> None:
    pair, bulk = download_pair()
    pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    assert fill(pair, bulk) == PROMPT_IN_FLIGHT
    messages = pair.agent.data_to_send()
    frames = data_frames(messages)
    assert [len(x.payload) for x in frames] == [PROMPT_FRAME] * (PROMPT_IN_FLIGHT // PROMPT_FRAME)
    assert all(x.flags & f.PROMPT_CREDIT_BIT for x in frames)
    # The relay consumes one frame: its credit comes back at once, far below window_update.
    for message in messages:
        pair.relay.receive_message(message)
    pair.relay.acknowledge(bulk, PROMPT_FRAME)
    assert windows(pair.relay.data_to_send()) == [(bulk, PROMPT_FRAME)]


@pytest.mark.parametrize("window_update", [CHUNK, 0], ids=["window-update", "half-the-window"])
def test_bytes_sent_before_the_yield_cannot_stall_it(window_update: int) -> None:
    """Less than the receiver's threshold in flight, sent before a newer stream came: the
    receiver may hold their credit until the threshold adds up. The flagged frame that still
    may go brings all of it back once it is consumed."""
    pair, bulk = download_pair(Settings(window_update=window_update))
    threshold = pair.relay.local.stream_update
    left = threshold - PROMPT_FRAME  # below the threshold
    while left:
        pair.agent.send_data(bulk, b"x" * min(left, CHUNK))
        left -= min(left, CHUNK)
    pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    for _ in range(3):
        fill(pair, bulk)
        for event in pair.agent_to_relay():
            if isinstance(event, DataReceived) and event.stream_id == bulk:
                pair.relay.acknowledge(bulk, len(event.data))
        credit = pair.relay.data_to_send()
        assert windows(credit), "no credit came back: the stream would stall"
        for message in credit:
            pair.agent.receive_message(message)
        assert pair.agent.max_sendable(bulk) > 0


def test_a_stream_alone_neither_caps_its_frames_nor_asks_for_prompt_credit() -> None:
    pair, sid = download_pair()
    pair.agent.send_data(sid, b"x" * CHUNK)
    messages = pair.agent.data_to_send()
    for message in messages:
        pair.relay.receive_message(message)
    [frame] = data_frames(messages)
    assert len(frame.payload) == CHUNK and not frame.flags & f.PROMPT_CREDIT_BIT
    # Its receiver waits for window_update consumed bytes, as before.
    pair.relay.acknowledge(sid, PROMPT_FRAME)
    assert windows(pair.relay.data_to_send()) == []


def test_an_older_stream_yields_to_yield_in_flight_toward_a_peer_without_prompt_credit() -> None:
    pair, bulk = download_pair(NO_PROMPT)
    pair.agent.send_data(bulk, b"x" * CHUNK)
    pair.relay.open_stream({}, end_stream=True)
    pair.relay_to_agent()
    assert fill(pair, bulk) == YIELD_IN_FLIGHT - CHUNK
    frames = [f.decode(m, 2**32) for m in pair.agent.data_to_send()]
    assert not any(x.flags & f.PROMPT_CREDIT_BIT for x in frames)


def test_a_receiver_without_prompt_credit_ignores_the_flag() -> None:
    pair, sid = download_pair(NO_PROMPT)
    flagged = f.encode(f.FrameType.DATA, sid, b"x" * PROMPT_FRAME, f.PROMPT_CREDIT_BIT)
    pair.relay.receive_message(flagged)
    pair.relay.acknowledge(sid, PROMPT_FRAME)
    assert windows(pair.relay.data_to_send()) == []


@pytest.mark.parametrize(
    "relay_settings",
    [None, NO_PROMPT, Settings(window_update=0)],
    ids=["prompt", "no-prompt", "prompt-credit-at-half-the-window"],
)
def test_credit_keeps_a_yielding_stream_moving(relay_settings: Settings | None) -> None:
    """Credit comes back before the bytes a yielding stream may keep in flight run out, so
    it never waits for credit that would only come at half the window."""
    pair, bulk = download_pair(relay_settings)
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
    assert delivered >= 40 * PROMPT_FRAME


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
    says so) and takes no prompt credit is never held below the window: it would stall."""
    relay_settings = Settings(window_update=window_update, prompt_credit=0)
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
    pair.relay.send_data(upload, b"x" * pair.relay.max_sendable(upload))  # the flagged one
    assert pair.relay.max_sendable(upload) == 0  # above PROMPT_IN_FLIGHT
    other = pair.relay.open_stream({})
    pair.relay.send_data(other, b"x" * PROMPT_FRAME)
    pair.relay.open_stream({}, end_stream=True)
    sent = PROMPT_FRAME
    while (allowed := pair.relay.max_sendable(other)) > 0:
        assert allowed <= PROMPT_FRAME
        pair.relay.send_data(other, b"x" * allowed)
        sent += allowed
    assert sent == PROMPT_IN_FLIGHT


_YIELD_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, CHUNK)),
        st.tuples(st.just("newcomer"), st.just(0)),
        st.tuples(st.just("to_relay"), st.integers(1, 4)),
        st.tuples(st.just("to_agent"), st.integers(1, 4)),
        st.tuples(st.just("consume"), st.integers(1, 3 * CHUNK)),
    ),
    max_size=60,
)


@pytest.mark.parametrize(
    "relay_settings",
    [Settings(), NO_PROMPT, Settings(window_update=0), Settings(window_update=0, prompt_credit=0)],
    ids=["prompt", "no-prompt", "prompt-at-half-the-window", "legacy"],
)
@settings(max_examples=budget(60), deadline=None)
@given(ops=_YIELD_OPS)
def test_a_bulk_stream_never_stalls_and_never_overruns(
    relay_settings: Settings, ops: list[tuple[str, int]]
) -> None:
    """A download with newer streams starting beside it, frames and credit delivered and
    consumed in any order: it never has more in flight than the window, and once everything
    is delivered and consumed it can always send again."""
    pair, bulk = download_pair(relay_settings)
    to_relay: list[bytes] = []
    to_agent: list[bytes] = []
    unconsumed = 0
    sent = credited = 0

    def deliver_to_relay(count: int) -> None:
        nonlocal unconsumed
        for message in to_relay[:count]:
            for event in pair.relay.receive_message(message):
                if isinstance(event, DataReceived) and event.stream_id == bulk:
                    unconsumed += len(event.data)
        del to_relay[:count]

    def deliver_to_agent(count: int) -> None:
        nonlocal credited
        for message in to_agent[:count]:
            credited += sum(n for sid, n in windows([message]) if sid == bulk)
            pair.agent.receive_message(message)
        del to_agent[:count]

    def collect() -> None:
        to_relay.extend(pair.agent.data_to_send())
        to_agent.extend(pair.relay.data_to_send())

    for op, n in ops:
        if op == "send":
            size = min(n, pair.agent.max_sendable(bulk))
            pair.agent.send_data(bulk, b"x" * size)
            sent += size
        elif op == "newcomer":
            pair.relay.open_stream({}, end_stream=True)
        elif op == "to_relay":
            deliver_to_relay(n)
        elif op == "to_agent":
            deliver_to_agent(n)
        else:
            take = min(n, unconsumed)
            pair.relay.acknowledge(bulk, take)
            unconsumed -= take
        collect()
        assert 0 <= sent - credited <= WINDOW
    for _ in range(2):
        deliver_to_relay(len(to_relay))
        pair.relay.acknowledge(bulk, unconsumed)
        unconsumed = 0
        collect()
        deliver_to_agent(len(to_agent))
        collect()
    assert pair.agent.max_sendable(bulk) > 0, "the stream is stalled"
