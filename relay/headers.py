"""Header filtering shared by the invoke path and inter-instance forwarding."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import MutableHeaders

#: Hop-by-hop fields (RFC 9110 §7.6.1): they describe one connection, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def response_headers(
    pairs: Iterable[tuple[str, str]], drop: frozenset[str] = HOP_BY_HOP
) -> MutableHeaders:
    """Response headers minus ``drop``, keeping repeated fields (Set-Cookie) a dict would fold."""
    headers = MutableHeaders()
    for name, value in pairs:
        if name.lower() not in drop:
            headers.append(name, value)
    return headers
