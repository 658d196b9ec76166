"""What the agent knows about itself, for the status endpoint and ``backhaul-agent status``."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from agent import metrics
from agent.status import StatusDocument
from backhaul.aio.tunnel import Tunnel
from backhaul.version import __version__


@dataclass
class AgentState:
    """Mutable state behind the status document; the link and the dispatcher update it,
    and live figures (RTT, in-flight) are read from the tunnel itself."""

    relay: str
    member_id: str
    gateway_id: str
    started: float = field(default_factory=time.monotonic)
    tunnel: Tunnel | None = None
    session_id: str | None = None
    connected_since: dt.datetime | None = None
    total: int = 0
    failed: int = 0
    reconnects: int = 0
    last_error: str | None = None
    draining: bool = False
    #: The additional tunnels' own states, one per relay worker beyond the first
    #: (agent.spread); their streams are counted in ``total`` and ``failed`` here.
    additional: list[AgentState] = field(default_factory=list)

    def bind_metrics(self) -> None:
        """Point the tunnel gauges at this state, so /metrics and /status never disagree."""
        metrics.TUNNEL_CONNECTED.set_function(lambda: 1.0 if self.connected else 0.0)
        metrics.RTT_SECONDS.set_function(self._rtt_seconds)

    def _rtt_seconds(self) -> float:
        rtt = self.tunnel.rtt_ms if self.tunnel is not None and self.connected else None
        return 0.0 if rtt is None else rtt / 1000

    @property
    def connected(self) -> bool:
        return self.tunnel is not None and not self.tunnel.closed

    def snapshot(self) -> StatusDocument:
        tunnel = self.tunnel if self.connected else None
        return {
            "connected": self.connected,
            "relay": self.relay,
            "session_id": self.session_id if tunnel else None,
            "member_id": self.member_id,
            "gateway_id": self.gateway_id,
            "rtt_ms": None if tunnel is None or tunnel.rtt_ms is None else round(tunnel.rtt_ms, 3),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "connected_since": self.connected_since.isoformat()
            if tunnel and self.connected_since
            else None,
            "inflight": (tunnel.inflight if tunnel else 0)
            + sum(lane.tunnel.inflight for lane in self.additional if lane.tunnel is not None),
            "tunnels": int(self.connected) + sum(lane.connected for lane in self.additional),
            "total": self.total,
            "failed": self.failed,
            "last_error": self.last_error,
            "version": __version__,
            "reconnects": self.reconnects,
            "draining": self.draining,
        }
