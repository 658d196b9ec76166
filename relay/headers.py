"""Header filtering shared by the invoke path and inter-instance forwarding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from starlette.datastructures import MutableHeaders

from backhaul.headers import HOP_BY_HOP
from relay.locations import LOCATION_FIELDS

__all__ = [
    "HOP_BY_HOP",
    "bearer_token",
    "has_request_header",
    "raw_response_headers",
    "request_header",
    "request_header_items",
    "response_headers",
    "url_length",
]


# The caller's request fields, read from the ASGI scope as Starlette's ``Headers`` reads them
# (names there are lower case, values latin-1), in compiled code: the invoke path asked
# ``request.headers`` half a dozen times per request, each a few interpreted frames and, for
# a field that is absent, a KeyError raised and caught (bench/PROFILE.md, "Fields").


def request_header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The first ``name`` field (lower case) of the request, or None."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def has_request_header(scope: Mapping[str, Any], name: bytes) -> bool:
    """Whether the request has a ``name`` field (lower case)."""
    return any(key == name for key, _ in scope["headers"])


def request_header_items(scope: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every field of the request in order, as text."""
    return [(key.decode("latin-1"), value.decode("latin-1")) for key, value in scope["headers"]]


def url_length(scope: Mapping[str, Any]) -> int:
    """The request target's bytes as ``max_url_bytes`` counts them: raw path and query."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return len(raw) + len(scope.get("query_string", b""))


def bearer_token(scope: Mapping[str, Any]) -> str | None:
    """The token of the first ``Authorization`` field when its scheme is Bearer, as FastAPI's
    security helpers read it; None for another scheme or no field."""
    value = request_header(scope, b"authorization")
    if value is None:
        return None
    # fastapi.security.utils.get_authorization_scheme_param, here in compiled code.
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


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
