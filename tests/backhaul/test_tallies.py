"""Metric updates counted on the side and added to the Prometheus metrics on flush."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from backhaul import tallies
from backhaul.tallies import Tallies, Tally, Timing


def value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    found = registry.get_sample_value(name, labels or {})
    return 0.0 if found is None else found


def test_a_tally_reaches_its_counter_on_flush_and_only_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_bytes", "bytes", ["direction"], registry=registry)
    up = Tally(counter.labels("up"))
    up.inc(1024)
    up.inc()
    assert value(registry, "t_bytes_total", {"direction": "up"}) == 0
    tallies.flush()
    assert value(registry, "t_bytes_total", {"direction": "up"}) == 1025
    tallies.flush()  # nothing new: nothing added twice
    assert value(registry, "t_bytes_total", {"direction": "up"}) == 1025


def test_tallies_hand_out_one_tally_per_label_values() -> None:
    registry = CollectorRegistry()
    requests = Tallies(Counter("t_requests", "requests", ["code"], registry=registry))
    assert requests("200") is requests("200")
    requests("200").inc()
    requests("404").inc()
    requests("200").inc()
    tallies.flush()
    assert value(registry, "t_requests_total", {"code": "200"}) == 2
    assert value(registry, "t_requests_total", {"code": "404"}) == 1


def test_a_timing_fills_the_buckets_histogram_observe_would() -> None:
    """Bounds included (a value equal to a bound counts in that bucket), past the last
    finite bound, and the sum: the exposition equals one of a histogram observed directly."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.005, 0.01, 0.1, 1.0)
    timing = Timing(Histogram("t_seconds", "s", buckets=buckets, registry=ours))
    direct = Histogram("t_seconds", "s", buckets=buckets, registry=theirs)
    rng = random.Random(7)
    values = [*buckets, 0.0, 2.5, *(rng.uniform(0, 1.2) for _ in range(500))]
    for observed in values:
        timing.observe(observed)
        direct.observe(observed)
    tallies.flush()
    assert samples(ours) == samples(theirs)
    timing.observe(0.002)
    direct.observe(0.002)
    tallies.flush()
    assert samples(ours) == samples(theirs)


def samples(registry: CollectorRegistry) -> dict[str, object]:
    """Bucket counts and the count exactly, the sum to rounding (added up in another
    order), the creation time left out."""
    found: dict[str, object] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            key = sample.name + str(sorted(sample.labels.items()))
            exact = not sample.name.endswith("_sum")
            found[key] = sample.value if exact else pytest.approx(sample.value)
    return found
