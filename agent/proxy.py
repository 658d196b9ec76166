"""The corporate HTTP proxy for the tunnel: choose it, CONNECT through it, answer its 407.

Many private networks let a server out only through an HTTP proxy. The agent then opens a TCP
connection to the proxy, asks it for a tunnel with ``CONNECT relay:443`` (RFC 9110 §9.3.6),
and speaks TLS to the relay *inside* that tunnel, so the proxy never sees the traffic and the
relay's certificate (and its pin) is checked exactly as on a direct connection. The connected
socket is handed to ``websockets`` (``connect(..., sock=...)``).

Which proxy: ``[proxy] url`` in agent.toml, else ``HTTPS_PROXY`` (``HTTP_PROXY`` for a ``ws://``
development relay, ``ALL_PROXY`` as a last resort) from the agent's environment, unless
``[proxy] from_environment = false``. ``[proxy] no_proxy`` and ``NO_PROXY`` list the hosts
reached directly (``*``, host names, ``.domain`` suffixes, IP addresses, CIDR ranges,
``host:port``), as curl and the Python requests library read them. The proxy is used for the
tunnel only: internal APIs are always called directly (the executor ignores proxy variables).

Proxy authentication (RFC 9110 §11.7): the first CONNECT goes without credentials (Basic is
sent at once when ``auth = "basic"``); a ``407`` is answered with the strongest scheme the
proxy offers and we can use — Negotiate (Kerberos, or NTLM inside SPNEGO), NTLM, then Basic.
NTLM and Negotiate are connection-bound handshakes (a challenge comes back in the next 407),
so every leg goes over the same TCP connection; pyspnego computes the tokens (SSPI on Windows,
GSSAPI or its own NTLM elsewhere). Without a username, Negotiate uses the service account's
own Kerberos ticket (or the logged-on Windows identity).

Enrollment, a plain HTTPS call made before any agent.toml exists, goes through the same code
with :func:`sync_transport` (``HTTPS_PROXY`` / ``NO_PROXY`` from the environment).

::

    ProxyError (AgentError, ConnectionError)   anything between us and the proxy
    ├── ProxyAuthRequired    407 and nothing we can answer it with
    ├── ProxyAuthFailed      407 again after our credentials: the proxy rejected them
    └── ProxyRefused         CONNECT answered with another status (squid's reason included)
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import h11
import httpcore
import httpx

from agent.errors import AgentError
from backhaul.version import __version__

if TYPE_CHECKING:
    from agent.config import AgentConfig, ProxyConfig

__all__ = [
    "ProxyAuthFailed",
    "ProxyAuthRequired",
    "ProxyError",
    "ProxyRefused",
    "ProxyRoute",
    "Tunnelled",
    "bypassed",
    "connect_options",
    "connect_tcp",
    "establish",
    "open_tunnel",
    "parse_proxy_url",
    "select_proxy",
    "sync_transport",
]

#: Most legs a proxy handshake may take (NTLM needs three: negotiate, challenge, authenticate).
MAX_LEGS = 6
_MAX_RESPONSE = 64 * 1024
_PREFERENCE = ("negotiate", "ntlm", "basic")


class ProxyError(AgentError, ConnectionError):
    """The tunnel could not be opened through the proxy; the message says what to fix."""

    code = "proxy_failed"


class ProxyAuthRequired(ProxyError):
    """The proxy wants credentials (407) and none that fit its schemes are configured."""

    code = "proxy_auth_required"


class ProxyAuthFailed(ProxyError):
    """The proxy answered 407 again to our credentials, or the auth exchange broke."""

    code = "proxy_auth_failed"


class ProxyRefused(ProxyError):
    """The proxy answered CONNECT with a status other than 2xx or 407."""

    code = "proxy_refused"

    def __init__(self, message: str, status: int, reason: str, squid_error: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.squid_error = squid_error


@dataclass(frozen=True)
class ProxyRoute:
    """The proxy chosen for one destination, and the credentials to offer it."""

    host: str
    port: int
    source: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    auth: str = "auto"

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (safe to log and show)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass
class Tunnelled:
    """What the CONNECT exchange established: the socket and how the proxy let us through."""

    sock: socket.socket
    status: int
    reason: str
    scheme: str | None
    legs: int


def parse_proxy_url(value: str) -> tuple[str, int, str | None, str | None]:
    """``http://[user:password@]host[:port]`` → (host, port, user, password); ValueError if not.

    A bare ``host:port`` (as some environments set HTTPS_PROXY) is read as ``http://``.
    """
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(
            f"proxy URL must be http://host:port (got {parts.scheme}://); the tunnel is "
            "TLS end to end inside the proxy's CONNECT"
        )
    if not parts.hostname:
        raise ValueError("proxy URL has no host, e.g. http://proxy.corp.example:3128")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError("proxy URL has an invalid port") from exc
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy URL must not have a path, query or fragment")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, user, password


def _destination(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    secure = scheme in ("wss", "https")
    host = parts.hostname or ""
    return scheme, host, parts.port or (443 if secure else 80)


def _no_proxy_entries(cfg: ProxyConfig, environ: Mapping[str, str]) -> list[str]:
    entries = list(cfg.no_proxy)
    if cfg.from_environment:
        raw = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
        entries += [item for item in raw.replace(" ", ",").split(",") if item]
    return entries


def bypassed(host: str, port: int, entries: Sequence[str]) -> bool:
    """True when ``host:port`` matches a NO_PROXY entry and is reached directly."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [v6]:port or [v6]
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:
            name, _, port_text = entry.partition(":")
            if port_text.isdigit():
                entry, entry_port = name, int(port_text)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = entry.removeprefix("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def select_proxy(
    url: str, cfg: ProxyConfig, environ: Mapping[str, str] | None = None
) -> ProxyRoute | None:
    """The proxy to reach ``url`` (a ws://, wss://, http:// or https:// URL), or None: direct.

    Raises ProxyError when the environment names a proxy that is not a usable URL.
    """
    env = os.environ if environ is None else environ
    scheme, host, port = _destination(url)
    if bypassed(host, port, _no_proxy_entries(cfg, env)):
        return None
    if cfg.url is not None:
        value, source = cfg.url, "agent.toml [proxy] url"
    elif cfg.from_environment:
        secure = scheme in ("wss", "https")
        names = ["HTTPS_PROXY", "https_proxy"] if secure else ["HTTP_PROXY", "http_proxy"]
        names += ["ALL_PROXY", "all_proxy"]
        found = next(((name, env[name]) for name in names if env.get(name, "").strip()), None)
        if found is None:
            return None
        source, value = found
    else:
        return None
    if value.strip().lower() in ("direct", "none"):
        return None
    try:
        proxy_host, proxy_port, user, password = parse_proxy_url(value)
    except ValueError as exc:
        raise ProxyError(f"{source}: {exc}") from None
    if cfg.username is not None:
        user, password = cfg.username, cfg.password
    return ProxyRoute(proxy_host, proxy_port, source, user, password, cfg.auth)


