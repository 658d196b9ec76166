"""The hub of live tunnels: which member of which gateway is connected, and its session.

(Interface stub; the tunnel owner fills it in.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemberLive:
    """What the hub knows about one connected member."""

    member_id: str
    gateway_id: str
    session_id: str
    version: str
    rtt_ms: float | None
    inflight: int
    total: int
    connected_at: float


class Hub:
    def __init__(self) -> None:
        self._live: dict[str, MemberLive] = {}

    def live(self, member_id: str) -> MemberLive | None:
        """The live view of ``member_id``, or None when it has no tunnel here."""
        return self._live.get(member_id)

    async def disconnect(self, member_id: str, reason: str) -> None:
        """Close the tunnel of a revoked member, failing its in-flight streams."""

    async def close(self) -> None:
        """Close every tunnel (relay shutdown)."""
