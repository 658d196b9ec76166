"""``backhaul-agent diagnose``: the gateway's network test, one step at a time.

Each step either passes with what it saw, or fails with the specific reason and a hint that
says what to change. The order follows the way out: the agent's configuration and key, the
proxy that will be used (if any), DNS, TCP, the proxy's CONNECT, TLS (chain, name, expiry,
pin), the WebSocket upgrade, the real handshake (the relay's challenge answered with the
member's key), round trips with PING/PONG, then every allow-listed internal target.

The handshake asks the relay for a *probe* (see ``relay/probe.py``): it is proven like a real
tunnel but never routed to, so diagnosing a running agent does not take its tunnel away, and
no stream is ever opened. A step that cannot run because an earlier one failed is reported as
skipped. Report (``--json``)::

    {"ok": bool, "steps": [{"name", "ok", "detail", "hint"?, "skipped"?}, ...]}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from agent.config import AgentConfig, tunnel_url
from agent.link import WebSocketTransport, ssl_context
from agent.policy import AllowEntry
from agent.proxy import ProxyError, ProxyRoute, connect_tcp, establish, select_proxy
from backhaul import handshake
from backhaul.aio.tunnel import TransportClosed, Tunnel
from backhaul.errors import BackhaulError
from backhaul.keys import fingerprint, load_signing_key
from backhaul.version import SUBPROTOCOL, __version__
from backhaul.wire import (
    CLOSE_CODE_BASE,
    Connection,
    ErrorCode,
    HelloReceived,
    PongReceived,
    Role,
    WelcomeReceived,
)

__all__ = ["Report", "Step", "diagnose", "failed_config"]

#: A certificate that expires sooner than this is reported (the step still passes).
EXPIRY_WARNING_DAYS = 14
PINGS = 3


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.hint:
            doc["hint"] = self.hint
        if self.skipped:
            doc["skipped"] = True
        return doc


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": [step.to_json() for step in self.steps]}

    def add(self, name: str, ok: bool, detail: str, hint: str | None = None) -> Step:
        step = Step(name, ok, detail, hint)
        self.steps.append(step)
        return step

    def skip(self, names: list[str], because: str) -> None:
        for name in names:
            self.steps.append(Step(name, False, f"skipped: {because}", skipped=True))


class _Failed(Exception):
    """A step failed; carries what the report says."""

    def __init__(self, detail: str, hint: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


def failed_config(message: str) -> Report:
    """The report when agent.toml itself can't be loaded."""
    report = Report()
    report.add(
        "config",
        False,
        message,
        "fix the named key in agent.toml (every key is described in config/agent.toml)",
    )
    return report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _errno_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class _Diagnosis:
    def __init__(
        self, cfg: AgentConfig, relay: str, environ: Mapping[str, str] | None, limit: float
    ) -> None:
        self.cfg = cfg
        self.relay = relay
        self.url = tunnel_url(relay)
        parts = urlsplit(self.url)
        self.secure = parts.scheme == "wss"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.environ = environ
        self.limit = limit
        self.report = Report()
        self.route: ProxyRoute | None = None
        self._ws: ClientConnection | None = None
        self._tunnel: Tunnel | None = None

    # -- helpers

    async def _timed(self, call: Awaitable[Any], what: str, hint: str) -> Any:
        try:
            async with asyncio.timeout(self.limit):
                return await call
        except TimeoutError:
            raise _Failed(f"no answer from {what} within {self.limit:g} s", hint) from None

    async def _stream(self) -> socket.socket:
        """A TCP socket to the relay (through the proxy's tunnel when there is one)."""
        if self.route is None:
            return await connect_tcp(self.host, self.port)
        sock = await connect_tcp(self.route.host, self.route.port)
        return (await establish(sock, self.route, self.host, self.port)).sock

    async def run_step(
        self, name: str, body: Callable[[], Awaitable[tuple[str, str | None]]]
    ) -> bool:
        try:
            detail, hint = await body()
        except _Failed as exc:
            self.report.add(name, False, exc.detail, exc.hint)
            return False
        self.report.add(name, True, detail, hint)
        return True

    # -- the steps

    async def run(self) -> Report:
        cfg = self.cfg
        self.report.add(
            "config",
            True,
            f"{cfg.config_file}: member {cfg.member_id} of gateway {cfg.gateway_id}, "
            f"relay {self.relay}",
        )
        key_ok = await self.run_step("keys", self._keys)
        chain = ["dns", "tcp", "proxy", "tls", "websocket", "handshake", "rtt"]
        try:
            self.route = select_proxy(self.url, self.cfg.proxy, self.environ)
        except ProxyError as exc:
            self.report.add("proxy", False, str(exc), "use http://[user:password@]host:port")
            self.report.skip([n for n in chain if n != "proxy"], "no usable proxy setting")
            chain = []
        for position, name in enumerate(chain):
            if name == "handshake" and not key_ok:
                self.report.skip(chain[position:], "the member key could not be loaded")
                break
            if not await self.run_step(name, getattr(self, "_" + name)):
                self.report.skip(chain[position + 1 :], f"{name} failed")
                break
        for entry in cfg.allow:
            await self._target(entry)
        if not cfg.allow:
            self.report.add(
                "targets",
                False,
                "the allow-list is empty: the agent refuses every request",
                "add [[allow]] entries to agent.toml (prefix, host or cidr)",
            )
        return self.report

    async def _keys(self) -> tuple[str, str | None]:
        try:
            load_signing_key(self.cfg.signing_key_file)
        except (BackhaulError, OSError) as exc:
            raise _Failed(
                str(exc),
                "the key is written by backhaul-agent enroll, mode 0600, owned by the user the "
                "agent runs as",
            ) from None
        return f"member key {self.cfg.signing_key_file} loads (mode 0600)", None

    async def _dns(self) -> tuple[str, str | None]:
        host = self.route.host if self.route else self.host
        role = "proxy" if self.route else "relay"
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            infos = await self._timed(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM),
                f"the DNS resolver for {host}",
                "check this host's DNS servers",
            )
        except socket.gaierror as exc:
            hint = (
                "check the name and this host's DNS servers; if only the proxy can resolve "
                "public names, set [proxy] url (or HTTPS_PROXY)"
                if role == "relay"
                else "check the proxy's host name in [proxy] url / HTTPS_PROXY"
            )
            raise _Failed(f"cannot resolve the {role} {host}: {exc.strerror}", hint) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        detail = f"{role} {host} → {', '.join(addresses)} ({_ms(time.perf_counter() - started)})"
        if self.route:
            detail += f"; the proxy ({self.route.source}) resolves the relay's name {self.host}"
        return detail, None

    async def _tcp(self) -> tuple[str, str | None]:
        host, port = (self.route.host, self.route.port) if self.route else (self.host, self.port)
        role = "proxy" if self.route else "relay"
        started = time.perf_counter()
        hint_blocked = (
            "a firewall drops outbound traffic to this port; have it opened, or go through the "
            "corporate proxy ([proxy] url)"
            if role == "relay"
            else "the proxy does not answer: check its address and port"
        )
        try:
            sock = await self._timed(connect_tcp(host, port), f"{host}:{port}", hint_blocked)
        except ConnectionRefusedError:
            hint = (
                "nothing listens there: check relay_url's port and that the relay is running"
                if role == "relay"
                else "nothing listens there: check the proxy's port"
            )
            raise _Failed(f"{role} {host}:{port} refused the connection", hint) from None
        except OSError as exc:
            raise _Failed(
                f"cannot connect to the {role} {host}:{port}: {_errno_text(exc)}", hint_blocked
            ) from None
        peer = sock.getpeername()
        sock.close()
        return (
            f"connected to {role} {peer[0]}:{peer[1]} in {_ms(time.perf_counter() - started)}",
            None,
        )

    async def _proxy(self) -> tuple[str, str | None]:
        route = self.route
        if route is None:
            return f"not used: the tunnel goes directly to {self.host}:{self.port}", None
        try:
            sock = await connect_tcp(route.host, route.port)
            result = await self._timed(
                establish(sock, route, self.host, self.port),
                f"proxy {route.url}",
                "the proxy accepted the connection but never answered CONNECT",
            )
        except ProxyError as exc:
            hint = {
                "proxy_auth_required": "set [proxy] username and password (for NTLM: "
                'DOMAIN\\user), or auth = "negotiate" with a Kerberos ticket',
                "proxy_auth_failed": "check the proxy account's name and password",
                "proxy_refused": "ask the proxy's administrators to allow CONNECT to "
                f"{self.host}:{self.port}",
            }.get(exc.code)
            raise _Failed(str(exc), hint) from None
        except OSError as exc:
            raise _Failed(f"cannot connect to proxy {route.url}: {_errno_text(exc)}") from None
        result.sock.close()
        auth = f", {result.scheme} authentication" if result.scheme else ""
        who = f" as {route.username}" if route.username and result.scheme else ""
        return (
            f"{route.url} (from {route.source}): CONNECT {self.host}:{self.port} → "
            f"{result.status} {result.reason}{auth}{who} "
            f"({result.legs} leg{'s' if result.legs > 1 else ''})"
        ), None

    async def _handshake_tls(self, context: ssl.SSLContext) -> tuple[bytes, str]:
        sock = await self._stream()

        def wrap() -> tuple[bytes, str]:
            sock.setblocking(True)
            sock.settimeout(self.limit)
            with context.wrap_socket(sock, server_hostname=self.host) as tls:
                der = tls.getpeercert(binary_form=True)
                return der or b"", tls.version() or "TLS"

        return await asyncio.to_thread(wrap)

    async def _tls(self) -> tuple[str, str | None]:
        if not self.secure:
            return "not used: a ws:// development relay on loopback (dev = true)", None
        try:
            der, version = await self._handshake_tls(ssl_context(self.cfg))
        except ssl.SSLCertVerificationError as exc:
            raise await self._explain_untrusted(exc) from None
        except (ssl.SSLError, OSError) as exc:
            raise _Failed(
                f"TLS handshake failed: {exc}",
                "the peer does not speak TLS on this port, or something in between cuts it",
            ) from None
        cert = x509.load_der_x509_certificate(der)
        days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
        detail = (
            f"{version}, certificate for {_subject(cert)} issued by {_issuer(cert)}: chain "
            f"verified against {self.cfg.ca_file or 'the system CAs'}, name {self.host} matches, "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({days} days)"
        )
        hint: str | None = None
        if days < EXPIRY_WARNING_DAYS:
            hint = f"the relay's certificate expires in {days} days: renew it"
        seen = fingerprint(der)
        pinned = self.cfg.pinned_fingerprint
        if pinned is not None and seen != pinned:
            raise _Failed(
                f"the relay's certificate {seen} does not match the pinned {pinned} "
                f"(it is for {_subject(cert)}, issued by {_issuer(cert)})",
                "if the relay's certificate was replaced on purpose, remove pinned_fingerprint "
                "from agent.toml or enroll again; otherwise something intercepts the connection",
            )
        detail += f", pin {'matches' if pinned else 'not set'}"
        return detail, hint

    async def _explain_untrusted(self, exc: ssl.SSLCertVerificationError) -> _Failed:
        """Fetch the certificate without verifying it, to say what exactly is wrong."""
        reason = exc.verify_message or str(exc)
        loose = ssl.create_default_context()
        loose.check_hostname = False
        loose.verify_mode = ssl.CERT_NONE
        try:
            der, _version = await self._handshake_tls(loose)
            cert: x509.Certificate | None = x509.load_der_x509_certificate(der)
        except (ssl.SSLError, OSError, ValueError, ProxyError):
            cert = None
        trust = f"ca_file {self.cfg.ca_file}" if self.cfg.ca_file else "the system CAs"
        if cert is None:
            return _Failed(f"relay certificate not trusted: {reason}")
        about = f"the relay presented a certificate for {_subject(cert)} issued by {_issuer(cert)}"
        code = exc.verify_code
        now = dt.datetime.now(dt.UTC)
        if code == 10 or cert.not_valid_after_utc < now:
            return _Failed(
                f"{about} that expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                "renew the relay's certificate",
            )
        if code == 62 or "hostname mismatch" in reason.lower():
            names = ", ".join(_names(cert)) or "no names"
            return _Failed(
                f"{about}, valid for {names} but not for {self.host}",
                "use a relay_url whose host name is on the certificate",
            )
        hint = (
            "set ca_file in agent.toml to the PEM certificate of the CA that signed the relay's "
            "certificate"
        )
        if self.route is not None:
            hint += (
                "; if that issuer is your proxy's TLS-inspection CA, ask for the relay's host "
                "to be exempted from inspection"
            )
        return _Failed(f"{about}, which {trust} do not vouch for ({reason})", hint)

    async def _open_ws(self) -> ClientConnection:
        sock = await self._stream()
        return await connect(
            self.url,
            proxy=None,
            sock=sock,
            ssl=ssl_context(self.cfg) if self.secure else None,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            open_timeout=self.limit,
            ping_interval=None,
            close_timeout=2,
            user_agent_header=f"backhaul-agent/{__version__} diagnose",
        )

    async def _websocket(self) -> tuple[str, str | None]:
        started = time.perf_counter()
        try:
            ws = await self._open_ws()
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise _Failed(
                f"the relay answered HTTP {status} to the upgrade of {self.url}",
                "relay_url must be the relay itself; a load balancer in front must pass "
                "WebSocket upgrades (Connection: Upgrade) to /v1/tunnel",
            ) from None
        except (InvalidHandshake, OSError, TimeoutError, ProxyError) as exc:
            raise _Failed(f"WebSocket upgrade failed: {exc}") from None
        protocol = ws.subprotocol
        await ws.close()
        if protocol != SUBPROTOCOL:
            raise _Failed(
                f"the relay did not agree to the {SUBPROTOCOL} subprotocol",
                "relay_url points at something that is not a Backhaul relay",
            )
        return (
            f"upgraded to {SUBPROTOCOL} at {self.url} in {_ms(time.perf_counter() - started)}",
            None,
        )

    async def _handshake(self) -> tuple[str, str | None]:
        try:
            ws = await self._open_ws()
        except (InvalidHandshake, OSError, TimeoutError, ProxyError) as exc:
            raise _Failed(f"could not reopen the WebSocket: {exc}") from None
        tunnel = Tunnel(Connection(Role.AGENT), WebSocketTransport(ws))
        try:
            welcome = await self._prove(tunnel)
        except BaseException:
            await ws.close()
            raise
        self._ws, self._tunnel = ws, tunnel
        cfg = self.cfg
        return (
            f"relay accepted member {cfg.member_id} of gateway {cfg.gateway_id} (its "
            f"challenge signed with the member key; probe session "
            f"{welcome.get('session_id', '?')}, never routed to)"
        ), None

    async def _prove(self, tunnel: Tunnel) -> dict[str, Any]:
        cfg = self.cfg
        try:
            async with asyncio.timeout(self.limit):
                events = await tunnel.receive_events()
                hello = next((e for e in events if isinstance(e, HelloReceived)), None)
                if hello is None:
                    raise _Failed("the relay sent no HELLO")
                tunnel.conn.send_hello(
                    handshake.agent_hello(
                        hello.payload,
                        load_signing_key(cfg.signing_key_file),
                        cfg.member_id,
                        cfg.gateway_id,
                        socket.gethostname(),
                        probe=True,
                    )
                )
                await tunnel.flush()
                while True:
                    for event in await tunnel.receive_events():
                        if isinstance(event, WelcomeReceived):
                            return event.payload
        except TimeoutError:
            raise _Failed(f"no WELCOME from the relay within {self.limit:g} s") from None
        except TransportClosed as exc:
            raise _refusal(exc) from None
        except handshake.HandshakeRefused as exc:
            raise _Failed(f"handshake refused: {exc.reason}") from None

    async def _rtt(self) -> tuple[str, str | None]:
        tunnel, ws = self._tunnel, self._ws
        assert tunnel is not None and ws is not None
        samples: list[float] = []
        try:
            async with asyncio.timeout(self.limit):
                while len(samples) < PINGS:
                    sent = time.monotonic_ns()
                    tunnel.conn.ping(sent)
                    await tunnel.flush()
                    answered = False
                    while not answered:
                        for event in await tunnel.receive_events():
                            if isinstance(event, PongReceived) and event.opaque == sent:
                                samples.append((time.monotonic_ns() - sent) / 1e6)
                                answered = True
        except TimeoutError:
            raise _Failed(
                f"no PONG within {self.limit:g} s",
                "the tunnel opens but traffic stalls: a middlebox may buffer or cut WebSockets",
            ) from None
        except TransportClosed as exc:
            raise _Failed(f"the relay closed the tunnel during the PINGs: {exc.reason}") from None
        finally:
            await tunnel.close(ErrorCode.NO_ERROR, "diagnose finished")
            await ws.close()
        low, mean = min(samples), sum(samples) / len(samples)
        hint = None
        if low > 500:
            hint = "round trips over 500 ms make every request slow; check the network path"
        return f"{PINGS} PING/PONG: min {low:.1f} ms, mean {mean:.1f} ms", hint

    # -- internal targets

    async def _target(self, entry: AllowEntry) -> None:
        if entry.prefix is not None:
            name = f"target {entry.prefix}"
            ok, detail, hint = await self._http_target(entry.prefix)
        elif entry.host is not None:
            name = f"target {entry.host}"
            ok, detail, hint = await self._host_target(entry.host, entry.ports or (443, 80))
        else:
            name = f"target {entry.cidr}"
            ok, detail, hint = True, "not tested: a range has no single address to try", None
        self.report.add(name, ok, detail, hint)

    async def _http_target(self, url: str) -> tuple[bool, str, str | None]:
        upstream = self.cfg.upstream
        verify: bool | ssl.SSLContext = upstream.verify
        if upstream.verify and upstream.ca_file is not None:
            context = ssl.create_default_context()
            context.load_verify_locations(str(upstream.ca_file))
            verify = context
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        failure = await self._tcp_failure(host, port)
        if failure is not None:
            return False, failure, "check the URL, that the API runs, and the firewall"
        started = time.perf_counter()
        try:
            async with httpx.AsyncClient(
                verify=verify, timeout=self.limit, trust_env=False, follow_redirects=False
            ) as client:
                async with client.stream(
                    "GET", url, headers={"user-agent": f"backhaul-agent/{__version__} diagnose"}
                ) as response:
                    status = response.status_code
        except httpx.ConnectError as exc:
            cause = exc.__cause__ or exc
            text = str(cause) or type(cause).__name__
            hint = "check the URL, that the API runs, and that no firewall blocks this host"
            if isinstance(cause, ssl.SSLError) or "CERTIFICATE" in text.upper():
                hint = "set [upstream] ca_file to the CA of the API's certificate"
            return False, f"cannot connect: {text}", hint
        except httpx.TimeoutException:
            return False, f"no answer within {self.limit:g} s", "the API or a firewall hangs"
        except httpx.HTTPError as exc:
            return False, f"the API broke HTTP: {exc}", None
        took = _ms(time.perf_counter() - started)
        return True, f"reachable: GET answered HTTP {status} in {took} (no credentials sent)", None

    async def _tcp_failure(self, host: str, port: int) -> str | None:
        """Why ``host:port`` can't be reached over TCP, or None when it can."""
        try:
            async with asyncio.timeout(self.limit):
                sock = await connect_tcp(host, port)
        except TimeoutError:
            return f"{host}:{port} does not answer within {self.limit:g} s"
        except socket.gaierror as exc:
            return f"cannot resolve {host}: {exc.strerror}"
        except ConnectionRefusedError:
            return f"{host}:{port} refused the connection (nothing listens there)"
        except OSError as exc:
            return f"cannot connect to {host}:{port}: {_errno_text(exc)}"
        sock.close()
        return None

    async def _host_target(self, host: str, ports: tuple[int, ...]) -> tuple[bool, str, str | None]:
        if host.startswith("*."):
            return True, "not tested: a wildcard names no single host", None
        results = []
        reachable = False
        for port in ports:
            failure = await self._tcp_failure(host, port)
            reachable = reachable or failure is None
            results.append(f"{port} open" if failure is None else failure)
        detail = f"TCP to {host}: " + ", ".join(results)
        hint = None if reachable else "check the host name, the ports and the firewall"
        return reachable, detail, hint


def _refusal(exc: TransportClosed) -> _Failed:
    code = exc.code or 0
    reason = exc.reason or "the relay closed the connection"
    if code == CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED:
        hints = {
            "unknown member": "this member is not known to the relay (deleted, or another "
            "relay's enrollment): enroll again with a new token",
            "member revoked": "an admin revoked this member: enroll again with a new token",
            "bad signature": "keys/member.key is not the key enrolled for this member: restore "
            "it or enroll again",
        }
        return _Failed(f"the relay refused this member: {reason}", hints.get(reason))
    return _Failed(f"the relay closed the tunnel during the handshake: {reason} ({code})")


def _subject(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string() or "(no subject)"


def _issuer(cert: x509.Certificate) -> str:
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(names[0].value) if names else cert.issuer.rfc4514_string()
    return f"{issuer} (self-signed)" if cert.issuer == cert.subject else issuer


def _names(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


async def diagnose(
    cfg: AgentConfig,
    *,
    relay: str | None = None,
    environ: Mapping[str, str] | None = None,
    limit_seconds: float = 10.0,
) -> Report:
    """Run every step against ``relay`` (default: the preferred relay) and the allow-list."""
    return await _Diagnosis(cfg, relay or cfg.relays[0], environ, limit_seconds).run()
