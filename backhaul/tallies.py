"""Per-request metric updates kept in plain numbers, added to Prometheus metrics when read.

``prometheus_client`` takes a lock and runs a few Python frames for every ``inc`` and
``observe``: with three or four of them per small request, 2 % of the relay's event loop and
3 % of the agent's went there (bench/PROFILE.md). A :class:`Tally` or :class:`Timing` does
the same arithmetic on a number of its own, in compiled code (setup.py), and :func:`flush`
adds what it has gathered to the real metric: the relay's ``/metrics`` and the agent's
status socket flush before they render, so a scrape sees every request, as before.

Everything here runs on the event loop's thread, as do the scrapes that flush it.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

_ALL: list[Tally | Timing] = []


class Tally:
    """A Prometheus counter (or one child of a labelled one) counted here until :func:`flush`."""

    __slots__ = ("_counter", "pending")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self.pending = 0.0
        _ALL.append(self)

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self._counter.inc(amount)


class Tallies:
    """The :class:`Tally` of each child of a labelled counter: ``tallies(*values)``."""

    __slots__ = ("_children", "_counter")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._children: dict[tuple[str, ...], Tally] = {}

    def __call__(self, *values: str) -> Tally:
        tally = self._children.get(values)
        if tally is None:
            tally = self._children[values] = Tally(self._counter.labels(*values))
        return tally


class Timing:
    """A Prometheus histogram without labels, its buckets counted here until :func:`flush`.

    An observation lands in the first bucket whose upper bound it does not exceed, as in
    ``Histogram.observe``; the flush adds the counts to the histogram's bucket and sum values.
    """

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum", "pending")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._bounds: list[float] = [float(bound) for bound in histogram._upper_bounds]
        self._counts: list[int] = [0] * len(self._bounds)
        self._sum = 0.0
        self.pending = False
        _ALL.append(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value
        self.pending = True

    def flush(self) -> None:
        if not self.pending:
            return
        counts, total = self._counts, self._sum
        self._counts, self._sum, self.pending = [0] * len(counts), 0.0, False
        buckets = self._histogram._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
        self._histogram._sum.inc(total)


def flush() -> None:
    """Add everything gathered so far to the Prometheus metrics (before rendering them)."""
    for tally in _ALL:
        tally.flush()
