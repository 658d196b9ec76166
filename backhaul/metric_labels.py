"""The children of a labelled Prometheus metric, each looked up once.

``metric.labels(...)`` takes a lock and a dictionary lookup on every call; on the data path
(a counter per request, per status or outcome) that is a measurable part of a small
request's bookkeeping. :class:`Children` keeps each child it has handed out.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """``children(*values)`` is ``metric.labels(*values)``, from a cache after the first call."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child
