"""relay.tunnel.StarletteTransport once the tunnel is over (release)."""

from __future__ import annotations

from typing import Any

import pytest

from backhaul.aio.tunnel import TransportClosed
from relay.tunnel import StarletteTransport
from relay.wsprotocol import PUSH_TO, SEND_MESSAGE


class _WebSocket:
    """What the transport uses of a Starlette WebSocket."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"extensions": {SEND_MESSAGE: self.send, PUSH_TO: self.push}}
        self.sent: list[bytes] = []
        self.closed: list[int] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    def push(self, feed: Any) -> bool:
        return True

    async def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


async def test_released_it_holds_nothing_of_the_connection_and_refuses_as_closed() -> None:
    ws = _WebSocket()
    transport = StarletteTransport(ws)  # type: ignore[arg-type]
    transport.accelerate()
    await transport.send(b"one")
    assert transport.push_to(lambda message: True)
    transport.release()
    assert transport.ws is None
    with pytest.raises(TransportClosed):
        await transport.send(b"two")
    with pytest.raises(TransportClosed):
        await transport.recv()
    assert not transport.push_to(lambda message: True)
    await transport.close(1000, "")  # nothing left to close
    assert ws.sent == [b"one"] and ws.closed == []
