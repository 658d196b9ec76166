"""Host load reports: the member tells the relay its CPU and memory use, so a gateway's
thresholds can steer requests away from a busy machine (as Microsoft's gateway clusters do
with their "distribute requests across active gateways" and resource thresholds)."""

from __future__ import annotations

import asyncio
import contextlib

import psutil

from backhaul.aio.tunnel import TransportClosed, Tunnel


def sample() -> dict[str, float]:
    """System-wide CPU (since the last call) and memory use, in percent."""
    return {
        "cpu": float(psutil.cpu_percent(interval=None)),
        "memory": float(psutil.virtual_memory().percent),
    }


async def report_load(tunnel: Tunnel, every: float) -> None:
    """Send a ``load`` NOTICE right away, then every ``every`` seconds, until the tunnel ends."""
    psutil.cpu_percent(interval=None)  # prime: the first reading covers no interval
    with contextlib.suppress(TransportClosed):
        while not tunnel.closed:
            await tunnel.send_notice({"kind": "load", **sample()})
            await asyncio.sleep(every)
