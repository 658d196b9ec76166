"""Connections for Windows-authenticated calls: one kept-alive connection per request at a time,
never shared between credentials.

NTLM (and Kerberos on servers that keep it) authenticates a TCP connection, so the pool that
serves these calls is not the executor's shared one. Calls are grouped by *credential identity*
(an HMAC of the scheme, user, password and SPN under a per-process key, see
:func:`agent.tickets.credential_key`) and origin. Each group has up to ``max_lanes`` *lanes*; a
lane is an :class:`httpx.AsyncClient` whose transport holds at most one connection, and a
request holds its lane from the first handshake leg until its response body is closed. So all
legs of a handshake travel on one connection, and a connection authenticated for one credential
is only ever used again by the same credential.

A lane remembers which connection it authenticated and that connection's TLS certificate; when
httpcore has replaced the connection (the server closed it, or it idled past keep-alive), the
lane knows it is talking to a new, unauthenticated connection. A group that sees an
authenticated connection challenged again learns that the server authenticates each request
(not the connection), and from then on sends a token with every request instead of trying
without one first.

The password is used while a request is prepared and is not kept: Kerberos keeps the tickets it
bought with it (:mod:`agent.tickets`), NTLM derives its keys again per handshake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.cookiejar
import ssl
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from agent.errors import CredentialsInvalid, WindowsAuthFailed
from agent.head import AuthSpec
from agent.tickets import TicketCache, credential_key
from agent.winauth import (
    ConnectionState,
    Mechanism,
    SecurityContext,
    WindowsAuth,
    explain,
    peer_certificate,
)
from backhaul.version import __version__

__all__ = ["REPLAYABLE_BODY_BYTES", "WindowsCredential", "WindowsPool"]

#: Bodies up to this size are kept so a re-challenged request can be sent again.
REPLAYABLE_BODY_BYTES = 64 * 1024
#: An idle connection is kept this long (IIS and Apache close theirs after 120 s and 5-30 s).
KEEPALIVE_SECONDS = 60.0
#: Groups unused for this long are closed.
_IDLE_GROUP_SECONDS = 600.0
WINDOWS = sys.platform == "win32"


@dataclass(frozen=True)
class WindowsCredential:
    """The opened credentials of a windows connection: a user, or the agent's own identity."""

    username: str | None
    password: str | None = field(default=None, repr=False)

    @property
    def service(self) -> bool:
        return self.username is None

    @property
    def display(self) -> str:
        return self.username or "the agent's service identity"

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], connection_id: str) -> WindowsCredential:
        """``{"username", "password"}`` or ``{"identity": "service"}``; errors name the field."""
        where = f"credentials of connection {connection_id} are unusable for windows auth"
        if "identity" in doc:
            if doc.get("identity") != "service" or set(doc) != {"identity"}:
                raise CredentialsInvalid(f'{where}: identity must be "service" and stand alone')
            return cls(None, None)
        for name in ("username", "password"):
            value = doc.get(name)
            if not isinstance(value, str) or not value:
                state = "is missing" if value is None else "is not a non-empty string"
                raise CredentialsInvalid(f"{where}: field {name!r} {state}")
        return cls(str(doc["username"]), str(doc["password"]))

    def kerberos_principal(self) -> str:
        """The Kerberos principal for the user name.

        ``user@realm`` keeps its realm (upper-cased, as AD realms are); ``DOMAIN\\user`` becomes
        ``user@DOMAIN`` when the domain is a DNS name and ``user`` (the default realm of
        krb5.conf) when it is a NetBIOS name, which is no realm; a bare ``user`` gets the
        default realm too.
        """
        name = self.username or ""
        if "\\" in name:
            domain, _, user = name.partition("\\")
            return f"{user}@{domain.upper()}" if "." in domain else user
        if "@" in name:
            user, _, realm = name.rpartition("@")
            return f"{user}@{realm.upper()}"
        return name


def split_spn(spn: str) -> tuple[str, str]:
    service, _, host = spn.partition("/")
    return service, host


