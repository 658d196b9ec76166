"""backhaul.aio.writelock: the tunnel's write lock, first come first served."""

from __future__ import annotations

import asyncio

import pytest

from backhaul.aio.writelock import WriteLock


async def test_a_free_lock_is_taken_at_once_and_a_held_one_is_handed_to_waiters_in_order() -> None:
    lock = WriteLock()
    order: list[int] = []
    await lock.acquire()
    assert lock.locked()

    async def writer(n: int) -> None:
        async with lock:
            order.append(n)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(writer(n)) for n in range(3)]
    await asyncio.sleep(0)
    late = asyncio.create_task(writer(3))
    lock.release()
    await asyncio.gather(*tasks, late)
    assert order == [0, 1, 2, 3]
    assert not lock.locked()


async def test_a_cancelled_waiter_leaves_the_queue_and_a_lock_handed_to_one_moves_on() -> None:
    lock = WriteLock()
    await lock.acquire()
    first = asyncio.create_task(lock.acquire())
    second = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    first.cancel()  # still waiting: it just leaves
    await asyncio.sleep(0)
    assert first.cancelled()
    third = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    lock.release()  # to second, which is cancelled before it runs: on to third
    second.cancel()
    await asyncio.sleep(0)
    assert second.cancelled()
    await asyncio.wait_for(third, 1)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


async def test_releasing_a_free_lock_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        WriteLock().release()