async def connect_tcp(host: str, port: int, local_address: str | None = None) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port`` (each resolved address in turn),
    from ``local_address`` when given (then only addresses of its family are tried)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    source = ipaddress.ip_address(local_address) if local_address else None
    if source is not None:
        family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
        infos = [info for info in infos if info[0] == family]
        if not infos:
            raise OSError(f"{host} has no IPv{source.version} address to reach from {source}")
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            if source is not None:
                sock.bind((str(source), 0))
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(f"{host} has no address")


class _Challenge:
    """The schemes of the ``Proxy-Authenticate`` fields (RFC 9110 §11.6.1), by scheme name."""

    def __init__(self, values: list[str]) -> None:
        self.offers: dict[str, str] = {}
        self.raw: list[str] = []
        for value in values:
            self.raw.append(value)
            scheme, _, param = value.strip().partition(" ")
            self.offers.setdefault(scheme.lower(), param.strip())

    def describe(self) -> str:
        return ", ".join(self.raw) or "no Proxy-Authenticate field"


class _Authenticator:
    """One proxy-auth exchange: picks a scheme from the first 407, then answers each leg."""

    def __init__(self, route: ProxyRoute) -> None:
        self.route = route
        self.scheme: str | None = None
        self._context: Any = None
        self.sent = False

    def preemptive(self) -> str | None:
        if self.route.auth == "basic" and self._basic_possible():
            self.scheme = "basic"
            self.sent = True
            return self._basic()
        return None

    def _basic_possible(self) -> bool:
        return self.route.username is not None and self.route.password is not None

    def _basic(self) -> str:
        raw = f"{self.route.username}:{self.route.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _usable(self, scheme: str) -> bool:
        if self.route.auth not in ("auto", scheme):
            return False
        if scheme == "basic" or scheme == "ntlm":
            return self._basic_possible()
        return True  # negotiate: the service account's own ticket when no user is given

    def answer(self, challenge: _Challenge) -> str:
        """The Proxy-Authorization value for this 407, or raise when there is none."""
        if self.scheme is None:
            for scheme in _PREFERENCE:
                if scheme in challenge.offers and self._usable(scheme):
                    self.scheme = scheme
                    break
            else:
                raise self._required(challenge)
            self.sent = True
            if self.scheme == "basic":
                return self._basic()
            return self._step(None)
        if self.scheme == "basic" and "basic" not in challenge.offers:
            raise self._required(challenge)  # Basic went first, unasked, and is not wanted
        if self.scheme == "basic":
            raise ProxyAuthFailed(
                f"proxy {self.route.url} rejected the Basic credentials of user "
                f"{self.route.username!r} (407 again); check [proxy] username and password"
            )
        token = challenge.offers.get(self.scheme, "")
        if not token:
            raise ProxyAuthFailed(
                f"proxy {self.route.url} rejected the {self.label()} authentication of "
                f"{self.route.username or 'the service account'} (407 without a challenge)"
            )
        try:
            in_token = base64.b64decode(token, validate=True)
        except ValueError:
            raise ProxyAuthFailed(
                f"proxy {self.route.url} sent a {self.label()} challenge that is not base64"
            ) from None
        return self._step(in_token)

    def label(self) -> str:
        return {"ntlm": "NTLM", "negotiate": "Negotiate", "basic": "Basic"}.get(
            self.scheme or "", str(self.scheme)
        )

    def _step(self, in_token: bytes | None) -> str:
        try:
            import spnego
            import spnego.exceptions
        except ImportError:
            raise ProxyAuthFailed(
                f"proxy {self.route.url} asks for {self.label()}, which needs pyspnego "
                "(pip install 'backhaul[agent]')"
            ) from None
        try:
            if self._context is None:
                self._context = spnego.client(
                    self.route.username,
                    self.route.password,
                    hostname=self.route.host,
                    service="HTTP",
                    protocol=self.scheme or "negotiate",
                )
            out = self._context.step(in_token)
        except spnego.exceptions.SpnegoError as exc:
            raise ProxyAuthFailed(
                f"{self.label()} authentication to proxy {self.route.url} failed: "
                f"{exc.message or exc}"
            ) from None
        if not out:
            raise ProxyAuthFailed(
                f"{self.label()} authentication to proxy {self.route.url} produced no token"
            )
        return f"{self.label()} {base64.b64encode(out).decode('ascii')}"

    def _required(self, challenge: _Challenge) -> ProxyAuthRequired:
        offered = challenge.describe()
        if self.route.auth != "auto" and self.route.auth not in challenge.offers:
            return ProxyAuthRequired(
                f"proxy {self.route.url} requires authentication and offers {offered}, "
                f"but [proxy] auth = {self.route.auth!r}"
            )
        return ProxyAuthRequired(
            f"proxy {self.route.url} requires authentication (407; it offers {offered}) and "
            "no credentials are configured: set [proxy] username and password in agent.toml "
            "or put them in the proxy URL (http://user:password@proxy:port)"
        )


