"""The relay's httptools protocol (relay.edge_http) on a real socket, for what the ASGI
tests cannot reach: upgrades, pipelining and request bodies on the ASGI path."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from relay.config import RelayConfig
from relay.edge_http import EdgeHttpProtocol
from relay.limits import _HeadGuard, http_protocol
from tests.cycles import collector_off, wait_until_freed
from tests.relay.relay_helpers import serving


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = scope["path"].encode() + b" " + body
    headers = [(b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def _serving(tmp_path: Path, parser: str = "httptools") -> AbstractAsyncContextManager[int]:
    protocol = http_protocol(RelayConfig(dev=True, data_dir=tmp_path), parser)
    return serving(_app, protocol, ws="websockets-sansio")


async def _read_until(reader: asyncio.StreamReader, count: int, marker: bytes) -> bytes:
    data = b""
    while data.count(marker) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, data
        data += chunk
    return data


async def test_a_websocket_upgrade_switches_protocols(tmp_path: Path) -> None:
    async with _serving(tmp_path) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = await _read_until(reader, 1, b"\r\n\r\n")
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 101")


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with _serving(tmp_path) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
                b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nthi\r\n2\r\nrd\r\n0\r\n\r\n"
            )
            answers = await _read_until(reader, 3, b"HTTP/1.1 200")
            while not answers.endswith(b"/three third"):
                answers += await asyncio.wait_for(reader.read(65536), 5)
        finally:
            writer.close()
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in answers.split(b"HTTP/1.1 200")[1:]]
    assert bodies == [b"/one first", b"/two ", b"/three third"]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_closed_connection_is_freed_without_the_cyclic_collector(
    tmp_path: Path, parser: str
) -> None:
    """A connection's protocol holds its TLS transport and read buffer: freed when the
    connection ends, by reference counting, not when a full collection comes round."""
    with collector_off():
        async with _serving(tmp_path, parser) as port:
            for request, answered in (
                (b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n", True),  # then the caller leaves
                (b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nhalf", False),
                (b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\n", False),
                (
                    b"GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n",
                    True,  # upgraded, then closed
                ),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                if answered:
                    await _read_until(reader, 1, b"\r\n\r\n")
                writer.close()
                await writer.wait_closed()
            await wait_until_freed(EdgeHttpProtocol, _HeadGuard)
