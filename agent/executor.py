"""One upstream HTTP call per stream: check the target, apply credentials, stream both bodies.

The order matters and is the security boundary of the agent:

1. the head is already a validated :class:`~agent.head.RequestHead`;
2. the target must pass the allow-list (:mod:`agent.policy`) *and* stay under the connection's
   base URL, so a relay can neither reach an unlisted host nor reuse one connection's
   credentials against another API on an allowed host;
3. hop-by-hop headers (RFC 9110 §7.6.1: Connection and every field it names, Keep-Alive,
   Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade) and Host are dropped in both directions,
   and so are the caller's Authorization and Cookie, which the relay already removes;
4. credentials are applied last (:mod:`agent.auth`).

Two clients carry the calls. Connections with no auth or an API key (credentials that are
just a header or a query parameter) go through the lean keep-alive client of
:mod:`agent.upstream`, which costs a fraction of httpx per request. Basic auth (an
:class:`httpx.Auth` flow), Windows auth (:mod:`agent.winpool`) and an injected transport (the
unit tests' :class:`httpx.MockTransport`) go through httpx. Both behave the same to the caller:

- bodies stream both ways; the response body arrives as sent (content codings untouched,
  nothing buffered whole);
- redirects are never followed (the caller sees them and the target is re-checked on the next
  call), cookies are never stored (a shared jar would leak one connection's session into
  another), proxy and netrc settings from the environment are ignored;
- ``User-Agent`` is ``backhaul-agent/<version>`` unless the caller sent its own, and no other
  header is added (no Accept-Encoding the caller did not ask for).

httpx exceptions are mapped at this boundary to :mod:`agent.errors` (the lean client raises
them itself); an exception raised by the request-body iterator itself (the caller went away)
propagates unchanged.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, Self

import h11
import httpx

from agent import metrics, upstream
from agent.auth import apply_credentials
from agent.config import AgentConfig
from agent.errors import (
    AgentError,
    BadRequestHead,
    TargetDenied,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from agent.head import RequestHead
from agent.leanpath import HOST, REQUEST_DROP, USER_AGENT, LeanPath
from agent.policy import NormalizedURL, Policy, is_under, normalize_url
from agent.tickets import apply_environment as apply_kerberos_environment
from agent.upstream import reason as _reason
from agent.winpool import WindowsPool
from backhaul.headers import HOP_BY_HOP as _HOP_BY_HOP
from backhaul.headers import strip_hop_by_hop as _strip
from backhaul.sslobject import direct_records
from backhaul.tallies import Tally

__all__ = ["HOP_BY_HOP", "Executor", "RequestHead", "UpstreamResponse", "strip_hop_by_hop"]

#: RFC 9110 §7.6.1 connection-specific fields, plus Host (httpx sets it from the URL).
HOP_BY_HOP = _HOP_BY_HOP | {"host"}
_BYTES_UP = Tally(metrics.BYTES.labels("up"))


def strip_hop_by_hop(
    headers: list[tuple[str, str]], extra: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields (and Host, which httpx sets from the URL) plus ``extra``."""
    return _strip(headers, extra | HOST if extra else HOST)


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _map_error(exc: httpx.HTTPError, target: NormalizedURL, phase: str) -> AgentError:
    where = target.display()
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamUnreachable(f"cannot reach {where}: connection timed out")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnreachable(f"cannot reach {where}: {_reason(exc)}")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{where} did not answer in time ({phase})")
    if isinstance(exc, httpx.ProxyError | httpx.UnsupportedProtocol):
        return UpstreamUnreachable(f"cannot reach {where}: {_reason(exc)}")
    return UpstreamError(f"{where} broke HTTP while {phase}: {_reason(exc)}")