async def _send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def _read_response(
    sock: socket.socket, conn: h11.Connection
) -> tuple[h11.Response, bytes, bool]:
    """The proxy's answer: (head, body, whether the connection can carry another request)."""
    loop = asyncio.get_running_loop()
    head: h11.Response | None = None
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyError(f"the proxy answered with broken HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            data = await loop.sock_recv(sock, 65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            head = event
            if conn.their_state is h11.SWITCHED_PROTOCOL:
                return head, b"", False
            continue
        if isinstance(event, h11.Data):
            if len(body) < _MAX_RESPONSE:
                body += bytes(event.data)
            continue
        if event is h11.PAUSED:
            assert head is not None
            return head, body, False
        if isinstance(event, h11.EndOfMessage):
            assert head is not None
            reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
            return head, body, reusable
        if isinstance(event, h11.ConnectionClosed):
            if head is None:
                raise ProxyError("the proxy closed the connection without answering CONNECT")
            return head, body, False


def _header(response: h11.Response, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in response.headers if k == name]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "no reason given"


def _refused(route: ProxyRoute, target: str, response: h11.Response) -> ProxyRefused:
    reason = response.reason.decode("latin-1") or _phrase(response.status_code)
    squid = next(iter(_header(response, b"x-squid-error")), None)
    message = f"proxy {route.url} refused CONNECT {target}: {response.status_code} {reason}"
    if squid:
        message += f" ({squid})"
    hint = {
        403: "the proxy's policy does not allow this destination or port; ask its "
        "administrators to allow CONNECT to the relay",
        502: "the proxy could not reach the relay",
        503: "the proxy could not reach the relay (name or port) or is overloaded",
        504: "the proxy timed out reaching the relay",
    }.get(response.status_code)
    if hint:
        message += f"; {hint}"
    return ProxyRefused(message, response.status_code, reason, squid)


async def establish(
    sock: socket.socket,
    route: ProxyRoute,
    host: str,
    port: int,
    local_address: str | None = None,
) -> Tunnelled:
    """Run the CONNECT exchange on ``sock`` (which it owns from here on: closed on failure).

    The proxy may close the connection after a 407; the next leg then goes on a new one
    (from ``local_address`` too), except in the middle of an NTLM/Negotiate handshake, which
    is bound to its connection.
    """
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    auth = _Authenticator(route)
    authorization = auth.preemptive()
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE)
    try:
        for leg in range(1, MAX_LEGS + 1):
            headers = [
                ("Host", target),
                ("User-Agent", f"backhaul-agent/{__version__}"),
                ("Proxy-Connection", "keep-alive"),
            ]
            if authorization is not None:
                headers.append(("Proxy-Authorization", authorization))
            data = conn.send(h11.Request(method="CONNECT", target=target, headers=headers))
            await _send(sock, (data or b"") + (conn.send(h11.EndOfMessage()) or b""))
            response, _body, reusable = await _read_response(sock, conn)
            status = response.status_code
            if 200 <= status < 300:
                if conn.trailing_data[0]:
                    raise ProxyError(f"proxy {route.url} sent data before the tunnel was used")
                reason = response.reason.decode("latin-1")
                return Tunnelled(sock, status, reason, auth.scheme if auth.sent else None, leg)
            if status != 407:
                raise _refused(route, target, response)
            challenge = _Challenge(_header(response, b"proxy-authenticate"))
            if reusable:
                conn.start_next_cycle()
            else:
                if auth.scheme in ("ntlm", "negotiate"):
                    raise ProxyAuthFailed(
                        f"proxy {route.url} closed the connection in the middle of "
                        f"{auth.label()} authentication; it must keep the connection open "
                        "between the legs"
                    )
                # The proxy closed after its 407: the next leg goes on a fresh connection.
                sock.close()
                sock = await connect_tcp(route.host, route.port, local_address)
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE)
            authorization = auth.answer(challenge)
        raise ProxyAuthFailed(
            f"proxy {route.url} still asked for authentication after {MAX_LEGS} legs"
        )
    except BaseException:
        sock.close()
        raise


