"""Proxy selection, NO_PROXY matching and the CONNECT exchange against in-process proxies.

The proxies here are small asyncio servers speaking HTTP/1.1 with h11, so the cases a real
squid can't easily be made to produce are covered: Negotiate (pyspnego's acceptor, NTLM inside
SPNEGO), a proxy that closes the connection after its 407, one that closes in the middle of
an NTLM handshake, and one that answers garbage. tests/ops runs the same code against squid.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h11
import pytest

from agent.config import config_from_dict
from agent.proxy import (
    ProxyAuthFailed,
    ProxyAuthRequired,
    ProxyError,
    ProxyRefused,
    ProxyRoute,
    bypassed,
    connect_options,
    open_tunnel,
    parse_proxy_url,
    select_proxy,
)
from backhaul.errors import ConfigError

BASE = {"relay_url": "https://relay.example.com", "member_id": "m", "gateway_id": "g"}


def cfg(tmp_path: Path, **proxy: Any) -> Any:
    return config_from_dict({**BASE, "proxy": proxy} if proxy else BASE, tmp_path)


# -- configuration and selection


def test_parse_proxy_url() -> None:
    assert parse_proxy_url("http://u%40corp:p%3Ass@proxy:3128") == ("proxy", 3128, "u@corp", "p:ss")
    assert parse_proxy_url("proxy.corp:8080") == ("proxy.corp", 8080, None, None)
    assert parse_proxy_url("http://proxy") == ("proxy", 80, None, None)
    for bad in ("https://proxy:3128", "socks5://p:1080", "http://:3128", "http://p:3128/x"):
        with pytest.raises(ValueError):
            parse_proxy_url(bad)


def test_config_names_the_bad_proxy_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.url: .*http://host:port"):
        cfg(tmp_path, url="https://proxy:3128")
    with pytest.raises(ConfigError, match=r"proxy\.auth"):
        cfg(tmp_path, auth="digest")
    assert cfg(tmp_path, auth="NTLM").proxy.auth == "ntlm"


@pytest.mark.parametrize(
    ("host", "port", "entries", "expected"),
    [
        ("relay.example.com", 443, ["*"], True),
        ("relay.example.com", 443, ["example.com"], True),
        ("relay.example.com", 443, [".example.com"], True),
        ("relay.example.com", 443, ["*.example.com"], True),
        ("example.com", 443, [".example.com"], True),
        ("badexample.com", 443, ["example.com"], False),
        ("relay.example.com", 443, ["relay.example.com:8443"], False),
        ("relay.example.com", 8443, ["relay.example.com:8443"], True),
        ("10.1.2.3", 443, ["10.0.0.0/8"], True),
        ("10.1.2.3", 443, ["10.1.2.3"], True),
        ("11.1.2.3", 443, ["10.0.0.0/8"], False),
        ("::1", 443, ["::1"], True),
        ("[::1]", 443, ["[::1]:443"], True),
        ("RELAY.Example.COM.", 443, ["relay.example.com"], True),
        ("relay.example.com", 443, ["", " "], False),
    ],
)
def test_no_proxy_matching(host: str, port: int, entries: list[str], expected: bool) -> None:
    assert bypassed(host, port, entries) is expected


def test_select_proxy_sources(tmp_path: Path) -> None:
    url = "wss://relay.example.com/v1/tunnel"
    env = {"HTTPS_PROXY": "http://envuser:envpw@env-proxy:3128"}
    plain = cfg(tmp_path).proxy
    route = select_proxy(url, plain, env)
    assert route is not None
    assert (route.host, route.port, route.username, route.password) == (
        "env-proxy",
        3128,
        "envuser",
        "envpw",
    )
    assert route.source == "HTTPS_PROXY"
    assert "envpw" not in repr(route) and "envpw" not in route.url
    assert select_proxy(url, plain, {}) is None
    assert select_proxy(url, plain, {"https_proxy": "p:1"}) is not None
    # HTTP_PROXY is for plain ws:// (a development relay) only.
    assert select_proxy(url, plain, {"HTTP_PROXY": "http://p:1"}) is None
    assert select_proxy("ws://127.0.0.1:1/v1/tunnel", plain, {"HTTP_PROXY": "p:1"}) is not None
    # NO_PROXY from the environment and from agent.toml.
    assert select_proxy(url, plain, {**env, "NO_PROXY": "localhost,.example.com"}) is None
    listed = cfg(tmp_path, no_proxy=["relay.example.com"]).proxy
    assert select_proxy(url, listed, env) is None
    # agent.toml wins over the environment, and its username/password over the URL's.
    own = cfg(tmp_path, url="http://cfg-proxy:8080", username="CORP\\svc", password="pw").proxy
    route = select_proxy(url, own, env)
    assert route is not None
    assert (route.host, route.username, route.password) == ("cfg-proxy", "CORP\\svc", "pw")
    assert route.source == "agent.toml [proxy] url"
    # The environment can be ignored, and "direct" turns the proxy off.
    assert select_proxy(url, cfg(tmp_path, from_environment=False).proxy, env) is None
    assert select_proxy(url, cfg(tmp_path, url="direct").proxy, env) is None
    with pytest.raises(ProxyError, match="HTTPS_PROXY: proxy URL must be http"):
        select_proxy(url, plain, {"HTTPS_PROXY": "https://p:1"})


# -- CONNECT exchanges against small in-process proxies

Handler = Callable[[h11.Request, int], tuple[int, list[tuple[str, str]], bool]]


class FakeProxy:
    """Answers each CONNECT with ``handler(request, leg)`` → (status, headers, keep_open)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[h11.Request] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def route(
        self, user: str | None = None, password: str | None = None, auth: str = "auto"
    ) -> ProxyRoute:
        return ProxyRoute("127.0.0.1", self.port, "test", user, password, auth)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        conn = h11.Connection(h11.SERVER)
        leg = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    leg += 1
                    self.requests.append(event)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    status, headers, keep = self.handler(self.requests[-1], leg)
                    body = b"" if status == 200 else b"denied"
                    if not keep:
                        headers = [*headers, ("Connection", "close")]
                    if status != 200:
                        headers = [*headers, ("Content-Length", str(len(body)))]
                    writer.write(
                        conn.send(h11.Response(status_code=status, headers=headers)) or b""
                    )
                    if status == 200:
                        await writer.drain()
                        await reader.read(1)  # hold the tunnel until the client closes
                        return
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    if not keep:
                        return
                    conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def auth_header(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"proxy-authorization":
            return value.decode()
    return None


@contextlib.asynccontextmanager
async def proxy(handler: Handler) -> AsyncIterator[FakeProxy]:
    async with FakeProxy(handler) as fake:
        yield fake


async def test_open_proxy_tunnel_carries_bytes() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]

    # A real forwarding proxy for this one test: CONNECT, then splice.
    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1".encode())
        assert f"host: 127.0.0.1:{target_port}".encode() in head.lower()
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        up_w.write(await reader.read(100))
        writer.write(await up_r.read(100))
        await writer.drain()
        writer.close()
        up_w.close()

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    route = ProxyRoute("127.0.0.1", server.sockets[0].getsockname()[1], "test")
    result = await open_tunnel(route, "127.0.0.1", target_port, 5)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(result.sock, b"ping through the proxy")
    assert await loop.sock_recv(result.sock, 100) == b"ping through the proxy"
    assert (result.status, result.scheme, result.legs) == (200, None, 1)
    result.sock.close()
    server.close()
    target.close()


