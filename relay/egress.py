"""The relay's own outbound HTTP: online connectors' APIs and OAuth token endpoints.

Both destinations come from connector definitions that any user may import, so a relay in a
cloud network could be pointed at its own metadata service or at addresses inside its
network. Unless ``online_allow_private_networks`` is set, a destination whose name resolves to
a loopback, private, link-local, multicast or reserved address is refused before anything is
sent. (The check resolves the name itself; a name that changes its answer between the check
and the connection is a residual risk that a network egress policy closes.)

One pooled :class:`httpx.AsyncClient` serves every call. Like the agent's, it never follows
redirects (the caller sees them), never keeps cookies (a shared jar would carry one
connection's session into another) and ignores proxy and netrc settings from the environment.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

from relay import RelayError
from relay.config import RelayConfig


class EgressDenied(RelayError):
    """The relay will not call this destination (names the host and why)."""


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def check(url: str, config: RelayConfig) -> None:
    """Refuse a destination inside private networks unless the relay allows them."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise EgressDenied(f"{url!r} is not an absolute http(s) URL")
    if config.online_allow_private_networks:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise EgressDenied(f"cannot resolve {host}: {exc.strerror or exc}") from None
    for info in infos:
        address = str(info[4][0])
        if _blocked(address):
            raise EgressDenied(
                f"{host} resolves to {address}, inside a private network; the relay calls "
                "only public addresses (online_allow_private_networks)"
            )


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def client(state: Any, config: RelayConfig) -> httpx.AsyncClient:
    """The app's pooled client, made on first use (``state`` is ``app.state``)."""
    existing: httpx.AsyncClient | None = getattr(state, "egress", None)
    if existing is None or existing.is_closed:
        existing = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            cookies=_no_cookies(),
            timeout=httpx.Timeout(
                connect=10.0,
                read=float(config.invoke_timeout_max_seconds),
                write=float(config.invoke_timeout_max_seconds),
                pool=10.0,
            ),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        state.egress = existing
    return existing


async def close(state: Any) -> None:
    existing: httpx.AsyncClient | None = getattr(state, "egress", None)
    if existing is not None:
        await existing.aclose()
