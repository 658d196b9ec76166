"""The relay's own outbound connections (relay/egress.py) connect only to addresses vetted for
that connection: a name that answers a public address to the check and a private one to the
connection (DNS rebinding) never reaches the private one."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpcore
import httpx
import pytest

from backhaul import sampleapi
from relay import egress
from tests.relay.online_helpers import online_config
from tests.relay.relay_helpers import assert_problem, start
from tests.relay.test_relay_policies import policies_connection

PUBLIC = "93.184.215.14"  # a global address; never connected to here
NAME = "rebind.example"


class Resolver:
    """``socket.getaddrinfo`` for NAME: each lookup takes the next answer (the last repeats)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host  # anyio passes IDNA bytes
        if name != NAME:
            return list(socket.getaddrinfo_real(host, port, *args, **kwargs))  # type: ignore[attr-defined]
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))
            for address in answer
        ]


@pytest.fixture
def resolve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Resolver]]:
    def install(*answers: list[str]) -> Resolver:
        resolver = Resolver(*answers)
        monkeypatch.setattr(socket, "getaddrinfo_real", socket.getaddrinfo, raising=False)
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        return resolver

    yield install


@pytest.fixture
def api() -> Iterator[sampleapi.RunningServer]:
    with sampleapi.start_in_thread() as server:
        yield server


@pytest.fixture
async def counting_api() -> AsyncIterator[SimpleNamespace]:
    """A loopback HTTP server that counts the connections it gets and answers 200."""
    seen = SimpleNamespace(connections=0, port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nprivate")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    seen.port = server.sockets[0].getsockname()[1]
    async with server:
        yield seen


class Recording(httpcore.AsyncNetworkBackend):
    """An inner backend that records where it is asked to connect and refuses non-loopback."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, **kwargs: Any
    ) -> httpcore.AsyncNetworkStream:
        self.hosts.append(host)
        if host != "127.0.0.1":
            raise httpcore.ConnectError(f"{host} is not reachable from this test")
        return await self.real.connect_tcp(host, port, timeout=timeout, **kwargs)


async def test_the_backend_connects_to_the_address_it_vetted(resolve: Any) -> None:
    resolver = resolve([PUBLIC])
    inner = Recording()
    with pytest.raises(httpcore.ConnectError):
        await egress.VettedBackend(inner).connect_tcp(NAME, 443)
    assert inner.hosts == [PUBLIC]  # the vetted address, not the name: no second lookup
    assert resolver.lookups == 1


async def test_a_private_answer_among_public_ones_refuses_the_name(resolve: Any) -> None:
    resolve([PUBLIC, "169.254.169.254"])
    inner = Recording()
    with pytest.raises(egress.EgressDenied, match=re.escape("169.254.169.254")):
        await egress.VettedBackend(inner).connect_tcp(NAME, 80)
    assert inner.hosts == []


async def test_the_next_answer_is_tried_when_one_refuses(resolve: Any) -> None:
    resolve([PUBLIC, "93.184.215.15"])
    inner = Recording()
    with pytest.raises(httpcore.ConnectError):
        await egress.VettedBackend(inner).connect_tcp(NAME, 80)
    assert inner.hosts == [PUBLIC, "93.184.215.15"]


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(egress.EgressDenied, match="cannot resolve"):
        await egress.VettedBackend(Recording()).connect_tcp("no-such-host.invalid", 80)


async def test_the_client_refuses_a_rebinding_name(
    tmp_path: Path, resolve: Any, counting_api: SimpleNamespace
) -> None:
    resolve([PUBLIC], ["127.0.0.1"])
    config = online_config(tmp_path, online_allow_private_networks=False)
    state = SimpleNamespace()
    client = egress.client(state, config)
    try:
        url = f"http://{NAME}:{counting_api.port}/x"
        await egress.check(url, config)  # the first lookup: public
        with pytest.raises(egress.EgressDenied, match="private network"):
            await client.get(url)  # the connection's own lookup: loopback
    finally:
        await egress.close(state)
    assert counting_api.connections == 0


async def test_the_client_reaches_private_addresses_when_allowed(
    tmp_path: Path, resolve: Any, counting_api: SimpleNamespace
) -> None:
    resolve(["127.0.0.1"])
    config = online_config(tmp_path, online_allow_private_networks=True)
    state = SimpleNamespace()
    try:
        r = await egress.client(state, config).get(f"http://{NAME}:{counting_api.port}/x")
    finally:
        await egress.close(state)
    assert r.status_code == 200 and r.text == "private"
    assert counting_api.connections == 1


async def test_an_online_connector_on_a_rebinding_name_never_reaches_the_private_address(
    tmp_path: Path, resolve: Any, counting_api: SimpleNamespace, api: Any
) -> None:
    resolver = resolve([PUBLIC], ["127.0.0.1"])
    async for relay in start(online_config(tmp_path / "d", online_allow_private_networks=False)):
        _, cxn = await policies_connection(relay, api, host=f"{NAME}:{counting_api.port}")
        r = await relay.client.get(
            f"/v1/connections/{cxn['id']}/invoke/echo/plain", headers=relay.auth(relay.admin_token)
        )
        problem = assert_problem(r, 502)
        assert problem["title"] == "Target not allowed"
        assert "127.0.0.1" in problem["detail"] and "private network" in problem["detail"]
    assert resolver.lookups == 2  # the check's, then the connection's own
    assert counting_api.connections == 0


def test_the_swapped_pool_keeps_httpx_settings(tmp_path: Path) -> None:
    """The client swaps httpx's private pool for one with the vetting backend: if a new
    httpx stops using ``_pool``, this fails rather than the check silently going away."""
    config = online_config(tmp_path, online_allow_private_networks=False)
    client = egress.client(SimpleNamespace(), config)
    transport = client._transport
    assert isinstance(transport, httpx.AsyncHTTPTransport)
    pool = transport._pool
    assert isinstance(pool, httpcore.AsyncConnectionPool)
    assert isinstance(pool._network_backend, egress.VettedBackend)
    assert pool._max_connections == 200 and pool._max_keepalive_connections == 50
