"""The relay's edge limits in process: token buckets, the handshake gate, and the HTTP
protocol's head timeout and head size limit with both of uvicorn's parsers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from prometheus_client import REGISTRY

from backhaul.wire.frames import FrameType
from relay.config import RelayConfig
from relay.limits import HandshakeGate, RateLimiter, http_protocol
from tests.relay.relay_helpers import serving

pytestmark = pytest.mark.timeout(60)


def test_token_bucket_burst_refill_and_retry_after() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.wait("k", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait("k", now=100.0) == pytest.approx(0.5)
    assert limiter.wait("other", now=100.0) == 0.0  # buckets are per key
    assert limiter.wait("k", now=100.5) == 0.0  # one token back after 1 / rate
    assert limiter.wait("k", now=100.5) > 0
    assert RateLimiter(rate=0, burst=0).wait("k") == 0.0  # 0 = unlimited


def test_token_buckets_are_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, size=10)
    for i in range(100):
        limiter.wait(f"k{i}", now=0.0)
    assert len(limiter._buckets) == 10


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


async def _connect() -> dict[str, Any]:
    return {"type": "websocket.connect"}


def _scope(address: str) -> dict[str, Any]:
    return {
        "type": "websocket",
        "path": "/v1/tunnel",
        "client": (address, 1234),
        "extensions": {"websocket.http.response": {}},
    }


def _refused(scope: str) -> float:
    return (
        REGISTRY.get_sample_value("backhaul_relay_handshakes_refused_total", {"scope": scope})
        or 0.0
    )


async def test_handshake_gate_caps_in_total_and_per_address_and_releases_on_welcome() -> None:
    release: dict[str, asyncio.Event] = {}
    welcome = bytes([FrameType.WELCOME]) + b"\0" * 5

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        event = release.setdefault(f"{scope['client'][0]}", asyncio.Event())
        await event.wait()
        await send({"type": "websocket.send", "bytes": welcome})
        await asyncio.sleep(3600)  # a served tunnel lives on without holding a slot

    gate = HandshakeGate(app, total=3, per_address=2)
    tasks = [
        asyncio.create_task(gate(_scope(a), _connect, _Recorder().send))
        for a in ("10.0.0.1", "10.0.0.1", "10.0.0.2")
    ]
    await asyncio.sleep(0.01)
    assert gate.pending == 3
    counted = {s: _refused(s) for s in ("address", "total")}
    for address in ("10.0.0.1", "10.0.0.3"):  # per-address cap, then the total cap
        denied = _Recorder()
        await gate(_scope(address), _connect, denied.send)
        assert denied.sent[0]["type"] == "websocket.http.response.start"
        assert denied.sent[0]["status"] == 503
        assert (b"retry-after", b"1") in denied.sent[0]["headers"]
    assert {s: _refused(s) - n for s, n in counted.items()} == {"address": 1, "total": 1}
    release["10.0.0.1"].set()
    await asyncio.sleep(0.01)
    assert gate.pending == 1 and gate.by_address == {"10.0.0.2": 1}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.pending == 0 and gate.by_address == {}


async def test_handshake_gate_releases_when_the_relay_closes() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "websocket.close", "code": 4001})
        assert gate.pending == 0  # released before the close completes
        await asyncio.sleep(0)

    gate = HandshakeGate(app, total=1, per_address=0)
    await gate(_scope("10.0.0.1"), _connect, _Recorder().send)
    assert gate.pending == 0


# ---------------------------------------------------------------- request heads


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _serving(parser: str, keep_alive: int = 5) -> AbstractAsyncContextManager[int]:
    config = RelayConfig(
        dev=True, header_timeout_seconds=0.5, max_request_header_bytes=4096, data_dir="/tmp"
    )
    return serving(_hello, http_protocol(config, parser), timeout_keep_alive=keep_alive)


@pytest.fixture(params=["h11", "httptools"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    if request.param == "httptools":
        pytest.importorskip("httptools")
    async with _serving(request.param) as port:
        yield port


async def _exchange(port: int, data: bytes, trickle: float = 0.0) -> tuple[bytes, float]:
    """Send ``data`` (a byte every ``trickle`` seconds); the first answer and when it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = asyncio.create_task(reader.read(65536))
    try:
        for i in range(len(data) if trickle else 0):
            if answer.done():
                break
            writer.write(data[i : i + 1])
            await asyncio.sleep(trickle)
        if not trickle:
            writer.write(data)
        return await asyncio.wait_for(answer, 5), time.monotonic() - started
    finally:
        writer.close()


async def test_a_complete_head_is_served(server: int) -> None:
    answer, _ = await _exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


async def test_a_trickled_head_is_cut_at_the_timeout(server: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    answer, elapsed = await _exchange(server, head, trickle=0.02)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b"application/problem+json" in answer
    assert 0.45 < elapsed < 1.5


async def test_a_silent_connection_is_cut_at_the_timeout(server: int) -> None:
    answer, elapsed = await _exchange(server, b"")
    assert answer.startswith(b"HTTP/1.1 408")
    assert 0.45 < elapsed < 1.5


async def test_an_oversized_head_is_431(server: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    answer, _ = await _exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 431")


async def test_the_timeout_restarts_for_each_kept_alive_request(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(65536), 5)
            assert answer.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.3)  # idle between requests is the keep-alive's business
    finally:
        writer.close()


async def test_a_slow_head_after_kept_alive_requests_is_cut_at_its_own_deadline(
    server: int,
) -> None:
    """One timer serves the connection: quick requests move its deadline along, and a head
    that then trickles in is cut half a second after it started, neither sooner nor never."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        for _ in range(3):  # the first head's deadline passes while these are served
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(65536), 5)
            assert answer.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.25)
        started = time.monotonic()
        answer_task = asyncio.create_task(reader.read(65536))
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if answer_task.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)
        answer = await asyncio.wait_for(answer_task, 5)
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert 0.45 < elapsed < 1.2, elapsed


@pytest.mark.parametrize("parser", ["h11", "httptools"])
async def test_an_idle_kept_alive_connection_is_closed_at_the_keep_alive_timeout(
    parser: str,
) -> None:
    """Closed quietly after ``timeout_keep_alive`` (1 s here), not answered 408 at the head
    timeout (0.5 s): between requests the connection owes no head."""
    async with _serving(parser, keep_alive=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(65536), 5)
            assert answer.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            rest = await asyncio.wait_for(reader.read(65536), 5)
            elapsed = time.monotonic() - started
        finally:
            writer.close()
    assert rest == b""
    assert 0.9 < elapsed < 2.5, elapsed
