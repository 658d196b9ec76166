"""relay.allocator: freed heap memory goes back to the system once tunnel churn is quiet."""

from __future__ import annotations

import asyncio
import platform

import pytest

from relay import allocator


def counting() -> tuple[list[int], allocator.Trimmer]:
    calls: list[int] = []

    def trim() -> int:
        calls.append(1)
        return 1

    return calls, allocator.Trimmer(0.05, trim)


async def test_a_burst_of_pokes_trims_once_after_the_quiet_period() -> None:
    calls, trimmer = counting()
    trimmer.start()
    for _ in range(10):  # pokes closer together than the quiet period
        trimmer.poke()
        await asyncio.sleep(0.01)
    assert calls == []
    await asyncio.sleep(0.1)
    assert len(calls) == 1 and trimmer.trims == 1
    await asyncio.sleep(0.2)
    assert len(calls) == 1  # nothing changed since: no more trims
    trimmer.poke()
    await asyncio.sleep(0.2)
    assert len(calls) == 2
    await trimmer.stop()


async def test_no_trim_without_churn_and_none_when_turned_off() -> None:
    calls, trimmer = counting()
    trimmer.start()
    await asyncio.sleep(0.15)
    assert calls == []
    await trimmer.stop()
    off = allocator.Trimmer(0, lambda: 1)
    off.start()
    off.poke()
    assert not off.enabled
    await off.stop()


async def test_a_failing_trim_stops_trimming_and_is_logged() -> None:
    def broken() -> int:
        raise OSError("no heap")

    trimmer = allocator.Trimmer(0.01, broken)
    trimmer.start()
    trimmer.poke()
    await asyncio.sleep(0.1)
    assert trimmer.trims == 0
    await trimmer.stop()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_malloc_trim_is_called_for_real() -> None:
    trim = allocator._malloc_trim()
    assert trim is not None
    garbage = [bytearray(4096) for _ in range(10_000)]
    del garbage
    assert trim() in (0, 1)


def test_other_platforms_have_no_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator._malloc_trim() is None
    assert not allocator.Trimmer(2).enabled
