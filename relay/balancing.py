"""Which member of a gateway serves the next request: the load-balancing policies.

Pure functions over candidate views, so each policy is unit-tested without tunnels:

- ``least-inflight`` (default): the member with the fewest streams in flight — it adapts to
  slow members by itself, which round-robin does not.
- ``round-robin``: members in a fixed order, one after the other.
- ``random``: uniform choice.
- ``primary-failover``: the member with the lowest priority (enrollment order) while it is
  online; the next one only when it is not.

Before the policy runs, members over the gateway's CPU or memory threshold are dropped — as
long as at least one member is under them (a cluster where every member is busy still serves).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

POLICIES = ("least-inflight", "round-robin", "random", "primary-failover")
DEFAULT_POLICY = "least-inflight"


class Candidate(Protocol):
    @property
    def member_id(self) -> str: ...

    @property
    def inflight(self) -> int: ...

    @property
    def priority(self) -> int: ...

    @property
    def cpu(self) -> float | None: ...

    @property
    def memory(self) -> float | None: ...


C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True, init=False)
class Thresholds:
    cpu: float | None = None
    memory: float | None = None

    def __init__(self, cpu: float | None = None, memory: float | None = None) -> None:
        object.__setattr__(self, "cpu", cpu)
        object.__setattr__(self, "memory", memory)

    def over(self, candidate: Candidate) -> bool:
        cpu, memory = candidate.cpu, candidate.memory
        return (self.cpu is not None and cpu is not None and cpu > self.cpu) or (
            self.memory is not None and memory is not None and memory > self.memory
        )


class RoundRobin:
    """Per-gateway counters for the round-robin policy."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def next(self, gateway_id: str) -> int:
        return next(self._counters.setdefault(gateway_id, itertools.count()))


def choose(
    candidates: Sequence[C],
    policy: str,
    thresholds: Thresholds,
    gateway_id: str,
    rotation: RoundRobin,
    rng: random.Random | None = None,
) -> C | None:
    if not candidates:
        return None
    under = [c for c in candidates if not thresholds.over(c)]
    pool = sorted(under or candidates, key=lambda c: (c.priority, c.member_id))
    if policy == "round-robin":
        return pool[rotation.next(gateway_id) % len(pool)]
    if policy == "random":
        return (rng or random).choice(pool)
    if policy == "primary-failover":
        return pool[0]
    return min(pool, key=lambda c: c.inflight)
