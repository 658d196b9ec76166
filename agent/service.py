"""``backhaul-agent run``: load keys, start the status endpoint, keep the link up, and drain
on SIGTERM (GOAWAY, in-flight requests finish within the grace period, then exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from agent.config import AgentConfig
from agent.dispatch import Dispatcher
from agent.executor import Executor
from agent.keyring import Keyring
from agent.link import Link, LinkRefused
from agent.spread import Spread
from agent.state import AgentState
from agent.status import StatusServer
from backhaul import gc_tuning, malloc_tuning
from backhaul.keys import load_signing_key
from backhaul.seal import GatewayKeyPair
from backhaul.version import build

log = structlog.get_logger("backhaul.agent")


def load_gateway_key(cfg: AgentConfig) -> GatewayKeyPair:
    """The newest gateway key (what a single-key caller needs)."""
    return Keyring.load(cfg.gateway_key_file).current


async def run(cfg: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``, which a Windows service sets); raises
    LinkRefused when the relay refuses this member."""
    signing_key = load_signing_key(cfg.signing_key_file)
    keyring = Keyring.load(cfg.gateway_key_file)
    state = AgentState(relay=cfg.relay_url, member_id=cfg.member_id, gateway_id=cfg.gateway_id)
    state.bind_metrics()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows: the service manager stops us
            loop.add_signal_handler(sig, stop.set)
    async with Executor(cfg) as executor:
        dispatcher = Dispatcher(executor, keyring, state)
        status = await StatusServer.for_config(cfg, state.snapshot)
        gc_tuning.settle()
        malloc_tuning.tune()
        log.info(
            "agent.started",
            relay=cfg.relay_url,
            member_id=cfg.member_id,
            status_socket=str(cfg.status.socket),
            build=build(),
        )
        link = Link(cfg, signing_key, state, dispatcher.handle)
        spread = Spread(
            lambda lane: Link(cfg, signing_key, lane, dispatcher.handle, additional=True),
            state,
            stop,
        )
        if cfg.tunnel.per_worker:
            link.on_workers = spread.want
        try:
            await link.run(stop)
        except LinkRefused as exc:
            log.error("agent.refused", reason=str(exc))
            raise
        finally:
            await spread.close()
            await status.aclose()
            log.info("agent.stopped")
