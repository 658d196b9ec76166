"""Background tasks: kept until done, drained (with what they start), cancelled."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from backhaul.aio.background import Background


async def test_a_task_is_kept_until_done_and_returned() -> None:
    background = Background()
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    task = weakref.ref(background.spawn(work(), "work"))
    gc.collect()  # the loop's own reference is weak: only the set keeps it
    assert len(background) == 1
    kept = task()
    assert kept is not None and kept.get_name() == "work"
    release.set()
    assert await kept == 7
    assert len(background) == 0


async def test_drain_waits_for_every_task_and_the_ones_they_start() -> None:
    background = Background()
    done: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        done.append("second")

    async def first() -> None:
        await asyncio.sleep(0.01)
        background.spawn(second())
        done.append("first")

    async def failing() -> None:
        raise RuntimeError("its own to log")

    background.spawn(first())
    background.spawn(failing())
    await background.drain()
    assert done == ["first", "second"]
    assert len(background) == 0


async def test_cancel_ends_every_task() -> None:
    background = Background()
    cancelled: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    tasks = [background.spawn(forever()) for _ in range(3)]
    await asyncio.sleep(0)
    await background.cancel()
    assert cancelled == [True, True, True]
    assert all(task.cancelled() for task in tasks)
    assert len(background) == 0


async def test_cancel_waits_for_a_task_that_finishes_its_cleanup() -> None:
    background = Background()
    cleaned = asyncio.Event()

    async def careful() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)
            cleaned.set()

    background.spawn(careful())
    await asyncio.sleep(0)
    await background.cancel()
    assert cleaned.is_set()


def test_spawn_needs_a_running_loop() -> None:
    background = Background()

    async def work() -> None:
        return None

    coro = work()
    with pytest.raises(RuntimeError):
        background.spawn(coro)
    coro.close()