async def test_negotiate_is_preferred_and_answered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spnego = pytest.importorskip("spnego")
    users = tmp_path / "ntlm_users"
    users.write_text("CORP:alice:Secret-pw1\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    acceptor = spnego.server(protocol="negotiate")
    state: dict[str, Any] = {}

    def handler(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        offer = [("Proxy-Authenticate", "Basic realm=x"), ("Proxy-Authenticate", "Negotiate")]
        value = auth_header(request)
        if value is None:
            return 407, offer, True
        scheme, _, token = value.partition(" ")
        assert scheme == "Negotiate"
        out = acceptor.step(base64.b64decode(token))
        if acceptor.complete:
            state["user"] = acceptor.client_principal
            return 200, [], True
        return 407, [("Proxy-Authenticate", "Negotiate " + base64.b64encode(out).decode())], True

    async with proxy(handler) as fake:
        result = await open_tunnel(fake.route("CORP\\alice", "Secret-pw1"), "relay", 443, 5)
        result.sock.close()
    assert state["user"] == "CORP\\alice"
    assert result.scheme == "negotiate" and result.legs == 3
    assert fake.connections == 1  # every leg on the same connection


async def test_basic_preemptive_and_rejected() -> None:
    seen: list[str | None] = []

    def handler(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        seen.append(auth_header(request))
        if auth_header(request) == "Basic " + base64.b64encode(b"u:right").decode():
            return 200, [], True
        return 407, [("Proxy-Authenticate", 'Basic realm="corp"')], True

    async with proxy(handler) as fake:
        result = await open_tunnel(fake.route("u", "right", auth="basic"), "relay", 443, 5)
        result.sock.close()
        assert result.legs == 1 and seen[0] is not None  # sent at once, no 407 round trip
        with pytest.raises(ProxyAuthFailed, match="rejected the Basic credentials of user 'u'"):
            await open_tunnel(fake.route("u", "wrong"), "relay", 443, 5)


async def test_proxy_closing_after_407_gets_a_new_connection() -> None:
    def handler(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        if auth_header(request) is None:
            return 407, [("Proxy-Authenticate", "Basic realm=x")], False
        return 200, [], True

    async with proxy(handler) as fake:
        result = await open_tunnel(fake.route("u", "p"), "relay", 443, 5)
        result.sock.close()
    assert fake.connections == 2 and result.scheme == "basic"


async def test_ntlm_needs_the_connection_kept_open(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("spnego")

    def handler(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        if auth_header(request) is None:
            return 407, [("Proxy-Authenticate", "NTLM")], True
        # A (made-up) type 2 challenge, then the proxy hangs up: NTLM can't finish.
        return 407, [("Proxy-Authenticate", "NTLM " + "A" * 8)], False

    async with proxy(handler) as fake:
        with pytest.raises(ProxyAuthFailed, match="closed the connection in the middle of NTLM"):
            await open_tunnel(fake.route("CORP\\u", "p"), "relay", 443, 5)


async def test_auth_errors_are_specific() -> None:
    def ntlm_only(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        return 407, [("Proxy-Authenticate", "NTLM")], True

    async with proxy(ntlm_only) as fake:
        with pytest.raises(ProxyAuthRequired, match=r"offers NTLM\) and no credentials"):
            await open_tunnel(fake.route(), "relay", 443, 5)
        with pytest.raises(ProxyAuthRequired, match=r"\[proxy\] auth = 'basic'"):
            await open_tunnel(fake.route("u", "p", auth="basic"), "relay", 443, 5)


async def test_refusal_names_status_reason_and_squid_error() -> None:
    def refuse(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        return 403, [("X-Squid-Error", "ERR_ACCESS_DENIED 0")], False

    async with proxy(refuse) as fake:
        with pytest.raises(ProxyRefused) as info:
            await open_tunnel(fake.route(), "relay.example.com", 443, 5)
    assert info.value.status == 403 and info.value.squid_error == "ERR_ACCESS_DENIED 0"
    assert "refused CONNECT relay.example.com:443: 403 Forbidden (ERR_ACCESS_DENIED 0)" in str(
        info.value
    )
    assert isinstance(info.value, OSError)  # the link retries it like any network failure


async def test_garbage_silence_and_closed_port() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    for handler, pattern, limit in (
        (garbage, "broken HTTP", 5.0),
        (silent, r"did not open a tunnel to relay:443 within 0.3 s", 0.3),
    ):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        route = ProxyRoute("127.0.0.1", server.sockets[0].getsockname()[1], "test")
        with pytest.raises(ProxyError, match=pattern):
            await open_tunnel(route, "relay", 443, limit)
        server.close()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(
        ProxyError, match=r"cannot connect to proxy http://127.0.0.1:\d+ \(from t\)"
    ):
        await open_tunnel(ProxyRoute("127.0.0.1", port, "t"), "relay", 443, 5)


async def test_connect_options_for_websockets(tmp_path: Path) -> None:
    config = cfg(tmp_path)
    assert await connect_options(config, "wss://relay.example.com/v1/tunnel", {}) == {
        "proxy": None  # never websockets' own proxy handling
    }

    def allow(request: h11.Request, leg: int) -> tuple[int, list[tuple[str, str]], bool]:
        return 200, [], True

    async with proxy(allow) as fake:
        env = {"HTTPS_PROXY": f"http://127.0.0.1:{fake.port}"}
        options = await connect_options(config, "wss://relay.example.com/v1/tunnel", env)
        assert options["proxy"] is None
        options["sock"].close()
        assert fake.requests[0].target == b"relay.example.com:443"


def test_example_config_documents_the_proxy_defaults(tmp_path: Path) -> None:
    import tomllib

    example = Path(__file__).resolve().parents[2] / "config" / "agent.toml"
    doc = tomllib.loads(example.read_text())
    assert cfg(tmp_path, **doc["proxy"]).proxy == cfg(tmp_path).proxy
    text = example.read_text()
    for key in ("url", "username", "password"):
        assert f"# {key} = " in text, key


# -- the tunnel's source address (tunnel.local_address)


async def test_connect_options_pass_the_source_address_for_a_direct_connection(
    tmp_path: Path,
) -> None:
    plain = cfg(tmp_path)
    assert await connect_options(plain, "wss://relay.example.com/v1/tunnel", {}) == {"proxy": None}
    bound = config_from_dict({**BASE, "tunnel": {"local_address": " 127.0.0.7 "}}, tmp_path)
    assert bound.tunnel.local_address == "127.0.0.7"
    options = await connect_options(bound, "wss://relay.example.com/v1/tunnel", {})
    assert options == {"proxy": None, "local_addr": ("127.0.0.7", 0)}


async def test_proxy_connection_leaves_from_the_source_address() -> None:
    seen: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    route = ProxyRoute("127.0.0.1", server.sockets[0].getsockname()[1], "test")
    result = await open_tunnel(route, "relay", 443, 5, local_address="127.0.0.9")
    assert result.sock.getsockname()[0] == "127.0.0.9"
    result.sock.close()
    result = await open_tunnel(route, "relay", 443, 5)
    result.sock.close()
    server.close()
    assert seen[0] == "127.0.0.9"
    assert seen[1] != "127.0.0.9"


async def test_source_address_of_the_wrong_family_is_a_clear_error() -> None:
    route = ProxyRoute("127.0.0.1", 9, "test")
    with pytest.raises(ProxyError, match="no IPv6 address"):
        await open_tunnel(route, "relay", 443, 5, local_address="::1")
