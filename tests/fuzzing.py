"""How many examples the property tests run: the ``make test`` budget, times
``BACKHAUL_FUZZ_SCALE`` for the nightly run (docs/fuzzing.md)."""

from __future__ import annotations

import os


def scale() -> float:
    try:
        return max(0.01, float(os.environ.get("BACKHAUL_FUZZ_SCALE", "1")))
    except ValueError:
        return 1.0


def budget(examples: int) -> int:
    """``examples`` for ``make test``, scaled for a longer run."""
    return max(1, int(examples * scale()))
