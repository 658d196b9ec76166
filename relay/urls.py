"""Base URLs of the APIs behind connectors.

A base URL is normalized to end with "/" so that joining an invoke path to it can never climb
to a sibling path by accident, and URLs with user info, a query or a fragment are refused
because credentials belong in a connection, never in the connector.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def normalize_base_url(value: str) -> str:
    """Absolute http(s) URL, no user info/query/fragment, path ending with '/'."""
    if any(c.isspace() for c in value):
        raise ValueError("must not contain whitespace")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query or fragment")
    parts = urlsplit(value)
    if parts.scheme.lower() not in {"http", "https"}:
        raise ValueError("must be an absolute http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry user info; put credentials in a connection")
    try:
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, "", ""))
