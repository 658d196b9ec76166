"""HTTP header rules shared by the relay and the agent."""

from __future__ import annotations

#: Connection-specific fields (RFC 9110 §7.6.1): they describe one hop, never forwarded.
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


def strip_hop_by_hop(
    headers: list[tuple[str, str]], extra: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields, those the Connection field names, any ``Proxy-*`` field and
    ``extra`` (names compared in lower case)."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in HOP_BY_HOP
        and low not in named
        and low not in extra
        and not low.startswith("proxy-")
    ]
