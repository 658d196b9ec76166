"""uvicorn's sans-I/O WebSocket protocol with the tunnel's chunk reader under its parser.

Every agent tunnel is one of these connections; see :mod:`backhaul.aio.wsreader` for why the
received bytes are not kept in websockets' bytearray.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from backhaul.aio.wsreader import install


class TunnelWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install(self.conn)
