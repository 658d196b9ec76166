"""The agent's tunnel connection cuts whole binary messages out of the received bytes
itself once the opening handshake is done, and leaves every other frame to websockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.utils import apply_mask

from agent.link import TunnelClientConnection
from tests.feeds import Feed
from tests.ws_frames import frame

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Server = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


def accepting(request: bytes) -> bytes:
    """The 101 answer to a WebSocket request's head."""
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


@contextlib.asynccontextmanager
async def raw_server(server: Server) -> AsyncIterator[int]:
    """A TCP server that reads the client's request head and hands it to ``server``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await server(reader, writer, request)
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


async def client_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """The (opcode, unmasked payload) of every frame the client sends, until its close."""
    frames: list[tuple[int, bytes]] = []
    data = b""
    while not frames or frames[-1][0] != 0x8:
        chunk = await asyncio.wait_for(reader.read(65_536), 5)
        if not chunk:
            break
        data += chunk
        while len(data) >= 2:
            size, at = data[1] & 0x7F, 2
            if size == 126:
                size, at = int.from_bytes(data[2:4], "big"), 4
            if len(data) < at + 4 + size:
                break
            key = data[at : at + 4]
            frames.append((data[0] & 0x0F, apply_mask(data[at + 4 : at + 4 + size], key)))
            data = data[at + 4 + size :]
    return frames


async def writing(
    writer: asyncio.StreamWriter, stream: bytes, rng: random.Random, most: int
) -> None:
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, most)
        writer.write(stream[pos : pos + step])
        await writer.drain()
        pos += step


async def drain(ws: TunnelClientConnection) -> list[bytes | str]:
    """Every message left in websockets' queue, until the connection is closed."""
    got: list[bytes | str] = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            got.append(await asyncio.wait_for(ws.recv(), 5))
    return got


BLOBS = [os.urandom(n) for n in (0, 1, 125, 126, 65_535, 65_536, 200_000)]


@pytest.mark.parametrize("most", [3, 200, 70_000])
async def test_head_and_frames_in_any_chunking_reach_the_tunnel_as_websockets_would_deliver(
    most: int,
) -> None:
    """The response head and the first frames in one stream, cut anywhere: messages before
    the tunnel pushes wait in websockets' queue, messages after it go to the feed, a ping is
    answered, a fragmented and a text message go through websockets, and the close is
    echoed."""
    rng = random.Random(most)
    go = asyncio.Event()
    answers: list[tuple[int, bytes]] = []

    async def server(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> None:
        early = frame(0x2, b"early") + frame(0x2, b"early too")
        await writing(writer, accepting(request) + early, rng, most)
        await go.wait()
        stream = b"".join(frame(0x2, blob) for blob in BLOBS)
        stream += frame(0x9, b"ping-1")
        stream += frame(0x2, b"ab", fin=False) + frame(0x0, b"cd")
        stream += frame(0x1, "héllo".encode()) + frame(0x2, b"queued behind it")
        stream += frame(0x8, (1000).to_bytes(2, "big") + b"bye")
        await writing(writer, stream, rng, most)
        answers.extend(await client_frames(reader))

    feed = Feed()
    async with raw_server(server) as port:
        async with connect(
            f"ws://127.0.0.1:{port}", create_connection=TunnelClientConnection, max_size=2**20
        ) as ws:
            assert isinstance(ws, TunnelClientConnection)
            assert await ws.recv() == b"early"
            assert await ws.recv() == b"early too"
            assert ws._splitter is not None  # the connection cuts the frames itself
            assert ws.push_to(feed)
            go.set()
            rest = await drain(ws)
    assert feed.fed == BLOBS
    assert rest == [b"abcd", "héllo", b"queued behind it"]
    assert answers == [(0xA, b"ping-1"), (0x8, (1000).to_bytes(2, "big") + b"bye")]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(0x2, b"masked", masked=True), 1002),  # a server's frames are not masked
        (frame(0x2, b"x" * 70_000), 1009),  # over max_size (64 KiB here)
        (frame(0x3, b"reserved opcode"), 1002),
        (bytes([0xC2]) + frame(0x2, b"rsv1")[1:], 1002),  # no extension sets RSV1
    ],
)
async def test_a_frame_websockets_refuses_closes_the_connection_as_before(
    bad: bytes, code: int
) -> None:
    answers: list[tuple[int, bytes]] = []

    async def server(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> None:
        writer.write(accepting(request) + frame(0x2, b"first") + bad + frame(0x2, b"never"))
        answers.extend(await client_frames(reader))

    feed = Feed()
    async with raw_server(server) as port:
        async with connect(
            f"ws://127.0.0.1:{port}", create_connection=TunnelClientConnection, max_size=65_536
        ) as ws:
            assert isinstance(ws, TunnelClientConnection)
            rest = await drain(ws)
            ws.push_to(feed)
    assert rest == [b"first"]
    assert answers[-1][0] == 0x8 and int.from_bytes(answers[-1][1][:2], "big") == code
    assert feed.fed == []


async def test_a_refused_handshake_is_websockets_refusal_with_its_body() -> None:
    async def server(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> None:
        writer.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\n"
            + b"denied"
        )
        await writer.drain()

    async with raw_server(server) as port:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{port}", create_connection=TunnelClientConnection)
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"denied"
