"""A first-come, first-served lock for a tunnel's writes, cheap when nobody else holds it.

:class:`asyncio.Lock` is Python code: an uncontended ``async with`` runs five of its
functions, and a tunnel takes its write lock on every flush. Here, compiled (setup.py), the
uncontended case is a flag. A task that finds the lock held waits on a future of its own, and
a release hands the lock straight to the first task still waiting: no barging, so a stream of
new writers cannot starve one that waits.
"""

from __future__ import annotations

import asyncio
from collections import deque


class WriteLock:
    """``async with lock:`` or :meth:`acquire` and :meth:`release`, as with asyncio.Lock."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        if not self._held:
            self._held = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over, then cancelled before it ran: hand it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        """Hand the lock to the first task still waiting, or leave it free."""
        if not self._held:
            raise RuntimeError("WriteLock is not acquired")
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # still held: it is that task's now
                return
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
