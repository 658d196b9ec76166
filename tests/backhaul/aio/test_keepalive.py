"""The keepalive watchdog on a half-open connection: the peer is silent and our writes hang.

A socket whose peer vanished without a FIN or RST accepts writes until its buffer is full,
then blocks them for good. The watchdog must still notice the silence on time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from backhaul.aio.tunnel import StreamError, TransportClosed, Tunnel
from backhaul.wire import CLOSE_CODE_BASE, Connection, ErrorCode, Phase, Role

pytestmark = pytest.mark.timeout(30)


class HalfOpenTransport:
    """Nothing ever arrives; every send after the first ``writable`` ones blocks forever."""

    def __init__(self, writable: int = 0) -> None:
        self.writable = writable
        self.sent = 0
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def recv(self) -> bytes:
        await self.closed.wait()
        raise TransportClosed("closed", self.close_code)

    async def send(self, data: bytes) -> None:
        if self.sent >= self.writable:
            await self.closed.wait()
            raise TransportClosed("closed", self.close_code)
        self.sent += 1

    async def close(self, code: int, reason: str) -> None:
        self.close_code = code
        self.closed.set()


async def test_watchdog_fires_while_a_writer_is_stuck_holding_the_write_lock() -> None:
    transport = HalfOpenTransport()
    tunnel = Tunnel(Connection(Role.RELAY), transport, ping_interval=0.05, ping_timeout=0.3)
    tunnel.conn.send_notice({"kind": "x"})
    stuck_writer = asyncio.create_task(tunnel.flush())  # holds the lock, blocked in send
    await asyncio.sleep(0.01)
    started = time.monotonic()
    runner = asyncio.create_task(tunnel.run())
    async with asyncio.timeout(3):
        await tunnel.wait_closed()
    assert time.monotonic() - started < 0.3 + 0.2
    assert tunnel.close_reason == "no traffic from peer within ping timeout"
    assert transport.close_code == CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR
    await runner
    with pytest.raises(TransportClosed):
        await stuck_writer


async def test_silence_is_detected_at_the_timeout_not_at_the_next_ping() -> None:
    transport = HalfOpenTransport(writable=1_000)
    # Pings are rare here; the timeout must still be honoured to the tenth of a second.
    tunnel = Tunnel(Connection(Role.RELAY), transport, ping_interval=5.0, ping_timeout=0.3)
    started = time.monotonic()
    stream_error: list[BaseException] = []

    async def waiting_stream() -> None:
        stream = await tunnel.open_stream({"x": 1}, end_stream=True)
        try:
            await stream.response()
        except StreamError as exc:
            stream_error.append(exc)

    tunnel.conn.phase = Phase.OPEN  # as after a handshake
    waiter = asyncio.create_task(waiting_stream())
    runner = asyncio.create_task(tunnel.run())
    async with asyncio.timeout(3):
        await tunnel.wait_closed()
        await waiter
    elapsed = time.monotonic() - started
    assert 0.29 <= elapsed < 0.6, elapsed
    assert [getattr(e, "code", None) for e in stream_error] == [ErrorCode.PROTOCOL_ERROR]
    await runner
