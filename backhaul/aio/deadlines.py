"""One loop timer for deadlines that come and go faster than a timer is worth making.

With uvloop, making and cancelling a timer costs about as much as the rest of a small
request's waiting. Where every request has a deadline that is seldom reached (an upstream
connection's waits, a tunnel's streams waiting for their heads), one :class:`SharedTimer`
serves them all: it stays armed while deadlines come and go, moves only for a deadline nearer
than its own, and when it fires asks its owner what is due and when to fire next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["CLOCK_SLACK", "SharedTimer"]

#: A timer may fire this much before its time (the loop's clock resolution): it counts as due.
CLOCK_SLACK = 0.001


class SharedTimer:
    """A loop timer armed at the nearest deadline it has been told of.

    ``due(now)`` runs when it fires, with ``now`` the loop's time plus :data:`CLOCK_SLACK`:
    it settles whatever is due by then and returns the next deadline to fire at, or None.
    """

    __slots__ = ("_at", "_due", "_handle", "_loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, due: Callable[[float], float | None]
    ) -> None:
        self._loop = loop
        self._due = due
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    @property
    def armed(self) -> bool:
        return self._handle is not None

    @property
    def at(self) -> float:
        """The loop time it fires at (meaningful while :attr:`armed`)."""
        return self._at

    def ensure(self, deadline: float) -> None:
        """Fire no later than ``deadline`` (loop time)."""
        if self._handle is None or self._at > deadline:
            if self._handle is not None:
                self._handle.cancel()
            self._arm(deadline)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Cancel for good, and let go of ``due``.

        An owner that holds its timer and is held by ``due`` (one of its bound methods) is a
        reference cycle: without this, the owner and all it holds wait for one of the cyclic
        collector's full collections, which a process moving bulk data seldom makes. After
        it the timer still takes deadlines, and settles nothing when it fires.
        """
        self.cancel()
        self._due = _settled

    def _arm(self, deadline: float) -> None:
        self._handle = self._loop.call_at(deadline, self._fire)
        self._at = deadline

    def _fire(self) -> None:
        self._handle = None
        following = self._due(self._loop.time() + CLOCK_SLACK)
        if following is not None:
            self._arm(following)


def _settled(now: float) -> float | None:
    """A closed timer's ``due``: nothing is ever due."""
    return None
