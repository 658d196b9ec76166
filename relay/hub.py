"""The hub of live tunnels on this relay instance: which member of which gateway is
connected, and how busy it is.

Routing picks the online member with the fewest streams in flight (least-inflight), skipping
members that are draining (they sent GOAWAY) or at their stream limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from backhaul.aio.tunnel import Tunnel
from backhaul.wire import ErrorCode
from relay import metrics
from relay.balancing import DEFAULT_POLICY, RoundRobin, Thresholds, choose

log = structlog.get_logger("backhaul.relay.hub")


@dataclass(eq=False)
class LiveTunnel:
    """One connected member."""

    member_id: str
    gateway_id: str
    session_id: str
    version: str
    hostname: str
    tunnel: Tunnel
    connected_at: float = field(default_factory=time.time)
    total: int = 0
    priority: int = 0
    disabled: bool = False
    #: Host load the agent reports (percent), for the gateway's thresholds.
    cpu: float | None = None
    memory: float | None = None
    instance_id: str = ""
    #: One more tunnel of a member that has one on another worker (``agent.spread``).
    additional: bool = False

    @property
    def draining(self) -> bool:
        conn = self.tunnel.conn
        return conn.goaway_received is not None or conn.goaway_sent is not None

    @property
    def rtt_ms(self) -> float | None:
        rtt = self.tunnel.rtt_ms
        return None if rtt is None else round(rtt, 3)

    @property
    def inflight(self) -> int:
        return self.tunnel.inflight

    @property
    def available(self) -> bool:
        return not self.disabled and not self.tunnel.closed and self.tunnel.conn.accepting_streams


class Hub:
    def __init__(self, instance_id: str = "", on_change: Callable[[], None] | None = None) -> None:
        #: Called after every register and unregister (relay.allocator's trimmer).
        self.on_change = on_change
        self.instance_id = instance_id
        self._by_member: dict[str, LiveTunnel] = {}
        self._by_gateway: dict[str, dict[str, LiveTunnel]] = {}
        self._rotation = RoundRobin()

    def live(self, member_id: str) -> LiveTunnel | None:
        """The live view of ``member_id``, or None when it has no tunnel here."""
        return self._by_member.get(member_id)

    def members(self, gateway_id: str) -> list[LiveTunnel]:
        return list(self._by_gateway.get(gateway_id, {}).values())

    def register(self, live: LiveTunnel) -> LiveTunnel | None:
        """Add a tunnel; returns the member's previous tunnel, which the caller closes."""
        previous = self._by_member.get(live.member_id)
        self._by_member[live.member_id] = live
        self._by_gateway.setdefault(live.gateway_id, {})[live.member_id] = live
        metrics.TUNNELS.set(len(self._by_member))
        if self.on_change is not None:
            self.on_change()
        return previous

    def unregister(self, live: LiveTunnel) -> None:
        if self._by_member.get(live.member_id) is live:
            del self._by_member[live.member_id]
            members = self._by_gateway.get(live.gateway_id, {})
            members.pop(live.member_id, None)
            if not members:
                self._by_gateway.pop(live.gateway_id, None)
        metrics.TUNNELS.set(len(self._by_member))
        if self.on_change is not None:
            self.on_change()

    def pick(
        self,
        gateway_id: str,
        exclude: frozenset[str] = frozenset(),
        policy: str = DEFAULT_POLICY,
        thresholds: Thresholds = Thresholds(),
    ) -> LiveTunnel | None:
        """The available member of ``gateway_id`` that ``policy`` prefers."""
        candidates = [
            live
            for live in self._by_gateway.get(gateway_id, {}).values()
            if live.available and live.member_id not in exclude
        ]
        return choose(candidates, policy, thresholds, gateway_id, self._rotation)

    def set_disabled(self, member_id: str, disabled: bool) -> None:
        live = self._by_member.get(member_id)
        if live is not None:
            live.disabled = disabled

    def local(self) -> list[LiveTunnel]:
        return list(self._by_member.values())

    async def disconnect(self, member_id: str, reason: str) -> None:
        """Close the tunnel of a revoked member, failing its in-flight streams."""
        live = self._by_member.get(member_id)
        if live is not None:
            log.info("hub.disconnect", member_id=member_id, reason=reason)
            self.unregister(live)
            await live.tunnel.close(ErrorCode.UNAUTHORIZED, reason)

    async def close(self) -> None:
        """Close every tunnel (relay shutdown): agents reconnect to another instance."""
        tunnels = list(self._by_member.values())
        await asyncio.gather(
            *(live.tunnel.close(ErrorCode.NO_ERROR, "relay shutting down") for live in tunnels),
            return_exceptions=True,
        )
        self._by_member.clear()
        self._by_gateway.clear()
        metrics.TUNNELS.set(0)
