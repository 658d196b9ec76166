"""Header filtering shared by the invoke path and inter-instance forwarding."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.datastructures import MutableHeaders

from backhaul.headers import HOP_BY_HOP
from relay.locations import LOCATION_FIELDS

__all__ = ["HOP_BY_HOP", "raw_response_headers", "response_headers"]


def response_headers(
    pairs: Iterable[tuple[str, str]],
    drop: frozenset[str] = HOP_BY_HOP,
    relocate: Callable[[str], str] | None = None,
) -> MutableHeaders:
    """Response headers minus ``drop``, keeping repeated fields (Set-Cookie) a dict would fold."""
    return MutableHeaders(raw=raw_response_headers(pairs, drop, relocate))


def raw_response_headers(
    pairs: Iterable[tuple[str, str]],
    drop: frozenset[str] = HOP_BY_HOP,
    relocate: Callable[[str], str] | None = None,
) -> list[tuple[bytes, bytes]]:
    """The same filter, as the ASGI ``http.response.start`` header list (lower-case names).

    ``relocate`` maps the value of a Location or Content-Location field
    (:func:`relay.locations.public_location`).
    """
    raw = []
    for name, value in pairs:
        lower = name.lower()
        if lower not in drop:
            if relocate is not None and lower in LOCATION_FIELDS:
                value = relocate(value)
            raw.append((lower.encode("latin-1"), value.encode("latin-1")))
    return raw
