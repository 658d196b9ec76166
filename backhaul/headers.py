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


#: ``extra`` → the names dropped with it: ``extra`` is a constant of the caller's module, so
#: the union is built once, not on every request.
_DROPPED: dict[frozenset[str], frozenset[str]] = {}


def _dropped(extra: frozenset[str]) -> frozenset[str]:
    found = _DROPPED.get(extra)
    if found is None:
        if len(_DROPPED) >= 64:
            _DROPPED.clear()
        found = _DROPPED[extra] = HOP_BY_HOP | extra
    return found


def strip_hop_by_hop(
    headers: list[tuple[str, str]], extra: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields, those the Connection field names, any ``Proxy-*`` field and
    ``extra`` (names compared in lower case)."""
    dropped = _dropped(extra)
    named: set[str] | None = None
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        low = name.lower()
        if low in dropped or low.startswith("proxy-"):
            if low == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                named = tokens if named is None else named | tokens
            continue
        kept.append((name, value))
    if named:  # a field the Connection field names may come before it
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept
