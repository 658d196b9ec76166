"""The relay's WebSocket protocol: uvicorn's, parsing out of the chunk reader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvicorn.server
from websockets.asyncio.client import connect
from websockets.protocol import State

from backhaul.aio.wsreader import ChunkReader
from relay.config import RelayConfig
from relay.tls import TLSFiles
from relay.workers import server_config
from relay.wsprotocol import PUSH_TO, QUEUE_HIGH, SEND_MESSAGE, TunnelWebSocketProtocol
from tests.cycles import collector_off, wait_until_freed
from tests.feeds import Feed
from tests.ws_frames import frame

READERS: list[Any] = []


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes binary messages back, and notes which reader the connection parses with."""
    assert scope["type"] == "websocket"
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "bytes": message["bytes"]})


def watching(protocols: list[TunnelWebSocketProtocol]) -> type[TunnelWebSocketProtocol]:
    """The relay's protocol, each connection's instance put on ``protocols``."""

    class Watched(TunnelWebSocketProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            protocols.append(self)

    return Watched


class Recording(TunnelWebSocketProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        READERS.append(self.conn.reader)


@contextlib.asynccontextmanager
async def serving(ws: type, app: Any = echo) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, ws=ws, log_config=None, lifespan="off", ws_max_size=2**24)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def test_tunnel_messages_arrive_whole_through_the_chunk_reader() -> None:
    READERS.clear()
    messages = [os.urandom(n) for n in (0, 1, 125, 126, 65_535, 65_536, 256 * 1024, 3_000_000)]
    async with serving(Recording) as port:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=2**24) as ws:
            for message in messages:
                await ws.send(message)
            for message in messages:
                assert await ws.recv() == message
    assert len(READERS) == 1
    assert isinstance(READERS[0], ChunkReader)


def test_the_relay_serves_with_it() -> None:
    config = server_config(object(), RelayConfig(dev=True), TLSFiles(Path("c"), Path("k")))
    assert config.ws is TunnelWebSocketProtocol


async def test_after_the_handshake_messages_take_the_direct_send() -> None:
    """The scope offers send_message; messages sent through it arrive as ASGI's do, and
    it refuses once the connection is closing."""
    sent: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        direct = scope["extensions"][SEND_MESSAGE]
        for size in (3, 70_000):
            await direct(b"m" * size)
        await send({"type": "websocket.close", "code": 1000})
        try:
            await direct(b"late")
        except OSError as exc:
            sent.append(exc)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, ws=TunnelWebSocketProtocol, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            assert await ws.recv() == b"mmm"
            assert await ws.recv() == b"m" * 70_000
            await ws.wait_closed()
            assert ws.close_code == 1000
    finally:
        server.should_exit = True
        await task
    assert len(sent) == 1


async def test_reading_pauses_only_once_messages_pile_up() -> None:
    """uvicorn pauses reading after every message; the tunnel's protocol lets QUEUE_HIGH
    wait first, then pauses, and loses nothing: all arrive, in order, once the app reads."""
    protocols: list[TunnelWebSocketProtocol] = []
    release = asyncio.Event()

    async def held_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await release.wait()
        while (message := await receive())["type"] != "websocket.disconnect":
            await send({"type": "websocket.send", "bytes": message["bytes"]})

    # 64 KiB each: a read holds a few, so reading pauses well before all have arrived.
    messages = [os.urandom(65_536) for _ in range(4 * QUEUE_HIGH)]
    async with serving(watching(protocols), held_echo) as port:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=2**20, compression=None) as ws:
            (protocol,) = protocols
            ws.transport.set_write_buffer_limits(high=2**24)  # send() never waits for a drain
            try:
                await ws.send(messages[0])
                await asyncio.sleep(0.2)
                assert protocol.queue.qsize() == 1
                assert not protocol.read_paused  # uvicorn's own would have paused here
                for message in messages[1:]:
                    await ws.send(message)
                await asyncio.sleep(0.2)
                assert protocol.read_paused
                assert QUEUE_HIGH <= protocol.queue.qsize() < len(messages)
            finally:
                release.set()
            for message in messages:
                assert await ws.recv() == message
            assert not protocol.read_paused


async def test_pushed_messages_reach_the_feed_and_the_rest_reaches_receive_in_order() -> None:
    """After push_to, binary messages go to the feed as they are parsed; messages that were
    queued first make push_to refuse until the app has read them; a message the feed
    refuses, and the disconnect, come through receive."""
    seen: list[Any] = []
    protocols: list[TunnelWebSocketProtocol] = []

    feed = Feed()
    fed = feed.fed

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        push_to = scope["extensions"][PUSH_TO]
        while protocols[0].queue.empty():  # until the first message waits there
            await asyncio.sleep(0.01)
        seen.append(push_to(feed))  # refused: a message waits
        seen.append((await receive())["bytes"])
        seen.append(push_to(feed))
        await send({"type": "websocket.send", "bytes": b"pushing"})
        while len(fed) < len(messages):
            await asyncio.sleep(0.01)
        feed.refusing = True
        await send({"type": "websocket.send", "bytes": b"refusing"})
        seen.append((await receive())["bytes"])
        seen.append((await receive())["type"])

    messages = [os.urandom(n) for n in (1, 125, 70_000, 300_000)]
    async with serving(watching(protocols), app) as port:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=2**20) as ws:
            await ws.send(b"queued")
            assert await ws.recv() == b"pushing"
            for message in messages:
                await ws.send(message)
            assert await ws.recv() == b"refusing"
            await ws.send(b"refused")
    assert seen == [False, b"queued", True, b"refused", "websocket.disconnect"]
    assert fed == messages


# ------------------------------------------------- frames parsed by the connection itself


def _frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True) -> bytes:
    """One frame as a client sends it (masked), unless told otherwise."""
    return frame(opcode, payload, fin, masked)


def _recording(received: list[Any]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                received.append(("closed", message.get("code")))
                return
            if message.get("bytes") is not None:
                received.append(("bytes", message["bytes"]))
            else:
                received.append(("text", message["text"]))

    return app


async def _upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def _server_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of every unmasked frame the server sends until it closes."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            data += chunk
    frames = []
    while data:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            size, at = int.from_bytes(data[2:4], "big"), 4
        frames.append((data[0] & 0x0F, data[at : at + size]))
        data = data[at + size :]
    return frames


async def test_every_kind_of_frame_arrives_as_websockets_would_deliver_it_in_any_chunking() -> None:
    """Whole binary messages are parsed by the connection, every other frame by websockets:
    in any split of the byte stream, the application sees the same messages in the same
    order, pings are answered and the close is echoed."""
    rng = random.Random(8)
    blobs = [os.urandom(n) for n in (0, 1, 125, 126, 65_535, 65_536, 200_000)]
    stream = b"".join(_frame(0x2, blob) for blob in blobs[:4])
    stream += _frame(0x9, b"ping-1")  # answered with a pong
    stream += _frame(0x2, b"ab", fin=False) + _frame(0x0, b"cd")  # one message in two frames
    stream += _frame(0x1, "héllo".encode())
    stream += b"".join(_frame(0x2, blob) for blob in blobs[4:])
    stream += _frame(0x8, (1000).to_bytes(2, "big") + b"bye")
    expected: list[Any] = [("bytes", blob) for blob in blobs[:4]]
    expected += [("bytes", b"abcd"), ("text", "héllo")]
    expected += [("bytes", blob) for blob in blobs[4:]]
    expected += [("closed", 1000)]
    for cut in range(6):
        received: list[Any] = []
        async with serving(TunnelWebSocketProtocol, _recording(received)) as port:
            reader, writer = await _upgrade(port)
            pos = 0
            while pos < len(stream):
                step = rng.randint(1, 3 if cut == 0 else 70_000)
                writer.write(stream[pos : pos + step])
                await writer.drain()
                pos += step
            frames = await _server_frames(reader)
            writer.close()
            for _ in range(100):
                if received and received[-1][0] == "closed":
                    break
                await asyncio.sleep(0.01)
        assert received == expected
        assert frames == [(0xA, b"ping-1"), (0x8, (1000).to_bytes(2, "big") + b"bye")]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(0x2, b"unmasked", masked=False), 1002),  # a client's frames are masked
        (_frame(0x2, b"x" * 70_000), 1009),  # over ws_max_size (64 KiB here)
        (_frame(0x3, b"reserved opcode"), 1002),
        (bytes([0xC2]) + _frame(0x2, b"rsv1")[1:], 1002),  # no extension sets RSV1
    ],
)
async def test_a_frame_websockets_refuses_closes_the_connection_as_before(
    frame: bytes, code: int
) -> None:
    received: list[Any] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        _recording(received),
        ws=TunnelWebSocketProtocol,
        log_config=None,
        lifespan="off",
        ws_max_size=65_536,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        reader, writer = await _upgrade(sock.getsockname()[1])
        writer.write(_frame(0x2, b"first") + frame + _frame(0x2, b"never delivered"))
        frames = await _server_frames(reader)
        writer.close()
    finally:
        server.should_exit = True
        await task
    assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][1][:2], "big") == code
    assert received[0] == ("bytes", b"first")
    assert ("bytes", b"never delivered") not in received


async def test_after_the_handshake_binary_messages_are_parsed_by_the_connection() -> None:
    protocols: list[TunnelWebSocketProtocol] = []
    async with serving(watching(protocols)) as port:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=2**24) as ws:
            for message in (b"one", os.urandom(70_000)):
                await ws.send(message)
                assert await ws.recv() == message
            assert protocols[0]._splitter is not None  # parsed here, not by websockets
            assert len(protocols[0].conn.reader) == 0  # type: ignore[arg-type]


class _Transport:
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8443), "peername": ("127.0.0.1", 5555)}.get(name)

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_large_message_arriving_in_many_reads_is_joined_once() -> None:
    """The pieces of a frame are kept until it is whole, not joined at every read: a 256 KiB
    message in 16 KiB reads was copied again at each one (quadratic in its reads)."""
    config = uvicorn.Config(_recording([]), ws_per_message_deflate=False, ws_max_size=2**24)
    config.load()
    protocol = TunnelWebSocketProtocol(
        config=config, server_state=uvicorn.server.ServerState(), app_state={}
    )
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    protocol.data_received(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    protocol.conn.state = State.OPEN  # as after the application's accept
    await asyncio.sleep(0)
    while not protocol.queue.empty():
        protocol.queue.get_nowait()
    got: list[bytes] = []
    assert protocol.push_to(lambda data: got.append(data) or True)
    message = os.urandom(256 * 1024)
    frame = _frame(0x2, message)
    reads = [frame[i : i + 16_384] for i in range(0, len(frame), 16_384)]
    for count, read in enumerate(reads[:-1], 1):
        protocol.data_received(read)
        assert len(protocol._splitter.pending) == count  # kept as received
    assert got == []
    protocol.data_received(reads[-1])
    assert got == [message]
    assert protocol._splitter.pending == []
    protocol.data_received(_frame(0x2, b"next") + _frame(0x2, b"and")[:3])
    assert got[1:] == [b"next"] and protocol._splitter.pending_size == 3


async def test_a_closed_tunnel_connection_is_freed_without_the_cyclic_collector() -> None:
    """The splitter's callbacks, the tunnel's feed and the scope's extensions all refer back
    to the protocol; once the connection is lost they must not keep it (and its TLS objects
    and buffers) for a full collection. The application lets go of them as the relay's
    tunnel endpoint does (StarletteTransport.release)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        fed: list[bytes] = []
        assert scope["extensions"][PUSH_TO](fed.append)
        while (await receive())["type"] != "websocket.disconnect":
            pass
        assert fed == [b"x" * 300]

    with collector_off():
        async with serving(TunnelWebSocketProtocol, app) as port:
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send(b"x" * 300)
                await asyncio.sleep(0.05)
            await wait_until_freed(TunnelWebSocketProtocol)
