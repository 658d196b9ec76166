"""Bulk DATA messages: queued as their frame header beside their payload, never copied."""

from __future__ import annotations

from backhaul.wire import DataReceived, StreamEnded
from backhaul.wire import frames as f
from tests.backhaul.wire.wire_pair import connect

HEAD = {"method": "POST", "url": "http://api.internal/upload"}


def test_a_bulk_payload_of_bytes_is_queued_beside_its_header_not_copied() -> None:
    pair = connect()
    sid = pair.relay.open_stream(HEAD, end_stream=True)
    pair.relay_to_agent()
    pair.agent.send_response(sid, {"status": 200})
    pair.agent_to_relay()
    payload = bytes(range(256)) * 300
    pair.agent.send_data(sid, payload, end_stream=True)
    [bulk] = pair.agent.messages_to_send()
    assert isinstance(bulk, f.BulkMessage)
    assert bulk.payload is payload
    assert bulk.head == f.HEADER.pack(f.FrameType.DATA, f.END_STREAM_BIT, sid)
    assert len(bulk) == f.HEADER_SIZE + len(payload)
    assert bulk.join() == f.encode(f.FrameType.DATA, sid, payload, f.END_STREAM_BIT)
    events = pair.relay.receive_message(bulk.join())
    assert [type(e) for e in events] == [DataReceived, StreamEnded]
    assert isinstance(events[0], DataReceived) and bytes(events[0].data) == payload


def test_a_view_of_bytes_stays_a_view_and_anything_mutable_is_copied_at_once() -> None:
    pair = connect()
    sid = pair.relay.open_stream(HEAD)
    whole = b"v" * (3 * f.BULK_FROM)
    view = memoryview(whole)[1 : f.BULK_FROM + 1]
    pair.relay.send_data(sid, view)
    mutable = bytearray(b"m" * f.BULK_FROM)
    pair.relay.send_data(sid, mutable)
    mutable[:] = b"x" * len(mutable)  # after it was queued: the message keeps what was sent
    small = b"s" * (f.BULK_FROM - 1)
    pair.relay.send_data(sid, small)
    messages = pair.relay.messages_to_send()[1:]  # after the OPEN
    first, second, third = messages
    assert isinstance(first, f.BulkMessage) and first.payload is view
    assert type(second) is bytes and second[f.HEADER_SIZE :] == b"m" * f.BULK_FROM
    assert type(third) is bytes and third[f.HEADER_SIZE :] == small


def test_data_to_send_joins_bulk_messages_for_those_that_take_bytes_only() -> None:
    pair = connect()
    sid = pair.relay.open_stream(HEAD)
    payload = b"p" * f.BULK_FROM
    pair.relay.send_data(sid, payload)
    out = pair.relay.data_to_send()
    assert all(type(m) is bytes for m in out)
    assert out[-1] == f.encode(f.FrameType.DATA, sid, payload)


def test_a_bulk_message_ends_a_batch_run_and_keeps_its_place() -> None:
    pair = connect()
    a = pair.relay.open_stream(HEAD)
    b = pair.relay.open_stream(HEAD)
    pair.relay.send_data(a, b"x" * f.BULK_FROM)
    pair.relay.send_data(b, b"y", end_stream=True)
    messages = pair.relay.messages_to_send()
    kinds = [type(m).__name__ for m in messages]
    assert kinds == ["bytes", "BulkMessage", "bytes"]  # BATCH of two OPENs, bulk, DATA
    assert f.decode(messages[0], 2**20).type == f.FrameType.BATCH
