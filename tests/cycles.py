"""For tests that hold an object to being freed by reference counting alone: the cyclic
collector switched off, and a wait until no instance of a class is left."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_off() -> Iterator[None]:
    """Collect what is already garbage, then keep the collector off for the block."""
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def alive(*classes: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, classes))


async def wait_until_freed(*classes: type, seconds: float = 2.0) -> None:
    """Wait for the last instance of ``classes`` to go (a connection's close takes a few
    loop turns); fails if some are still alive after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if alive(*classes) == 0:
            return
        await asyncio.sleep(0.01)
    assert alive(*classes) == 0
