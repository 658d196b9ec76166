"""One tunnel per worker process of the relay.

A relay machine may run several worker processes on one address (``backhaul-relay serve
--workers N``), and each worker serves only the tunnels it holds itself: a caller's request
that lands on a worker without one of the gateway's tunnels is streamed on to a worker that
has one (``relay.forward``), so the relay does its work twice for that request. A relay with
workers says how many in WELCOME (``"workers": N``), and the agent then keeps N - 1
*additional* tunnels to the same address next to its own link (``Link.run_additional``).

The agent cannot choose a worker: the kernel gives each new connection to whichever worker
accepts it first. A worker that already holds one of this member's tunnels turns an additional
one away (close ``4000 + ErrorCode.ALREADY_CONNECTED``) instead of replacing its tunnel, and
the additional tunnel tries again after a short random pause, until every worker holds one.
An additional tunnel serves streams exactly as the main link does; when the main link moves
to another relay, or that relay stops saying it has workers, the additional tunnels drain and
close (GOAWAY, in-flight requests finish), as they do when the agent stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from agent.link import Link
from agent.state import AgentState

log = structlog.get_logger("backhaul.agent.spread")


class Spread:
    """Keeps ``workers - 1`` additional tunnels to the relay the main link is on."""

    def __init__(
        self, make_link: Callable[[AgentState], Link], state: AgentState, stop: asyncio.Event
    ) -> None:
        self._make_link = make_link
        self._state = state
        self._stop = stop
        self._target: tuple[str, int] = ("", 0)
        #: Set to retire the current set of additional tunnels.
        self._retire: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    def want(self, relay: str, workers: int) -> None:
        """The main link reached ``relay``, which has ``workers`` worker processes."""
        target = (relay, max(0, workers - 1))
        if target == self._target or self._stop.is_set():
            return
        self._target = target
        self._retire_current()
        if target[1] == 0:
            return
        if self._watch is None:
            self._watch = asyncio.create_task(self._retire_on_stop())
        retire = self._retire = asyncio.Event()
        log.info("spread.started", relay=relay, additional=target[1])
        for _ in range(target[1]):
            lane = AgentState(
                relay=relay, member_id=self._state.member_id, gateway_id=self._state.gateway_id
            )
            task = asyncio.create_task(self._run(lane, relay, retire))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, lane: AgentState, relay: str, retire: asyncio.Event) -> None:
        self._state.additional.append(lane)
        try:
            await self._make_link(lane).run_additional(relay, retire)
        except Exception as exc:  # one tunnel's failure must not take the agent down
            log.error("spread.failed", relay=relay, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._state.additional.remove(lane)

    def _retire_current(self) -> None:
        if self._retire is not None:
            self._retire.set()
            self._retire = None

    async def _retire_on_stop(self) -> None:
        """The agent stops: the additional tunnels drain alongside the main link."""
        await self._stop.wait()
        self._retire_current()

    async def close(self) -> None:
        """Retire every additional tunnel and wait for them to drain and close."""
        self._retire_current()
        self._target = ("", 0)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
