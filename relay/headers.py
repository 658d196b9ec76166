"""Header filtering shared by the invoke path and inter-instance forwarding."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import MutableHeaders

from backhaul.headers import HOP_BY_HOP

__all__ = ["HOP_BY_HOP", "response_headers"]


def response_headers(
    pairs: Iterable[tuple[str, str]], drop: frozenset[str] = HOP_BY_HOP
) -> MutableHeaders:
    """Response headers minus ``drop``, keeping repeated fields (Set-Cookie) a dict would fold."""
    headers = MutableHeaders()
    for name, value in pairs:
        if name.lower() not in drop:
            headers.append(name, value)
    return headers
