"""Diagnostic connections (``backhaul-agent diagnose``): proven members that are never routed to.

A probe runs the real handshake — TLS, WebSocket upgrade, the relay's challenge and the
member's signature, WELCOME — and then measures round trips with PING/PONG. It is kept out of
the hub and the registry, so the member's running agent keeps its tunnel and no request is
ever sent to the probe. It lives at most :data:`MAX_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib

from backhaul.aio.tunnel import Tunnel
from backhaul.wire import ErrorCode

MAX_SECONDS = 30.0


class Probe(Exception):
    """Raised by the handshake, after WELCOME, when the agent's HELLO asked for a probe."""

    def __init__(self, member_id: str, session_id: str) -> None:
        super().__init__(f"diagnostic probe of {member_id}")
        self.member_id = member_id
        self.session_id = session_id


async def serve(tunnel: Tunnel, limit_seconds: float = MAX_SECONDS) -> None:
    """Answer PINGs until the agent closes, then (or after the limit) close."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_seconds):
            await tunnel.run()
    await tunnel.close(ErrorCode.NO_ERROR, "diagnostic probe finished")