async def open_tunnel(
    route: ProxyRoute,
    host: str,
    port: int,
    limit_seconds: float,
    local_address: str | None = None,
) -> Tunnelled:
    """Connect to the proxy (from ``local_address`` when given) and CONNECT to
    ``host:port``; the socket is ready for TLS."""
    try:
        async with asyncio.timeout(limit_seconds):
            try:
                sock = await connect_tcp(route.host, route.port, local_address)
            except OSError as exc:
                raise ProxyError(
                    f"cannot connect to proxy {route.url} (from {route.source}): "
                    f"{exc.strerror or exc}"
                ) from None
            return await establish(sock, route, host, port, local_address)
    except TimeoutError:
        raise ProxyError(
            f"proxy {route.url} did not open a tunnel to {host}:{port} within {limit_seconds:g} s"
        ) from None


async def connect_options(
    cfg: AgentConfig, url: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``websockets`` ``connect``: our own proxy handling, never its own.

    With a proxy, the tunnel's socket is opened here and passed as ``sock``; websockets then
    runs TLS to the relay on it. Without one, websockets connects directly. Either way the
    connection leaves from ``tunnel.local_address`` when one is set.
    """
    local_address = cfg.tunnel.local_address
    route = select_proxy(url, cfg.proxy, environ)
    if route is None:
        if local_address is None:
            return {"proxy": None}
        return {"proxy": None, "local_addr": (local_address, 0)}
    _scheme, host, port = _destination(url)
    result = await open_tunnel(route, host, port, cfg.proxy.connect_timeout_seconds, local_address)
    return {"proxy": None, "sock": result.sock}


class _ProxyBackend(httpcore.SyncBackend):
    """httpcore's blocking backend, with every TCP connection opened through ``route``."""

    def __init__(self, route: ProxyRoute, limit_seconds: float) -> None:
        self.route = route
        self.limit = limit_seconds

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        from httpcore._backends.sync import SyncStream

        try:
            result = asyncio.run(open_tunnel(self.route, host, port, timeout or self.limit))
        except ProxyError as exc:
            raise httpcore.ConnectError(str(exc)) from None
        result.sock.setblocking(True)
        result.sock.settimeout(timeout)
        return SyncStream(result.sock)


def sync_transport(
    url: str,
    verify: ssl.SSLContext | bool = True,
    cfg: ProxyConfig | None = None,
    environ: Mapping[str, str] | None = None,
) -> httpx.HTTPTransport | None:
    """An httpx transport for blocking calls to ``url`` through the proxy (enrollment, before
    any agent.toml exists: HTTPS_PROXY / NO_PROXY from the environment), or None: direct."""
    from agent.config import ProxyConfig

    config = cfg or ProxyConfig()
    route = select_proxy(url, config, environ)
    if route is None:
        return None
    transport = httpx.HTTPTransport(verify=verify)
    context = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    transport._pool = httpcore.ConnectionPool(
        ssl_context=context,
        network_backend=_ProxyBackend(route, config.connect_timeout_seconds),
    )
    return transport
