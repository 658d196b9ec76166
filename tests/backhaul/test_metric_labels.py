"""A labelled metric's children are looked up once and are the metric's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from backhaul.metric_labels import Children


def test_children_are_the_metric_s_own_and_looked_up_once() -> None:
    counter = Counter("calls", "calls", ["code"], registry=CollectorRegistry())
    children = Children(counter)
    first = children("200")
    assert children("200") is first
    assert first is counter.labels("200")
    children("200").inc()
    children("404").inc(2)
    assert counter.labels("200")._value.get() == 1
    assert counter.labels("404")._value.get() == 2
