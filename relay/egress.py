"""The relay's own outbound HTTP: online connectors' APIs and OAuth token endpoints.

Both destinations come from connector definitions that any user may import, so a relay in a
cloud network could be pointed at its own metadata service or at addresses inside its
network. Unless ``online_allow_private_networks`` is set, a destination whose name resolves to
a loopback, private, link-local, multicast or reserved address is refused before anything is
sent: :func:`check` says so before a request is built, and the client's connections go through
:class:`VettedBackend`, which resolves the name once, vets every answer and connects to those
answers. There is no second lookup for a name to answer differently (DNS rebinding: a public
address to the check, the metadata service to the connection). TLS still verifies the
certificate against the name.

One pooled :class:`httpx.AsyncClient` serves every call. Like the agent's, it never follows
redirects (the caller sees them), never keeps cookies (a shared jar would carry one
connection's session into another) and ignores proxy and netrc settings from the environment.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
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
    await public_addresses(host, parts.port or (443 if parts.scheme == "https" else 80))


async def public_addresses(host: str, port: int) -> list[str]:
    """``host``'s addresses, in the resolver's order; EgressDenied if any is not public."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EgressDenied(f"cannot resolve {host}: {exc.strerror or exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if _blocked(address):
            raise EgressDenied(
                f"{host} resolves to {address}, inside a private network; the relay calls "
                "only public addresses (online_allow_private_networks)"
            )
    if not addresses:
        raise EgressDenied(f"cannot resolve {host}: no address")
    return addresses


class VettedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses :func:`public_addresses`
    vetted for this very connection: one lookup, every answer checked, then the first answer
    that accepts the connection (httpcore still starts TLS with the name, so certificates are
    verified against it)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failed: Exception | None = None
        for address in await public_addresses(host, port):
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failed = exc
        assert failed is not None  # public_addresses returns at least one
        raise failed

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressDenied("the relay does not call Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def client(state: Any, config: RelayConfig) -> httpx.AsyncClient:
    """The app's pooled client, made on first use (``state`` is ``app.state``)."""
    existing: httpx.AsyncClient | None = getattr(state, "egress", None)
    if existing is None or existing.is_closed:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        transport = httpx.AsyncHTTPTransport(trust_env=False, limits=limits)
        if not config.online_allow_private_networks:
            # httpx takes no network backend, so its pool is swapped for one that has ours,
            # with the same settings (tests/relay/test_relay_egress.py holds this to account).
            transport._pool = httpcore.AsyncConnectionPool(
                ssl_context=httpx.create_ssl_context(trust_env=False),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=VettedBackend(),
            )
        existing = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            cookies=_no_cookies(),
            timeout=httpx.Timeout(
                connect=10.0,
                read=float(config.invoke_timeout_max_seconds),
                write=float(config.invoke_timeout_max_seconds),
                pool=10.0,
            ),
        )
        state.egress = existing
    return existing


async def close(state: Any) -> None:
    existing: httpx.AsyncClient | None = getattr(state, "egress", None)
    if existing is not None:
        await existing.aclose()