class _SpnegoFactory:
    """Builds pyspnego client contexts for one request (runs in a worker thread)."""

    def __init__(
        self,
        credential: WindowsCredential,
        spn: str,
        tickets: TicketCache,
        delegate: bool,
    ) -> None:
        self.credential = credential
        self.service, self.host = split_spn(spn)
        self.spn = spn
        self.tickets = tickets
        self.delegate = delegate

    def __call__(self, mechanism: Mechanism, bindings: bytes | None) -> SecurityContext:
        import spnego
        from spnego.channel_bindings import GssChannelBindings

        cb = GssChannelBindings(application_data=bindings) if bindings is not None else None
        req = spnego.ContextReq.default
        if self.delegate:
            req |= spnego.ContextReq.delegate
        cred = self.credential
        options = spnego.NegotiateOptions.none
        creds: Any
        if mechanism == "kerberos":
            if WINDOWS:
                creds = (
                    spnego.Password(cred.username, cred.password)
                    if cred.password is not None and cred.username is not None
                    else spnego.CredentialCache()
                )
            else:
                options = spnego.NegotiateOptions.use_gssapi
                if cred.password is not None:
                    principal = cred.kerberos_principal()
                    try:
                        ccache = self.tickets.ccache_for(principal, cred.password)
                    except ImportError:
                        raise WindowsAuthFailed(
                            "kerberos_error",
                            "Kerberos support is not installed on this agent "
                            "(pip install 'backhaul[agent]' brings gssapi and krb5)",
                        ) from None
                    except Exception as exc:
                        raise explain(exc, principal=principal, spn=self.spn) from None
                    creds = spnego.KerberosCCache(ccache=ccache)
                else:
                    creds = spnego.CredentialCache()
            return _Context(
                spnego.client(
                    creds,
                    hostname=self.host,
                    service=self.service,
                    channel_bindings=cb,
                    context_req=req,
                    protocol="kerberos",
                    options=options,
                )
            )
        if cred.password is None or cred.username is None:
            if not WINDOWS:
                raise WindowsAuthFailed(
                    "service_identity_unavailable",
                    "NTLM as the agent's service identity needs Windows (SSPI); on Linux use "
                    "windows_scheme kerberos or negotiate with a keytab, or a user and password",
                )
            creds = spnego.CredentialCache()
        else:
            creds = spnego.Password(cred.username, cred.password)
        if not WINDOWS:
            options = spnego.NegotiateOptions.use_ntlm
        return _Context(
            spnego.client(
                creds,
                hostname=self.host,
                service=self.service,
                channel_bindings=cb,
                context_req=req,
                protocol="ntlm",
                options=options,
            )
        )


