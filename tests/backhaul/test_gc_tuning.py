"""backhaul.gc_tuning: startup objects frozen, young collections rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from backhaul import gc_tuning


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_settle_freezes_startup_and_raises_the_young_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    gc_tuning.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, 10, 10)


@pytest.mark.usefixtures("restore_gc")
def test_settle_never_lowers_a_higher_threshold() -> None:
    gc.set_threshold(gc_tuning.YOUNG_THRESHOLD * 2, 10, 10)
    gc_tuning.settle()
    assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD * 2


@pytest.mark.usefixtures("restore_gc")
def test_cycles_are_still_collected() -> None:
    gc_tuning.settle()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2
