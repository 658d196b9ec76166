"""backhaul.aio.waitflag: asyncio.Event's interface, compiled."""

from __future__ import annotations

import asyncio

from backhaul.aio.waitflag import WaitFlag


async def test_it_behaves_as_an_event_for_set_clear_and_waiters() -> None:
    flag = WaitFlag()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    flag.clear()  # as with an Event: the waiters woken by set() still return True
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert not flag.is_set()
    flag.set()
    flag.set()
    assert flag.is_set() and await flag.wait() is True
    assert flag._waiters == []


async def test_a_cancelled_wait_leaves_nothing_behind() -> None:
    flag = WaitFlag()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0)
    assert waiter.cancelled() and flag._waiters == []
    flag.set()
