"""The chunk reader under the WebSocket parsers: same frames and errors as websockets' own."""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from backhaul.aio.wsreader import ChunkReader, install, is_open


def run(gen: Generator[None, None, Any]) -> Any:
    """Drive a generator-based read to its result; None when it would wait for more bytes."""
    try:
        while True:
            next(gen)
            return None
    except StopIteration as stop:
        return stop.value


def fed(*chunks: bytes) -> ChunkReader:
    reader = ChunkReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    return reader


def test_read_exact_across_chunks_and_offsets() -> None:
    reader = fed(b"ab", b"cdef", b"g")
    assert run(reader.read_exact(1)) == b"a"
    assert run(reader.read_exact(3)) == b"bcd"
    assert len(reader) == 3
    assert run(reader.read_exact(3)) == b"efg"
    assert len(reader) == 0
    assert run(reader.read_exact(0)) == b""


def test_a_whole_chunk_is_handed_out_without_a_copy() -> None:
    chunk = bytes(range(256)) * 1024
    reader = fed(b"\x82\x7f", chunk)
    assert run(reader.read_exact(2)) == b"\x82\x7f"
    assert run(reader.read_exact(len(chunk))) is chunk


def test_read_exact_waits_for_enough_bytes() -> None:
    reader = fed(b"abc")
    gen = reader.read_exact(5)
    next(gen)  # waits
    reader.feed_data(b"d")
    next(gen)  # still waits
    reader.feed_data(b"efgh")
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == b"abcde"
    assert run(reader.read_exact(3)) == b"fgh"


def test_bytes_it_was_given_are_kept_even_when_the_caller_reuses_its_buffer() -> None:
    buffer = bytearray(b"abcd")
    reader = fed(buffer)
    buffer[:] = b"zzzz"
    assert run(reader.read_exact(4)) == b"abcd"


def test_read_line_and_its_limit() -> None:
    reader = fed(b"HTTP/1.1 101 Sw", b"itching\r\nUpg", b"rade: websocket\r\n\r\n")
    assert run(reader.read_line(8192)) == b"HTTP/1.1 101 Switching\r\n"
    assert run(reader.read_line(8192)) == b"Upgrade: websocket\r\n"
    assert run(reader.read_line(8192)) == b"\r\n"
    with pytest.raises(RuntimeError, match="expected no more than 4 bytes"):
        run(fed(b"abcdef\n").read_line(4))
    with pytest.raises(ValueError, match="expected no more than 4 bytes"):
        run(fed(b"abcdef").read_line(4, ValueError))


def test_end_of_stream() -> None:
    reader = fed(b"abc")
    reader.feed_eof()
    with pytest.raises(EOFError, match="stream ends after 3 bytes, expected 5 bytes"):
        run(reader.read_exact(5))
    with pytest.raises(EOFError, match="before end of line"):
        run(reader.read_line(100))
    assert run(reader.read_to_eof(100)) == b"abc"
    assert run(reader.at_eof()) is True
    with pytest.raises(EOFError):
        reader.feed_data(b"more")
    with pytest.raises(EOFError):
        reader.feed_eof()


def test_at_eof_waits_and_discard_empties() -> None:
    reader = ChunkReader()
    assert run(reader.at_eof()) is None  # nothing yet, no end yet: wait
    reader.feed_data(b"x")
    assert run(reader.at_eof()) is False
    reader.discard()
    assert len(reader) == 0
    reader.feed_eof()
    assert run(reader.at_eof()) is True


def test_read_to_eof_limit() -> None:
    reader = fed(b"abcdef")
    with pytest.raises(RuntimeError, match="read 6 bytes"):
        run(reader.read_to_eof(4))


def _frames(rng: random.Random, mask: bool) -> tuple[bytes, list[tuple[int, bytes, bool]]]:
    """A random stream of frames as a peer would send it, and what each carries."""
    wire = bytearray()
    sent: list[tuple[int, bytes, bool]] = []
    for _ in range(40):
        kind = rng.random()
        if kind < 0.15:
            frame = Frame(Opcode.PING, rng.randbytes(rng.randrange(0, 126)))
        else:
            size = rng.choice([0, 1, 125, 126, 65535, 65536, rng.randrange(0, 300_000)])
            frame = Frame(Opcode.BINARY, rng.randbytes(size))
        wire += frame.serialize(mask=mask)
        sent.append((frame.opcode, bytes(frame.data), frame.fin))
    return bytes(wire), sent


