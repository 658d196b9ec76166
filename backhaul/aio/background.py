"""Tasks nobody awaits where they start: kept until done, and waited for or cancelled at the end.

The event loop holds only a weak reference to a task, so a task started and not kept may be
collected half-way; and a process that stops must first finish, or cancel, what it started in
the background (an audit batch, a token's last use, a publish to the other instances) before
it closes what those tasks write to. :class:`Background` is that set of tasks, one per owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Background"]

_T = TypeVar("_T")


class Background:
    """The background tasks of one owner."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        """Run ``work`` as a task of the running loop, kept here until it is done."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every task is done, those the waited-for ones start included; their
        failures are theirs to log, not raised here."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait for each to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