class UpstreamResponse(Protocol):
    """The internal API's response: status and headers now, the body as it arrives.

    ``headers`` are lower-case names with hop-by-hop fields removed; ``bytes_received`` counts
    the body bytes read so far. Two classes have this shape: :class:`agent.upstream.Response`,
    the lean client's, returned as it is (compiled: no wrapper's interpreted methods on each
    request), and :class:`_HttpxResponse`.
    """

    status: int
    headers: list[tuple[str, str]]

    @property
    def bytes_received(self) -> int: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body exactly as sent (content codings intact), chunk by chunk."""
        ...

    async def next_chunk(self) -> bytes | None:
        """The next body chunk, or None at the end (:meth:`aiter_bytes`, one at a time)."""
        ...

    @property
    def body_ready(self) -> bool:
        """True when the first body chunk (or the body's end) can be read without waiting."""
        ...

    async def aclose(self) -> None: ...


class _HttpxResponse(UpstreamResponse):
    """A response read by httpx; its errors are mapped here."""

    def __init__(
        self,
        response: httpx.Response,
        target: NormalizedURL,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._response = response
        self._target = target
        self._on_close = on_close
        self.status = response.status_code
        raw = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in response.headers.raw
        ]
        self.headers = strip_hop_by_hop(raw)
        self._received = 0

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def body_ready(self) -> bool:
        return False

    async def next_chunk(self) -> bytes | None:
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = aiter(self.aiter_bytes())
        return await anext(chunks, None)

    _chunks: AsyncIterator[bytes] | None = None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self._response.is_stream_consumed:
            # A transport that read the body already (httpx.MockTransport, an ASGI app) has it
            # in memory; there is nothing left to stream.
            content = self._response.content
            self._received += len(content)
            if content:
                yield content
            return
        try:
            async for chunk in self._response.aiter_raw():
                if chunk:
                    self._received += len(chunk)
                    yield chunk
        except httpx.HTTPError as exc:
            raise _map_error(exc, self._target, "sending the response body") from exc

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                await on_close()


class _CountingBody:
    """Feeds the request body to the client and counts it, without holding more than one chunk.

    Bytes sent up are counted here; bytes coming down are counted by the dispatcher as it
    writes them to the tunnel.
    """

    def __init__(self, first: bytes | memoryview, rest: AsyncIterator[bytes | memoryview]) -> None:
        self._first = first
        self._rest = rest
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        chunk: bytes | memoryview | None = self._first
        while chunk is not None:
            if chunk:
                self.sent += len(chunk)
                _BYTES_UP.inc(len(chunk))
                yield chunk
            chunk = await anext(self._rest, None)


class _AsBytes:
    """A :class:`_CountingBody` as httpx takes it: ``bytes`` chunks (a bulk chunk from the
    tunnel is a view of its message, which the lean client writes as it is)."""

    def __init__(self, body: _CountingBody) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield bytes(chunk)  # a bytes chunk is returned as it is, not copied


def _ssl_context(cfg: AgentConfig) -> ssl.SSLContext | bool:
    if not cfg.upstream.verify:
        return False
    ctx = ssl.create_default_context()
    if cfg.upstream.ca_file is not None:
        # Added to the system CAs: internal APIs usually chain to a corporate root.
        ctx.load_verify_locations(cafile=str(cfg.upstream.ca_file))
    return ctx


def _lean_ssl_context(cfg: AgentConfig) -> ssl.SSLContext:
    """The same trust decision as :func:`_ssl_context`, as a context the lean client can use."""
    verified = _ssl_context(cfg)
    if isinstance(verified, ssl.SSLContext):
        ctx = verified
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    # Offer HTTP/1.1 only (RFC 7301), as httpx does without HTTP/2.
    ctx.set_alpn_protocols(["http/1.1"])
    return direct_records(ctx)


_POOL_SHARDS = 8


class Executor:
    """Performs upstream calls for streams; one instance per agent process."""

    def __init__(
        self,
        config: AgentConfig,
        policy: Policy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.policy = policy if policy is not None else Policy(config.allow)
        up = config.upstream
        # httpcore scans every pooled connection on each request (a poll() per idle one), so
        # one pool of 64 busy connections costs more than the request itself; several small
        # pools, used in turn, keep that scan short. An injected transport means one pool.
        shards = 1 if transport is not None else _POOL_SHARDS
        per_shard = max(1, up.max_connections // shards)
        self._clients = [self._new_client(config, per_shard, transport) for _ in range(shards)]
        self._turn = itertools.cycle(self._clients)
        # An injected transport stands for the network in unit tests: then httpx does it all.
        self._lean: upstream.Client | None = None
        #: The lean client's common case, compiled: start() tries it first, as the dispatcher
        #: does before start_general().
        self.lean_path: LeanPath | None = None
        if transport is None:
            self._lean = upstream.Client(
                ssl_context=_lean_ssl_context(config),
                connect_timeout=up.connect_timeout_seconds,
                max_connections=up.max_connections,
            )
            self.lean_path = LeanPath(self._lean, self.policy)
        # Windows auth has its own connections, one credential per connection (agent.winpool).
        apply_kerberos_environment(config.kerberos)
        self._windows = WindowsPool(
            _ssl_context(config),
            max_lanes=min(up.max_connections, 16),
            delegate=config.kerberos.delegate,
            transport_factory=(lambda: transport) if transport is not None else None,
        )

    @staticmethod
    def _new_client(
        config: AgentConfig, connections: int, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncClient:
        up = config.upstream
        client = httpx.AsyncClient(
            http2=False,
            verify=_ssl_context(config),
            limits=httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=min(connections, 32),
            ),
            timeout=httpx.Timeout(up.default_timeout_seconds, connect=up.connect_timeout_seconds),
            follow_redirects=False,
            trust_env=False,
            cookies=_no_cookies(),
            transport=transport,
        )
        # httpx adds Accept, Accept-Encoding and Connection by default; the caller's own
        # headers must reach the API unchanged (an Accept-Encoding it did not send would make
        # the API compress a body the caller cannot decode, since bodies pass through raw).
        for name in list(client.headers):
            del client.headers[name]
        client.headers["user-agent"] = USER_AGENT
        return client

    async def aclose(self) -> None:
        if self._lean is not None:
            await self._lean.aclose()
        for client in self._clients:
            await client.aclose()
        await self._windows.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def check_target(
        self, head: RequestHead, allowed: NormalizedURL | None = None
    ) -> NormalizedURL:
        """Allow-list and base-URL checks; return the normalized target. ``allowed``: the
        target as :meth:`Policy.allowed_without_dns` already found it allowed."""
        target = allowed if allowed is not None else await self.policy.check_async(head.url)
        try:
            base = normalize_url(head.base_url)
        except TargetDenied:
            raise TargetDenied(
                f"connection {head.connection_id} has an unusable base URL"
            ) from None
        if not is_under(target, base):
            raise TargetDenied(
                f"target {target.display()} is outside the base URL {base.display()} "
                f"of connection {head.connection_id}"
            )
        return target

    async def start(
        self,
        head: RequestHead,
        credentials: Mapping[str, Any],
        body: AsyncIterator[bytes | memoryview],
        *,
        has_body: bool = True,
    ) -> UpstreamResponse:
        """Send the request and return once the response headers are in.

        ``head.timeout_ms`` bounds everything up to the response headers (DNS check, upload,
        connect, waiting); while the body streams it is the longest silence allowed between
        two reads. ``has_body`` False says ``body`` ends at once.
        """
        if self.lean_path is not None and not has_body:
            reply = await self.lean_path.start(head, credentials)  # the common case
            if reply is not None:
                return reply
        return await self.start_general(head, credentials, body, has_body=has_body)

    async def start_general(
        self,
        head: RequestHead,
        credentials: Mapping[str, Any],
        body: AsyncIterator[bytes | memoryview],
        *,
        has_body: bool = True,
    ) -> UpstreamResponse:
        """:meth:`start` without trying :attr:`lean_path` first: for the dispatcher, which
        tried it already (in compiled code, without this method's frames)."""
        deadline = head.timeout_seconds
        up = self.config.upstream
        target: NormalizedURL | None = None
        release: Callable[[], Awaitable[None]] | None = None
        lean = self.lean_path
        # What comes before the lean client is bounded here: a DNS check of the target and the
        # request body's first chunk.
        try:
            async with asyncio.timeout(deadline):
                target = await self.check_target(head)
                headers = _strip(list(head.headers), REQUEST_DROP)
                applied = apply_credentials(
                    head.auth, credentials, target.query, headers, head.connection_id
                )
                first = await anext(body, None) if has_body else None
                content: _CountingBody | None = None
                if first is not None:
                    content = _CountingBody(first, body)
                if head.auth.type != "windows" and applied.auth is None and lean is not None:
                    return await lean.send(
                        head, target, applied, aiter(content) if content is not None else None
                    )
                # httpx from here on: its URL, byte headers and timeouts.
                url = target.display() + (f"?{applied.query}" if applied.query else "")
                raw_headers = [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in applied.headers
                ]
                timeout = httpx.Timeout(
                    deadline, connect=min(up.connect_timeout_seconds, deadline), pool=deadline
                )
                if head.auth.type == "windows":
                    response, release = await self._windows.send(
                        head.auth,
                        credentials,
                        head.connection_id,
                        head.method,
                        url,
                        raw_headers,
                        _AsBytes(content) if content is not None else None,
                        timeout,
                    )
                else:
                    client = next(self._turn)
                    request = client.build_request(
                        head.method,
                        url,
                        headers=raw_headers,
                        content=_AsBytes(content) if content is not None else None,
                        timeout=timeout,
                    )
                    response = await client.send(
                        request, stream=True, auth=applied.auth, follow_redirects=False
                    )
        except TimeoutError:
            where = target.display() if target is not None else "the target"
            raise UpstreamTimeout(
                f"{where} did not answer within the {head.timeout_ms} ms deadline"
            ) from None
        except (httpx.LocalProtocolError, h11.LocalProtocolError) as exc:
            # Raised while writing the request, e.g. a body longer or shorter than the
            # Content-Length the caller declared (RFC 9112 §6.3).
            raise BadRequestHead(f"request could not be sent as given: {_reason(exc)}") from exc
        except httpx.InvalidURL:
            raise TargetDenied(
                f"target of connection {head.connection_id} is not a valid URL"
            ) from None
        except httpx.HTTPError as exc:
            assert target is not None
            raise _map_error(exc, target, "sending the request") from exc
        return _HttpxResponse(response, target, release)