def _received(protocol: Any) -> list[tuple[int, bytes, bool]]:
    return [
        (e.opcode, bytes(e.data), e.fin) for e in protocol.events_received() if isinstance(e, Frame)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_a_server_parses_the_same_frames_as_with_websockets_own_reader(seed: int) -> None:
    rng = random.Random(seed)
    wire, sent = _frames(rng, mask=True)  # client to server: masked
    theirs, ours = ServerProtocol(max_size=None), ServerProtocol(max_size=None)
    install(ours)
    for protocol in (theirs, ours):
        protocol.state = protocol.state.__class__.OPEN  # past the opening handshake
        protocol.parser = protocol.parse()
        next(protocol.parser)
    got_theirs: list[tuple[int, bytes, bool]] = []
    got_ours: list[tuple[int, bytes, bool]] = []
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 7, 1400, 16_384, 65_536, 300_000])
        piece = wire[pos : pos + step]
        pos += step
        theirs.receive_data(piece)
        ours.receive_data(piece)
        got_theirs += _received(theirs)
        got_ours += _received(ours)
        assert got_ours == got_theirs
    assert got_ours == sent
    assert isinstance(ours.reader, ChunkReader)
    assert theirs.parser_exc is None and ours.parser_exc is None


def test_a_client_reads_the_opening_handshake_and_frames_from_it() -> None:
    client = ClientProtocol(parse_uri("ws://relay.example/v1/tunnel"))
    install(client)
    request = client.connect()
    client.send_request(request)
    server = ServerProtocol()
    server.receive_data(client.data_to_send()[0])
    [handshake] = server.events_received()
    response = server.accept(handshake)
    server.send_response(response)
    payload = bytes(range(256)) * 300
    server.send_binary(payload)
    wire = b"".join(server.data_to_send())
    for i in range(0, len(wire), 1000):
        client.receive_data(wire[i : i + 1000])
    events = client.events_received()
    assert client.handshake_exc is None
    assert [bytes(e.data) for e in events if isinstance(e, Frame)] == [payload]


def test_an_oversized_frame_fails_as_before() -> None:
    server = ServerProtocol(max_size=1000)
    install(server)
    server.state = server.state.__class__.OPEN
    server.parser = server.parse()
    next(server.parser)
    server.receive_data(Frame(Opcode.BINARY, b"x" * 2000).serialize(mask=True))
    assert server.parser_exc is not None
    assert "2000" in str(server.parser_exc)


def test_install_refuses_a_protocol_that_already_has_data() -> None:
    server = ServerProtocol()
    server.receive_data(b"GET / HT")
    with pytest.raises(RuntimeError, match="already received"):
        install(server)
    fresh = ServerProtocol()
    install(fresh)
    assert isinstance(fresh.reader, ChunkReader)
    assert not isinstance(fresh.reader, StreamReader)


def test_is_open_reads_the_state_websockets_reports() -> None:
    """is_open reads the protocol's state attribute directly: it must be the one the state
    property returns, in every state a connection goes through."""
    client = ClientProtocol(parse_uri("ws://relay.example/v1/tunnel"))
    server = ServerProtocol()
    seen = []
    for protocol in (client, server):
        assert is_open(protocol) is (protocol.state is State.OPEN)
    client.send_request(client.connect())
    server.receive_data(client.data_to_send()[0])
    [handshake] = server.events_received()
    server.send_response(server.accept(handshake))
    client.receive_data(b"".join(server.data_to_send()))
    for protocol in (client, server):
        seen.append(protocol.state)
        assert is_open(protocol) is (protocol.state is State.OPEN) is True
    client.send_close(1000)
    for protocol in (client, server):
        seen.append(protocol.state)
        assert is_open(protocol) is (protocol.state is State.OPEN)
    assert State.CLOSING in seen
    for state in State:
        server.state = state
        assert is_open(server) is (state is State.OPEN)
