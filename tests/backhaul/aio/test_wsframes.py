"""Binary frames written by hand on the hot path parse as websockets' own."""

from __future__ import annotations

import os

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from backhaul.aio import wsframes
from backhaul.aio.wsframes import JOIN_BELOW, KEYS_PER_DRAW, binary_frame, mask_key
from backhaul.wire.frames import BulkMessage


def _opened(protocol: ServerProtocol | ClientProtocol) -> ServerProtocol | ClientProtocol:
    protocol.state = State.OPEN
    protocol.parser = protocol.parse()
    next(protocol.parser)
    return protocol


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, JOIN_BELOW - 1, 300_000])
@pytest.mark.parametrize("masked", [True, False])
def test_a_frame_parses_back_to_its_payload(size: int, masked: bool) -> None:
    payload = os.urandom(size)
    pieces = binary_frame(payload, masked)
    assert len(pieces) == (1 if size < JOIN_BELOW else 2)
    # A client's frames are masked and read by a server, a server's the other way round.
    reader = _opened(ServerProtocol() if masked else ClientProtocol(parse_uri("ws://relay/")))
    reader.receive_data(b"".join(pieces))
    assert reader.parser_exc is None
    [frame] = reader.events_received()
    assert isinstance(frame, Frame)
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (Opcode.BINARY, True, payload)


def test_each_masked_frame_has_its_own_key_and_leaves_the_payload_alone() -> None:
    payload = b"\x00" * 64
    first, second = binary_frame(payload, True)[0], binary_frame(payload, True)[0]
    assert first[2:6] != second[2:6]  # 32 random bits each: equal once in 4 billion
    assert first[6:] == first[2:6] * 16  # zeros masked: the key, repeated
    assert payload == b"\x00" * 64


def test_a_server_frame_is_not_masked() -> None:
    assert binary_frame(b"abc", False) == (b"\x82\x03abc",)


def test_mask_keys_are_drawn_ahead_and_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(wsframes.os, "urandom", urandom)
    wsframes._keys.clear()
    keys = [mask_key() for _ in range(3 * KEYS_PER_DRAW + 1)]
    assert draws == [4 * KEYS_PER_DRAW] * 4  # one system call per KEYS_PER_DRAW frames
    assert all(len(key) == 4 for key in keys)
    # 3,073 keys of 32 random bits: a repeat has odds of about one in a million.
    assert len(set(keys)) == len(keys)


def test_a_forked_child_draws_keys_of_its_own() -> None:
    mask_key()  # the pool is filled
    assert wsframes._keys
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an empty pool, then keys from its own draw
        os.write(write, b"%d" % len(wsframes._keys))
        os._exit(0)
    os.close(write)
    left_in_child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert left_in_child == b"0"


@pytest.mark.parametrize("size", [16 * 1024 + 1, 65_535 - 6, 65_535 - 5, 256 * 1024])
@pytest.mark.parametrize("masked", [True, False])
def test_a_bulk_message_parses_back_to_its_header_and_payload(size: int, masked: bool) -> None:
    head = b"\x05\x01\x00\x00\x00\x07"  # a DATA frame's header: 6 bytes, not a multiple of 4
    payload = os.urandom(size)
    pieces = binary_frame(BulkMessage(head, payload), masked)
    assert len(pieces) == 2
    if not masked:
        assert pieces[1] is payload  # written as it is, not copied behind the header
    reader = _opened(ServerProtocol() if masked else ClientProtocol(parse_uri("ws://relay/")))
    reader.receive_data(b"".join(pieces))
    assert reader.parser_exc is None
    [frame] = reader.events_received()
    assert isinstance(frame, Frame)
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (Opcode.BINARY, True, head + payload)


def test_a_bulk_payload_that_is_a_view_is_masked_from_the_view() -> None:
    whole = os.urandom(70_000)
    view = memoryview(whole)[3:65_000]
    head = b"\x05\x00\x00\x00\x00\x01"
    reader = _opened(ServerProtocol())
    reader.receive_data(b"".join(binary_frame(BulkMessage(head, view), True)))
    [frame] = reader.events_received()
    assert isinstance(frame, Frame)
    assert bytes(frame.data) == head + whole[3:65_000]
