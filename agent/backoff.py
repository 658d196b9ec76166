"""Reconnect policy as pure parts, like ``websockets``' ``process_exception`` and ``backoff``.

Delays use "full jitter" (AWS Architecture Blog, "Exponential Backoff and Jitter"): a random
delay between 0 and the exponential cap, so a thousand agents that lost the same relay don't
come back in lock-step and knock it over again.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from backhaul.wire import CLOSE_CODE_BASE, ErrorCode


def backoff(initial: float, maximum: float, rng: random.Random | None = None) -> Iterator[float]:
    """Endless delays: uniform in [0, min(maximum, initial * 2**attempt)]."""
    rand = rng or random.Random()
    attempt = 0
    while True:
        cap = min(maximum, initial * (2**attempt))
        yield rand.uniform(0, cap)
        if cap < maximum:
            attempt += 1


#: Close codes that mean "this member may not connect": retrying cannot help.
FATAL_CLOSE_CODES = frozenset({CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED})


def should_retry(close_code: int | None) -> bool:
    """Whether to reconnect after the relay closed with ``close_code`` (None: network error)."""
    return close_code not in FATAL_CLOSE_CODES
