"""Prometheus metrics of the relay, exported at ``/metrics``.

Defined once at import so every part of the relay (API, tunnel, invoke) increments the same
series; the default registry also carries the process collector (memory, fds, CPU).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from backhaul.aio.tunnel import STALL_HOOKS
from backhaul.version import __version__, build

#: The version and the build (``python`` or ``mypyc``, see setup.py) of this relay.
BUILD = Info("backhaul_relay_build", "Version and build of this relay")
BUILD.info({"version": __version__, "build": build()})

#: Invoke requests answered, by HTTP status code.
REQUESTS = Counter(
    "backhaul_relay_requests_total", "Invoke requests answered by the relay", ["code"]
)
#: Time from an invoke request's arrival to its response head.
REQUEST_SECONDS = Histogram(
    "backhaul_relay_request_seconds",
    "Invoke latency until the response head, in seconds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
#: Agent tunnels currently connected to this relay instance.
TUNNELS = Gauge("backhaul_relay_tunnels", "Live agent tunnels on this relay instance")
#: Body bytes relayed; direction is "request" (caller to agent) or "response".
BYTES = Counter("backhaul_relay_bytes_total", "Body bytes relayed", ["direction"])
#: Tunnels accepted (handshake done) since start: with the gauge above, reconnect churn.
TUNNEL_CONNECTS = Counter(
    "backhaul_relay_tunnel_connects_total", "Agent tunnels accepted by this relay instance"
)
#: Tunnel upgrades answered 503 because too many handshakes were pending: ``scope`` says
#: whether the relay's total cap or the per-address cap was reached (agents back off, retry).
HANDSHAKES_REFUSED = Counter(
    "backhaul_relay_handshakes_refused_total",
    "Tunnel upgrades refused while too many handshakes were pending",
    ["scope"],
)
#: Times a stream writer waited for an agent's flow-control credit (a slow internal API side).
FLOW_STALLS = Counter(
    "backhaul_relay_flow_stalls_total", "Times a stream writer waited for flow-control credit"
)
STALL_HOOKS.append(FLOW_STALLS.inc)
