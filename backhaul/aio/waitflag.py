"""A flag a task can wait for: :class:`asyncio.Event`'s interface, in compiled code.

asyncio.Event is Python code, and the relay touches several per request: the request cycle's
``message_event`` (made, then set once the request is in and once the answer is out) and the
tunnel connection's ``writable`` (checked before every message). This class, compiled
(setup.py), does the same with no interpreted frame: ``set``, ``clear`` and ``is_set`` are
attribute work, and only a task that finds the flag down waits, on a future of its own.
"""

from __future__ import annotations

import asyncio
from typing import Literal


class WaitFlag:
    """``set()``, ``clear()``, ``is_set()`` and ``await wait()``, as asyncio.Event has them."""

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        """Raise the flag and wake every task waiting for it."""
        if self._value:
            return
        self._value = True
        waiters = self._waiters
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> Literal[True]:
        """Return at once when the flag is up, else once :meth:`set` raises it."""
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)
