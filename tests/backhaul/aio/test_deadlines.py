"""backhaul.aio.deadlines: one loop timer for many deadlines."""

from __future__ import annotations

import asyncio
import weakref

from backhaul.aio.deadlines import CLOCK_SLACK, SharedTimer
from tests.cycles import collector_off


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


class _Owner:
    """Holds its timer, and is held by it through ``due``: a reference cycle."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fired = 0
        self.timer = SharedTimer(loop, self.due)

    def due(self, now: float) -> float | None:
        self.fired += 1
        return None


async def test_close_lets_go_of_the_owner_and_settles_nothing_after() -> None:
    loop = asyncio.get_running_loop()
    owner = _Owner(loop)
    owner.timer.ensure(loop.time() + 0.01)
    owner.timer.close()
    assert not owner.timer.armed
    timer = owner.timer
    timer.ensure(loop.time() + 0.01)  # still takes deadlines
    await asyncio.sleep(0.05)
    assert owner.fired == 0 and not timer.armed

    with collector_off():  # freed by reference counting alone, or not at all
        owner = _Owner(loop)
        owner.timer.close()
        gone = weakref.ref(owner)
        del owner
        assert gone() is None
