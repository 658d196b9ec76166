"""The agent's Prometheus metrics, served on the local status endpoint at ``/metrics``.

They live in their own :class:`~prometheus_client.CollectorRegistry` so a test (or a process
that embeds the agent) never collides with metrics registered elsewhere.

=====================================  ==========  ============================================
name                                   type        meaning
=====================================  ==========  ============================================
backhaul_agent_requests_total          counter     streams finished, by ``outcome`` (ok,
                                                   denied, bad_head, credentials, unreachable,
                                                   timeout, upstream_error, auth_failed,
                                                   cancelled, error)
backhaul_agent_request_seconds         histogram   OPEN to end of the response body
backhaul_agent_bytes_total             counter     body bytes, by ``direction``: ``up`` (caller
                                                   to internal API) and ``down`` (back)
backhaul_agent_tunnel_connected        gauge       1 while the tunnel is up
backhaul_agent_reconnects_total        counter     tunnel reconnect attempts
backhaul_agent_rtt_seconds             gauge       last PING/PONG round trip to the relay
backhaul_agent_flow_stalls_total       counter     times a response body waited for the relay's
                                                   flow-control credit (a slow caller)
backhaul_agent_build_info              info        ``version``, and ``build``: ``python``, or
                                                   ``mypyc`` for the compiled build (setup.py)
=====================================  ==========  ============================================

:mod:`agent.winauth` adds ``backhaul_agent_windows_handshakes_total`` (security contexts
started, by ``mechanism``: kerberos, ntlm) and ``backhaul_agent_windows_legs_total`` (requests
sent for Windows auth, by ``kind``: token, probe, bare) to the same registry.
"""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from agent.errors import AgentError
from backhaul import tallies
from backhaul.aio.tunnel import STALL_HOOKS
from backhaul.version import __version__, build

__all__ = [
    "BUILD",
    "BYTES",
    "FLOW_STALLS",
    "RECONNECTS",
    "REGISTRY",
    "REQUESTS",
    "REQUEST_SECONDS",
    "RTT_SECONDS",
    "TUNNEL_CONNECTED",
    "outcome_of",
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "backhaul_agent_requests",
    "Streams handled by the agent, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "backhaul_agent_request_seconds",
    "Time from OPEN to the end of the response body.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
BYTES = Counter(
    "backhaul_agent_bytes",
    "Body bytes relayed, by direction (up: to the internal API, down: back to the caller).",
    ["direction"],
    registry=REGISTRY,
)
TUNNEL_CONNECTED = Gauge(
    "backhaul_agent_tunnel_connected", "1 while the tunnel to the relay is up.", registry=REGISTRY
)
RECONNECTS = Counter("backhaul_agent_reconnects", "Tunnel reconnect attempts.", registry=REGISTRY)
RTT_SECONDS = Gauge(
    "backhaul_agent_rtt_seconds", "Last measured round trip to the relay.", registry=REGISTRY
)
FLOW_STALLS = Counter(
    "backhaul_agent_flow_stalls",
    "Times a stream writer waited for flow-control credit from the relay.",
    registry=REGISTRY,
)
STALL_HOOKS.append(FLOW_STALLS.inc)
BUILD = Info("backhaul_agent_build", "Version and build of this agent.", registry=REGISTRY)
BUILD.info({"version": __version__, "build": build()})

_OUTCOMES = {
    "target_denied": "denied",
    "bad_request_head": "bad_head",
    "credentials_invalid": "credentials",
    "upstream_unreachable": "unreachable",
    "upstream_timeout": "timeout",
    "upstream_error": "upstream_error",
    "windows_auth_failed": "auth_failed",
}


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label for a stream that ended with ``exc`` (None means success)."""
    if exc is None:
        return "ok"
    if isinstance(exc, AgentError):
        return _OUTCOMES.get(exc.code, "error")
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def render() -> bytes:
    """The Prometheus text exposition of the agent's registry."""
    tallies.flush()  # what the data path counted on its own (backhaul.tallies)
    return bytes(generate_latest(REGISTRY))
