"""The garbage collector's settings for a long-running gateway process.

CPython frees nearly everything a request allocates by reference counting; the cyclic
collector only has to find the rare cycle. With its defaults it still runs a young
collection every 700 net allocations — every request or two on the data path — and every
tenth or hundredth of those also walks the older generations, which after startup hold the
whole application: modules, routes, schemas, the SQLAlchemy metadata, tens of thousands of
objects that will live as long as the process. :func:`settle` moves those out of the
collector's sight (:func:`gc.freeze`) and makes young collections rarer.
"""

from __future__ import annotations

import gc

#: Net allocations between young collections (CPython's default is 700). Cyclic garbage
#: waits at most this many allocations — a few MiB at worst — before it is found.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once startup is done: collect, freeze the survivors, collect young objects less
    often. Safe to call again (each call freezes what has been built since)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, young), middle, old)