class _Context:
    """A pyspnego context behind the :class:`~agent.winauth.SecurityContext` protocol."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    @property
    def complete(self) -> bool:
        return bool(self._ctx.complete)

    def step(self, in_token: bytes | None = None, *, channel_bindings: Any = None) -> bytes | None:
        out = self._ctx.step(in_token, channel_bindings=channel_bindings)
        return None if out is None else bytes(out)


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class _Lane:
    """One client with at most one connection, and what we know about that connection."""

    def __init__(self, make_transport: Callable[[], httpx.AsyncBaseTransport]) -> None:
        self.transport = make_transport()
        self.client = httpx.AsyncClient(
            transport=self.transport,
            follow_redirects=False,
            trust_env=False,
            cookies=_no_cookies(),
        )
        for name in list(self.client.headers):
            del self.client.headers[name]
        self.client.headers["user-agent"] = f"backhaul-agent/{__version__}"
        self.authenticated_conn: object | None = None
        self.cert: bytes | None = None
        self.cert_conn: object | None = None

    def connection(self, *, live_only: bool) -> object | None:
        """The connection httpcore holds for this lane (None before the first request).

        Read from the transport's pool (``httpx.AsyncHTTPTransport._pool``); a transport
        without one (tests' MockTransport) counts as a single connection that never changes.
        """
        pool = getattr(self.transport, "_pool", None)
        if pool is None:
            return self.transport
        for conn in pool.connections:
            if conn.is_closed():
                continue
            if live_only and conn.has_expired():
                continue
            found: object = conn
            return found
        return None

    async def aclose(self) -> None:
        await self.client.aclose()


class _Group:
    """The lanes of one (credential identity, origin)."""

    def __init__(self, max_lanes: int) -> None:
        self.max_lanes = max_lanes
        self.lanes: list[_Lane] = []
        self.idle: list[_Lane] = []
        self.cond = asyncio.Condition()
        #: False once the server re-challenged an authenticated connection.
        self.persistent = True
        self.last_used = time.monotonic()
        self.busy = 0


@dataclass
class _Checkout:
    group: _Group
    lane: _Lane
    released: bool = False


class WindowsPool:
    """Sends Windows-authenticated requests; one per executor."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | bool,
        *,
        max_lanes: int = 16,
        delegate: bool = False,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
        tickets: TicketCache | None = None,
        threads: int = 4,
    ) -> None:
        self._ssl = ssl_context
        self.max_lanes = max_lanes
        self.delegate = delegate
        self.tickets = tickets if tickets is not None else TicketCache(forwardable=delegate)
        self._transport_factory = transport_factory or self._default_transport
        self._groups: dict[tuple[str, str], _Group] = {}
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="backhaul-winauth"
        )

    def _default_transport(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(
            verify=self._ssl,
            trust_env=False,
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_SECONDS
            ),
        )

    async def _run_blocking(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn)

    async def aclose(self) -> None:
        for group in list(self._groups.values()):
            for lane in group.lanes:
                await lane.aclose()
        self._groups.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.tickets.clear()

    # -- lanes

    async def _checkout(self, key: tuple[str, str]) -> _Checkout:
        await self._close_idle_groups()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(self.max_lanes)
        group.busy += 1
        try:
            async with group.cond:
                while not group.idle and len(group.lanes) >= group.max_lanes:
                    await group.cond.wait()
                if group.idle:
                    # Prefer a lane whose connection is still authenticated.
                    group.idle.sort(
                        key=lambda lane: (
                            lane.authenticated_conn is not None
                            and lane.connection(live_only=True) is lane.authenticated_conn
                        )
                    )
                    lane = group.idle.pop()
                else:
                    lane = _Lane(self._transport_factory)
                    group.lanes.append(lane)
        except BaseException:
            group.busy -= 1
            raise
        group.last_used = time.monotonic()
        return _Checkout(group, lane)

    async def _release(self, checkout: _Checkout) -> None:
        if checkout.released:
            return
        checkout.released = True
        group = checkout.group
        group.busy -= 1
        group.last_used = time.monotonic()
        async with group.cond:
            group.idle.append(checkout.lane)
            group.cond.notify()

    async def _close_idle_groups(self) -> None:
        now = time.monotonic()
        for key, group in list(self._groups.items()):
            if group.busy == 0 and now - group.last_used > _IDLE_GROUP_SECONDS:
                del self._groups[key]
                for lane in group.lanes:
                    await lane.aclose()

    # -- requests

    async def send(
        self,
        spec: AuthSpec,
        credentials: Mapping[str, Any],
        connection_id: str,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: AsyncIterable[bytes] | bytes | None,
        timeouts: httpx.Timeout,
    ) -> tuple[httpx.Response, Callable[[], Awaitable[None]]]:
        """Send one request with Windows authentication; returns the streamed response and
        the callback that gives its connection back once the body is closed."""
        credential = WindowsCredential.from_document(credentials, connection_id)
        target = httpx.URL(url)
        host = target.host
        spn = spec.spn or f"HTTP/{host}"
        scheme = spec.windows_scheme or "negotiate"
        identity = credential_key(
            "lane", scheme, spn, credential.username or "", credential.password or ""
        )
        origin = f"{target.scheme}://{host}:{target.port or ''}"
        body = await _buffer_small(content)
        checkout = await self._checkout((identity, origin))
        lane = checkout.lane
        try:
            live = lane.connection(live_only=True)
            state = ConnectionState(
                authenticated=checkout.group.persistent
                and live is not None
                and live is lane.authenticated_conn,
                peer_cert=lane.cert if live is not None and live is lane.cert_conn else None,
            )
            principal = (
                credential.kerberos_principal()
                if credential.username is not None and scheme != "ntlm"
                else credential.display
            )
            auth = WindowsAuth(
                scheme,
                _SpnegoFactory(credential, spn, self.tickets, self.delegate),
                state=state,
                spn=spn,
                principal=principal,
                ntlm_possible=credential.password is not None or WINDOWS,
                run_blocking=self._run_blocking,
            )
            request = lane.client.build_request(
                method, url, headers=headers, content=body, timeout=timeouts
            )
            response = await lane.client.send(request, auth=auth, stream=True)
        except BaseException:
            lane.authenticated_conn = None
            await self._release(checkout)
            raise
        current = lane.connection(live_only=False)
        if state.rechallenged:
            checkout.group.persistent = False
        lane.authenticated_conn = current if state.authenticated_now else None
        cert = peer_certificate(response)
        lane.cert, lane.cert_conn = (cert, current) if cert is not None else (None, None)

        async def release() -> None:
            await self._release(checkout)

        return response, release


async def _buffer_small(
    content: AsyncIterable[bytes] | bytes | None,
) -> bytes | AsyncIterable[bytes] | None:
    """Keep a body of at most REPLAYABLE_BODY_BYTES whole (it can be resent); stream the rest."""
    if content is None or isinstance(content, bytes):
        return content
    iterator = aiter(content)
    chunks: list[bytes] = []
    size = 0
    async for chunk in iterator:
        chunks.append(chunk)
        size += len(chunk)
        if size > REPLAYABLE_BODY_BYTES:
            return _chain(chunks, iterator)
    return b"".join(chunks)


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    head.clear()
    async for chunk in rest:
        yield chunk
