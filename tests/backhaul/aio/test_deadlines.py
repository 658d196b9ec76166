"""backhaul.aio.deadlines: one loop timer for many deadlines."""

from __future__ import annotations

import asyncio

from backhaul.aio.deadlines import CLOCK_SLACK, SharedTimer


async def test_it_moves_only_for_a_nearer_deadline_and_rearms_where_its_owner_says() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    next_deadlines: list[float | None] = []

    def due(now: float) -> float | None:
        fired.append(now)
        return next_deadlines.pop(0) if next_deadlines else None

    timer = SharedTimer(loop, due)
    assert not timer.armed
    start = loop.time()
    timer.ensure(start + 0.2)
    timer.ensure(start + 5)  # later: left where it is
    assert timer.armed and timer.at == start + 0.2
    timer.ensure(start + 0.05)  # nearer: moved
    assert timer.at == start + 0.05
    next_deadlines.append(start + 0.15)  # the owner asks to be woken again
    await asyncio.sleep(0.1)
    assert len(fired) == 1 and fired[0] >= start + 0.05 - CLOCK_SLACK
    assert timer.armed and timer.at == start + 0.15
    await asyncio.sleep(0.1)
    assert len(fired) == 2 and not timer.armed  # nothing more to wait for


async def test_cancel_disarms() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []

    def due(now: float) -> float | None:
        fired.append(now)
        return None

    timer = SharedTimer(loop, due)
    timer.ensure(loop.time() + 0.02)
    timer.cancel()
    await asyncio.sleep(0.05)
    assert not fired and not timer.armed
