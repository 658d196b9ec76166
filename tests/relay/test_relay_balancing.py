"""Load-balancing policies and thresholds, on plain candidate values."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from relay.balancing import POLICIES, RoundRobin, Thresholds, choose


@dataclass(frozen=True)
class Member:
    member_id: str
    inflight: int = 0
    priority: int = 0
    cpu: float | None = None
    memory: float | None = None


A = Member("a", inflight=5, priority=0, cpu=10, memory=20)
B = Member("b", inflight=1, priority=1, cpu=95, memory=30)
C = Member("c", inflight=3, priority=2, cpu=20, memory=90)


def pick(members: list[Member], policy: str, thresholds: Thresholds = Thresholds()) -> str:
    chosen = choose(members, policy, thresholds, "gw", RoundRobin())
    assert chosen is not None
    return chosen.member_id


def test_no_candidates_is_none() -> None:
    for policy in POLICIES:
        assert choose([], policy, Thresholds(), "gw", RoundRobin()) is None


def test_least_inflight_is_the_default_behaviour() -> None:
    assert pick([A, B, C], "least-inflight") == "b"
    assert pick([A, B, C], "anything-unknown") == "b"


def test_primary_failover_takes_the_lowest_priority_online() -> None:
    assert pick([C, B, A], "primary-failover") == "a"
    assert pick([C, B], "primary-failover") == "b"


def test_round_robin_visits_every_member_in_turn() -> None:
    rotation = RoundRobin()
    seen = [choose([A, B, C], "round-robin", Thresholds(), "gw", rotation) for _ in range(6)]
    assert [m.member_id for m in seen if m] == ["a", "b", "c", "a", "b", "c"]
    # Counters are per gateway.
    other = choose([A, B, C], "round-robin", Thresholds(), "gw2", rotation)
    assert other is not None and other.member_id == "a"


def test_random_spreads_over_all_members() -> None:
    rng = random.Random(7)
    counts = Counter(
        choose([A, B, C], "random", Thresholds(), "gw", RoundRobin(), rng).member_id  # type: ignore[union-attr]
        for _ in range(600)
    )
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 150


@pytest.mark.parametrize("policy", POLICIES)
def test_members_over_a_threshold_are_skipped_while_another_is_under(policy: str) -> None:
    limits = Thresholds(cpu=80, memory=80)
    assert pick([A, B, C], policy, limits) == "a"  # b is over CPU, c over memory


def test_when_every_member_is_over_all_still_serve() -> None:
    limits = Thresholds(cpu=5, memory=5)
    assert pick([A, B, C], "least-inflight", limits) == "b"


def test_unknown_load_never_counts_as_over() -> None:
    quiet = Member("q", inflight=9)
    assert not Thresholds(cpu=1, memory=1).over(quiet)
