"""The invoke path's read cache: entries valid for one store generation, stamped with the
generation their load started in, and one load at a time per key."""

from __future__ import annotations

import asyncio

import pytest

from relay.cache import Generation, ReadCache


class Loads:
    """A load that counts its calls and finishes when told."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.failing: BaseException | None = None

    async def __call__(self) -> str:
        self.calls += 1
        await self.release.wait()
        if self.failing is not None:
            failing, self.failing = self.failing, None
            raise failing
        return f"value {self.calls}"


async def test_callers_missing_the_same_key_share_one_load() -> None:
    cache = ReadCache(Generation())
    load = Loads()
    callers = [asyncio.create_task(cache.load("k", load)) for _ in range(50)]
    await asyncio.sleep(0.01)
    load.release.set()
    assert set(await asyncio.gather(*callers)) == {"value 1"}
    assert load.calls == 1
    assert cache.get("k") == "value 1"


async def test_a_write_during_the_load_leaves_its_value_stale() -> None:
    """What the load read may predate the write (a revocation): it must not be cached as
    valid for the generation the write started."""
    generation = Generation()
    cache = ReadCache(generation)
    load = Loads()
    first = asyncio.create_task(cache.load("k", load))
    await asyncio.sleep(0.01)
    generation.bump()
    load.release.set()
    assert await first == "value 1"  # the caller that asked before the write gets it
    assert cache.get("k") is None  # the next one loads again
    assert await cache.load("k", load) == "value 2"
    assert cache.get("k") == "value 2"


async def test_a_caller_after_a_write_does_not_wait_for_an_older_load() -> None:
    generation = Generation()
    cache = ReadCache(generation)
    old, new = Loads(), Loads()
    first = asyncio.create_task(cache.load("k", old))
    await asyncio.sleep(0.01)
    generation.bump()
    new.release.set()
    assert await cache.load("k", new) == "value 1"
    assert new.calls == 1
    old.release.set()
    await first


@pytest.mark.parametrize("failure", [RuntimeError("database gone"), asyncio.CancelledError()])
async def test_when_the_shared_load_fails_the_others_load_for_themselves(
    failure: BaseException,
) -> None:
    cache = ReadCache(Generation())
    load = Loads()
    load.failing = failure
    leader = asyncio.create_task(cache.load("k", load))
    await asyncio.sleep(0.01)
    waiters = [asyncio.create_task(cache.load("k", load)) for _ in range(3)]
    await asyncio.sleep(0.01)
    load.release.set()
    with pytest.raises(type(failure)):
        await leader
    assert sorted(await asyncio.gather(*waiters)) == ["value 2", "value 3", "value 4"]


async def test_a_waiter_cancelled_does_not_cancel_the_load_the_others_wait_for() -> None:
    cache = ReadCache(Generation())
    load = Loads()
    leader = asyncio.create_task(cache.load("k", load))
    await asyncio.sleep(0.01)
    quitter = asyncio.create_task(cache.load("k", load))
    stayer = asyncio.create_task(cache.load("k", load))
    await asyncio.sleep(0.01)
    quitter.cancel()
    load.release.set()
    assert await leader == "value 1" and await stayer == "value 1"
    assert quitter.cancelled()
    assert load.calls == 1
