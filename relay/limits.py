"""What the relay refuses before it spends anything on a request: the relay's edge limits.

The relay faces the internet, so every resource a client can make it hold is bounded here:

- **Request heads** (:func:`http_protocol`): a client has ``header_timeout_seconds`` from the
  first byte of a request (or from the TCP/TLS connection) to the end of its head, else
  ``408`` and the connection is closed — a slowloris client that trickles header bytes is cut
  on time, whatever its rate. A head larger than ``max_request_header_bytes`` is ``431``
  (RFC 6585 §5) before it is buffered any further. Uvicorn has neither check with its
  httptools parser, and no head timeout with either parser.
- **URLs and bodies** (:class:`RequestLimits`): an invoke URL longer than ``max_url_bytes`` is
  ``414``; an invoke body larger than ``max_body_bytes`` is ``413`` — at once when
  ``Content-Length`` says so, otherwise as soon as the streamed body crosses the limit (the
  upload to the agent is abandoned; nothing is buffered).
- **Rate** (:func:`admit`): a token bucket per API token and per connection; past it, ``429``
  with ``Retry-After`` (RFC 6585 §4). Checked after authorization, so an anonymous or
  unauthorized caller can never spend someone else's budget.
- **Unauthenticated tunnels** (:class:`HandshakeGate`): WebSocket connections to
  ``/v1/tunnel`` that have not finished the handshake are capped in total and per client
  address; past the cap the upgrade is answered ``503`` with ``Retry-After``. Each such
  session already ends after ``handshake_timeout_seconds`` (relay/tunnel.py).
- **WebSocket messages** (:data:`WS_MAX_MESSAGE`): the largest tunnel frame the relay
  accepts, so a peer cannot make it buffer 16 MiB messages it would refuse after reading
  them. uvicorn's sans-I/O WebSocket protocol stops reading after each message until the
  tunnel's reader has taken it, so no queue of messages builds up ahead of the tunnel.

Limits are per relay instance. Every refusal is an RFC 9457 problem.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backhaul.aio.deadlines import SharedTimer
from backhaul.wire import Settings
from backhaul.wire.frames import FrameType
from relay import metrics
from relay.config import RelayConfig
from relay.headers import bearer_token, url_length
from relay.problems import MEDIA_TYPE, ProblemError, problem

log = structlog.get_logger("backhaul.relay.limits")

#: The largest WebSocket message a tunnel ever carries (one frame; see docs/protocol.md).
WS_MAX_MESSAGE = Settings().max_message
#: Buckets kept per kind; the least recently used goes first (a full bucket is a new one).
MAX_BUCKETS = 100_000

_INVOKE_PREFIX = "/v1/connections/"
_INVOKE_MARK = "/invoke"


# ---------------------------------------------------------------------------- rate limits


class TokenBucket:
    """``rate`` requests per second on average, up to ``burst`` at once."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> float:
        """Spend one token; 0 when admitted, else the seconds until one is available."""
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate


class RateLimiter:
    """Token buckets keyed by a string, in a bounded LRU."""

    def __init__(self, rate: float, burst: int, size: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self._size = size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def wait(self, key: str, now: float | None = None) -> float:
        """0 when ``key`` may go now, else how many seconds it must wait."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.burst, now)
            if len(self._buckets) > self._size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(self.rate, self.burst, now)


class Limits:
    """The relay's rate limiters, built from its configuration."""

    def __init__(self, config: RelayConfig) -> None:
        self.per_token = RateLimiter(config.rate_limit_per_token, config.rate_limit_per_token_burst)
        self.per_connection = RateLimiter(
            config.rate_limit_per_connection, config.rate_limit_per_connection_burst
        )
        #: Either limiter is on (both are off unless configured): else :meth:`admit` is not
        #: called at all.
        self.active = self.per_token.enabled or self.per_connection.enabled

    def admit(self, request: Request, connection_id: str) -> None:
        """Spend one request of the caller's token and of the connection; 429 when either is
        out. Called once the caller is authenticated and allowed to use the connection."""
        # No token is hashed for a limiter that is off.
        token = _token_key(request) if self.per_token.enabled else ""
        if token and (wait := self.per_token.wait(token)):
            log.info("limits.token_rate", connection_id=connection_id, retry_after=round(wait, 3))
            raise _too_many("API token", wait)
        if self.per_connection.enabled and (wait := self.per_connection.wait(connection_id)):
            log.info(
                "limits.connection_rate", connection_id=connection_id, retry_after=round(wait, 3)
            )
            raise _too_many("connection", wait)


def _too_many(what: str, wait: float) -> ProblemError:
    seconds = max(1, math.ceil(wait))
    return ProblemError(
        429,
        "Too many requests",
        f"the rate limit of this {what} is exhausted; retry in {seconds}s",
        {"Retry-After": str(seconds)},
    )


def _token_key(request: Request) -> str:
    token = bearer_token(request.scope)
    # A hash, so that no token sits in memory longer than its request needs it.
    return hashlib.sha256(token.encode()).hexdigest() if token is not None else ""


# ---------------------------------------------------------------------------- URLs and bodies


class BodyTooLarge(Exception):
    """The caller's streamed body crossed ``max_body_bytes``."""


def _is_invoke(path: str) -> bool:
    return path.startswith(_INVOKE_PREFIX) and _INVOKE_MARK in path[len(_INVOKE_PREFIX) :]


class RequestLimits:
    """Pure ASGI middleware: URL length (414) and body size (413) of invoke requests."""

    def __init__(self, app: ASGIApp, max_url_bytes: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_url = max_url_bytes
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_invoke(scope["path"]):
            await self.app(scope, receive, send)
            return
        if url_length(scope) > self.max_url:
            detail = f"the request URL exceeds {self.max_url} bytes"
            await problem(414, "URI too long", detail)(scope, receive, send)
            return
        if not self.max_body:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await _body_refusal(self.max_body)(scope, receive, send)
            return
        await self._streamed(scope, receive, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No (trusted) length: count the body as it streams, and refuse it once too long."""
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    exceeded = True
                    raise BodyTooLarge(f"request body exceeds {self.max_body} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to an abandoned upload is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass
        if exceeded and not started:
            log.info("limits.body_too_large", path=scope["path"], limit=self.max_body)
            await _body_refusal(self.max_body)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def _body_refusal(limit: int) -> JSONResponse:
    # ``Connection: close``: the rest of the body is never read.
    return problem(
        413,
        "Content too large",
        f"the request body exceeds the relay's limit of {limit} bytes",
        {"Connection": "close"},
    )


# ---------------------------------------------------------------------------- tunnel handshakes


class HandshakeGate:
    """Wraps the ``/v1/tunnel`` endpoint (relay.fastpath.RelayApp routes only tunnel
    sessions here), capping the sessions that have not finished the handshake, in total and
    per client address.

    A session holds its slot from the upgrade until the relay sends WELCOME (the handshake
    succeeded) or closes the WebSocket (it failed or timed out), whichever comes first.
    """

    def __init__(self, app: ASGIApp, total: int, per_address: int) -> None:
        self.app = app
        self.total = total
        self.per_address = per_address
        self.pending = 0
        self.by_address: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        address = str(client[0]) if client else "?"
        refused = self._refusal(address)
        if refused is not None:
            metrics.HANDSHAKES_REFUSED.labels(scope=refused).inc()
            log.warning(
                "limits.handshakes_full",
                client=address,
                scope=refused,
                pending=self.pending,
                total=self.total,
            )
            await _deny_upgrade(scope, receive, send)
            return
        with self._slot(address) as release:

            async def releasing_send(message: Message) -> None:
                if message["type"] == "websocket.close" or (
                    message["type"] == "websocket.send"
                    and (message.get("bytes") or b"")[:1] == bytes([FrameType.WELCOME])
                ):
                    release()
                await send(message)

            await self.app(scope, receive, releasing_send)

    def _refusal(self, address: str) -> str | None:
        """Which cap a new session from ``address`` would exceed ("total", "address"), if any."""
        if self.per_address and self.by_address.get(address, 0) >= self.per_address:
            return "address"
        if self.pending >= self.total:
            return "total"
        return None

    @contextmanager
    def _slot(self, address: str) -> Iterator[Any]:
        self.pending += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.pending -= 1
                left = self.by_address[address] - 1
                if left:
                    self.by_address[address] = left
                else:
                    del self.by_address[address]

        try:
            yield release
        finally:
            release()


async def _deny_upgrade(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse the upgrade with a 503 problem (ASGI WebSocket Denial Response extension)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1013, "reason": "try again later"})
        return
    body = json.dumps(
        {
            "type": "urn:backhaul:problem:tunnel-handshakes-full",
            "title": "Tunnel handshakes full",
            "status": 503,
            "detail": "too many tunnel handshakes in progress; retry later",
        }
    ).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", MEDIA_TYPE.encode()),
                (b"retry-after", b"1"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


# ---------------------------------------------------------------------------- request heads


def _raw_problem(status: int, phrase: str, detail: str) -> bytes:
    body = json.dumps(
        {
            "type": "urn:backhaul:problem:" + phrase.lower().replace(" ", "-"),
            "title": phrase,
            "status": status,
            "detail": detail,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {MEDIA_TYPE}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeadTooLarge(Exception):
    """Raised from a parser callback once a head is over ``max_request_header_bytes``."""


def time_out_head(transport: asyncio.WriteTransport, client: Any, seconds: float) -> None:
    """A head did not arrive on time: ``408`` and the connection is closed."""
    log.info("limits.head_timeout", client=_client(client), seconds=seconds)
    detail = f"the request head did not arrive within {seconds:g}s"
    transport.write(_raw_problem(408, "Request Timeout", detail))
    transport.close()


def refuse_head(transport: asyncio.WriteTransport, client: Any, limit: int) -> None:
    """A head is too large: ``431`` and the connection is closed."""
    log.info("limits.head_too_large", client=_client(client), limit=limit)
    detail = f"the request head exceeds {limit} bytes"
    transport.write(_raw_problem(431, "Request Header Fields Too Large", detail))
    transport.close()


def _client(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


class _HeadGuard:
    """The head timeout and head size limit of the h11 protocol (relay.edge_http has the
    httptools one's)."""

    head_timeout: float = 10.0
    max_head: int = 32768
    transport: asyncio.Transport
    client: tuple[str, int] | None

    def _guard_init(self) -> None:
        self._guard_loop = asyncio.get_running_loop()
        #: When the head now arriving must be complete (loop time); None between requests.
        self._head_deadline: float | None = None
        self._head_timer = SharedTimer(self._guard_loop, self._head_due)
        self._head_bytes = 0

    def _arm(self) -> None:
        """A head has started (or goes on arriving): it must be complete by its deadline.

        One timer per connection, not one per request (SharedTimer): a head that completes
        only clears the deadline, and the timer, when it fires, checks the deadline then in
        force and sleeps again until it — keep-alive connections carry thousands of requests
        a second.
        """
        if self._head_deadline is not None or self.transport.is_closing():
            return
        self._head_deadline = deadline = self._guard_loop.time() + self.head_timeout
        self._head_timer.ensure(deadline)

    def _disarm(self) -> None:
        self._head_deadline = None
        self._head_bytes = 0

    def _guard_stop(self) -> None:
        """For good: the connection is lost or has become a tunnel. The timer lets go of
        this object (SharedTimer.close), which would otherwise be a reference cycle."""
        self._disarm()
        self._head_timer.close()

    def _head_due(self, now: float) -> float | None:
        deadline = self._head_deadline
        if deadline is None:
            return None  # no head arriving; the next one arms the timer again
        if now < deadline:
            return deadline
        self._head_deadline = None
        if not self.transport.is_closing():
            time_out_head(self.transport, self.client, self.head_timeout)
        return None


def _h11_guard() -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11HeadGuard(_HeadGuard, H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._guard_init()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_stop()
            super().connection_lost(exc)
            # The request cycle's on_response is a cycle back to this object, as in
            # relay.edge_http's connection_lost.
            self.cycle = None  # type: ignore[assignment]

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            self._guard_stop()  # as for httptools: a tunnel needs no head timer
            super().handle_websocket_upgrade(event)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                # h11 bounds only an *incomplete* head; a whole oversized one arriving at
                # once would pass, so measure the head here, before h11 parses it.
                buffered = self.conn.trailing_data[0] + data
                end = buffered.find(b"\r\n\r\n")
                self._head_bytes = end + 4 if end >= 0 else len(buffered)
                if self._head_bytes > self.max_head:
                    self._disarm()
                    refuse_head(self.transport, self.client, self.max_head)
                    return
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def send_400_response(self, msg: str) -> None:
            if self._head_bytes > self.max_head:
                refuse_head(self.transport, self.client, self.max_head)
            else:
                super().send_400_response(msg)

    return H11HeadGuard


def http_protocol(
    config: RelayConfig, parser: str = "auto", app: Any = None
) -> Callable[..., asyncio.Protocol]:
    """The relay's HTTP protocol (what uvicorn calls to make one per connection), with its
    head timeout and head size limit: httptools when installed, as uvicorn's ``auto``
    (:mod:`relay.edge_http`), else h11. Given the relay's ``app``, the httptools one answers
    invoke requests below ASGI (:mod:`relay.edge`), unless forwarded headers are believed
    from trusted proxies (uvicorn's middleware for them is ASGI)."""
    head_timeout = float(config.header_timeout_seconds)
    max_head = int(config.max_request_header_bytes)
    if parser in ("auto", "httptools") and importlib.util.find_spec("httptools") is not None:
        from relay.edge_http import EdgeHttpProtocol, EdgeSettings  # relay.edge builds on this

        settings = EdgeSettings(head_timeout, max_head)
        if app is not None and not config.trusted_proxies:
            settings.direct_app = app
            settings.max_url = config.max_url_bytes
            settings.max_body = config.max_body_bytes
        return functools.partial(EdgeHttpProtocol, edge=settings)
    if parser == "httptools":
        raise RuntimeError("httptools is not installed")
    attrs = {"head_timeout": head_timeout, "max_head": max_head}
    return type("RelayHttpProtocol", (_h11_guard(),), attrs)


# ---------------------------------------------------------------------------- wiring


def install(app: FastAPI) -> None:
    """Add the limit middlewares (call where the access log will wrap them). The handshake
    cap wraps the tunnel endpoint in :class:`relay.fastpath.RelayApp` instead."""
    config: RelayConfig = app.state.config
    app.state.limits = Limits(config)
    app.add_middleware(
        RequestLimits, max_url_bytes=config.max_url_bytes, max_body_bytes=config.max_body_bytes
    )
