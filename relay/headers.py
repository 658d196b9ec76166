"""Header filtering shared by the invoke path and inter-instance forwarding."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import MutableHeaders

from backhaul.headers import HOP_BY_HOP

__all__ = ["HOP_BY_HOP", "raw_response_headers", "response_headers"]


def response_headers(
    pairs: Iterable[tuple[str, str]], drop: frozenset[str] = HOP_BY_HOP
) -> MutableHeaders:
    """Response headers minus ``drop``, keeping repeated fields (Set-Cookie) a dict would fold."""
    return MutableHeaders(raw=raw_response_headers(pairs, drop))


def raw_response_headers(
    pairs: Iterable[tuple[str, str]], drop: frozenset[str] = HOP_BY_HOP
) -> list[tuple[bytes, bytes]]:
    """The same filter, as the ASGI ``http.response.start`` header list (lower-case names)."""
    raw = []
    for name, value in pairs:
        lower = name.lower()
        if lower not in drop:
            raw.append((lower.encode("latin-1"), value.encode("latin-1")))
    return raw
