"""Applying a connection's opened credentials to an upstream request.

The credentials arrive sealed and are opened only on the agent; this module is the one place
that turns them into an ``Authorization`` header (RFC 7617 Basic, UTF-8, sent pre-emptively),
an API-key header or an API-key query parameter. Whatever the caller sent under the same name is
removed first, so a caller can neither replace the connection's key nor smuggle a second copy
of it ahead of ours.

Credential documents (the JSON the relay sealed)::

    none     {}
    basic    {"username": "...", "password": "..."}
    api_key  {"api_key": "..."}
    windows  {"username": "...", "password": "..."} or {"identity": "service"}
             (checked and used by agent.winpool)

A missing or non-string field raises :class:`~agent.errors.CredentialsInvalid`; messages name
the field, never its value.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import httpx

from agent.errors import CredentialsInvalid
from agent.head import AuthSpec, valid_field_value

__all__ = ["AppliedAuth", "apply_credentials"]


@dataclass(frozen=True, init=False)
class AppliedAuth:
    """The request pieces after credentials are applied."""

    query: str
    headers: list[tuple[str, str]]
    auth: httpx.Auth | None

    def __init__(self, query: str, headers: list[tuple[str, str]], auth: httpx.Auth | None) -> None:
        # Written out: mypyc compiles this one (setup.py), not the one dataclass generates.
        object.__setattr__(self, "query", query)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "auth", auth)


def _field(credentials: Mapping[str, Any], name: str, scheme: str, connection_id: str) -> str:
    value = credentials.get(name)
    if not isinstance(value, str):
        state = "is missing" if value is None else "is not a string"
        raise CredentialsInvalid(
            f"credentials of connection {connection_id} are unusable for {scheme} auth: "
            f"field {name!r} {state}"
        )
    return value


def _without_param(query: str, name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != name]


def apply_credentials(
    spec: AuthSpec,
    credentials: Mapping[str, Any],
    query: str,
    headers: list[tuple[str, str]],
    connection_id: str,
) -> AppliedAuth:
    """Return the query, headers and httpx auth to send for ``spec`` with ``credentials``."""
    if spec.type == "none":
        return AppliedAuth(query, headers, None)
    if spec.type == "windows":
        # The handshake is agent.winpool's; here only the caller's own header goes.
        rest = [(k, v) for k, v in headers if k.lower() != "authorization"]
        return AppliedAuth(query, rest, None)
    if spec.type == "basic":
        username = _field(credentials, "username", "basic", connection_id)
        password = _field(credentials, "password", "basic", connection_id)
        if ":" in username:
            # RFC 7617 §2: the user-id cannot contain a colon.
            raise CredentialsInvalid(
                f"credentials of connection {connection_id}: basic username contains ':'"
            )
        rest = [(k, v) for k, v in headers if k.lower() != "authorization"]
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        return AppliedAuth(query, [*rest, ("authorization", f"Basic {token}")], None)
    key = _field(credentials, "api_key", "api_key", connection_id)
    name = spec.api_key_name or ""
    if spec.api_key_in == "header":
        if not valid_field_value(key) or "\t" in key:
            raise CredentialsInvalid(
                f"credentials of connection {connection_id}: api_key is not a valid header value"
            )
        rest = [(k, v) for k, v in headers if k.lower() != name.lower()]
        return AppliedAuth(query, [*rest, (name, key)], None)
    base = query
    if any(k == name for k, _ in parse_qsl(query, keep_blank_values=True)):
        # Re-encode only when the caller sent the key's name; otherwise keep its query verbatim.
        base = urlencode(_without_param(query, name), quote_via=quote, safe="")
    param = f"{quote(name, safe='')}={quote(key, safe='')}"
    return AppliedAuth(f"{base}&{param}" if base else param, headers, None)
