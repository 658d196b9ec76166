"""``ANY /v1/connections/{id}/invoke/{path}``: authorize the caller, pick a member of the
connector's gateway, and stream the request through its tunnel and the response back.

Headers: hop-by-hop fields (RFC 9110 §7.6.1) and the caller's own ``Authorization``,
``Cookie`` and ``Proxy-Authorization`` are never forwarded — they identify the caller to
the relay, not to the internal API. The path is checked on the *raw* request target, before
any decoding, so ``..``, ``%2e%2e`` and encoded slashes can't climb above the base path.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote

import structlog
from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from backhaul import compact_json
from backhaul.aio.tunnel import StreamError, TransportClosed, TunnelStream
from backhaul.headers import strip_hop_by_hop
from backhaul.keys import b64e
from backhaul.tallies import Tallies, Tally, Timing
from backhaul.wire import ErrorCode, StreamUnavailable
from relay import audit, limits, metrics, online
from relay import plan as invoke_plan
from relay.balancing import RoundRobin, Thresholds, choose
from relay.cache import ReadCache, lookup
from relay.forward import FORWARDED_HEADER, ForwardFailed, forward
from relay.headers import (
    has_request_header,
    raw_response_headers,
    request_header,
    request_header_items,
)
from relay.hub import Hub, LiveTunnel
from relay.identity import CurrentUser
from relay.locations import invoke_prefix, public_location
from relay.problems import ProblemError
from relay.registry import Registry
from relay.store import queries
from relay.store.queries import InvokeTarget

log = structlog.get_logger("backhaul.relay.invoke")

METHODS: list[str] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CALLER_ONLY = frozenset({"authorization", "cookie", "host", "x-backhaul-timeout"})
TIMEOUT_HEADER = "x-backhaul-timeout"
_TIMEOUT_FIELD = TIMEOUT_HEADER.encode()
_FORWARDED_FIELD = FORWARDED_HEADER.encode()
_REASON = re.compile(r"^\[([a-z_]{1,40})\] (.+)$", re.DOTALL)
_FORBIDDEN_RAW = re.compile(rb"%(2f|5c|00)|\\", re.IGNORECASE)

#: How each reset code reaches the caller: (status, title).
_RESET_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.TARGET_DENIED: (502, "Target not allowed"),
    ErrorCode.UPSTREAM_UNREACHABLE: (502, "Internal API unreachable"),
    ErrorCode.UPSTREAM_ERROR: (502, "Internal API error"),
    ErrorCode.CREDENTIALS_INVALID: (502, "Credentials unusable"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "Gateway timeout"),
    ErrorCode.BAD_REQUEST: (400, "Bad request"),
    ErrorCode.UPSTREAM_AUTH_FAILED: (502, "Upstream authentication failed"),
    ErrorCode.HEADERS_TOO_LARGE: (431, "Request header fields too large"),
    ErrorCode.REFUSED_STREAM: (503, "Gateway busy"),
    ErrorCode.CANCEL: (502, "Gateway member lost"),
}


def _problem_for(exc: StreamError) -> ProblemError:
    status, title = _RESET_STATUS.get(exc.code, (502, "Bad gateway"))
    detail = exc.reason or f"the agent reset the request ({exc.code.name})"
    # "[wrong_password] ..." from the agent's Windows auth: the slug becomes ``reason``.
    found = _REASON.match(detail) if exc.code is ErrorCode.UPSTREAM_AUTH_FAILED else None
    if found is not None:
        return ProblemError(status, title, found[2], extra={"reason": found[1]})
    return ProblemError(status, title, detail)


def _sub_path(request: Request, connection_id: str) -> str:
    """The raw path under the connector's base URL, refused if it could climb out."""
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    prefix = invoke_prefix("", connection_id).encode()
    if not raw.startswith(prefix):
        raise ProblemError(400, "Bad request", "the invoke path could not be parsed")
    tail = raw[len(prefix) :].lstrip(b"/")
    if _FORBIDDEN_RAW.search(tail):
        raise ProblemError(400, "Bad request", "encoded slashes, backslashes and NUL are refused")
    text = tail.decode("latin-1")
    # unquote() is Python code; without a "%" it returns its argument as it is.
    once = unquote(text) if "%" in text else text
    for segment in once.split("/"):
        if segment in (".", "..") or ("%" in segment and unquote(segment) in (".", "..")):
            raise ProblemError(400, "Bad request", "the path may not climb above the base URL")
    lowered = once.lower()
    if "%2e" in lowered or "%2f" in lowered:
        raise ProblemError(400, "Bad request", "doubly encoded path segments are refused")
    return text


#: (connection, caller) → InvokeTarget or the ProblemError to answer; see relay.cache.
_TARGETS = ReadCache()


async def _target(
    request: Request, connection_id: str, user_id: str, is_admin: bool
) -> InvokeTarget:
    """The connection's routing facts for this caller, from the cache when the store is
    unchanged since they were read."""
    return await lookup(
        _TARGETS,
        (connection_id, user_id, is_admin),
        lambda session: queries.invoke_target(session, connection_id, user_id, is_admin),
        request.scope["app"].state.db,
    )


def _deadline(request: Request) -> float:
    config = request.scope["app"].state.config
    maximum = float(config.invoke_timeout_max_seconds)
    default = min(float(config.invoke_timeout_seconds), maximum)
    raw = request_header(request.scope, _TIMEOUT_FIELD)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ProblemError(400, "Bad request", "X-Backhaul-Timeout must be seconds") from None
    if not 0 < value < float("inf"):
        raise ProblemError(400, "Bad request", "X-Backhaul-Timeout must be positive")
    return min(value, maximum)


def _forward_headers(request: Request) -> list[list[str]]:
    pairs = [(name.lower(), value) for name, value in request_header_items(request.scope)]
    return [[name, value] for name, value in strip_hop_by_hop(pairs, CALLER_ONLY)]


def _has_body(request: Request) -> bool:
    length = request_header(request.scope, b"content-length")
    if length is not None:
        return length.strip() != "0"
    return has_request_header(request.scope, b"transfer-encoding")


_REQUESTS = Tallies(metrics.REQUESTS)
_SECONDS = Timing(metrics.REQUEST_SECONDS)


async def invoke(connection_id: str, request: Request, user: CurrentUser) -> Response:
    """The invoke operation. The sub-path is read from the raw request target
    (:func:`_sub_path`), never from the decoded form routing gives."""
    started = time.monotonic()
    try:
        response = await _invoke(connection_id, request, user.id, user.is_admin, started)
    except ProblemError as exc:
        _REQUESTS(str(exc.status)).inc()
        log.info(
            "invoke.refused", connection_id=connection_id, status=exc.status, detail=exc.detail
        )
        await audit.invoke_refused(request, user, connection_id, exc.status, exc.detail)
        raise exc  # named: see tests/test_compiled_rules.py
    _REQUESTS(str(response.status_code)).inc()
    _SECONDS.observe(time.monotonic() - started)
    return audit.track_invoke(request, user, connection_id, response)


async def _invoke(
    connection_id: str, request: Request, user_id: str, is_admin: bool, started: float
) -> Response:
    sub_path = _sub_path(request, connection_id)
    deadline = _deadline(request)
    target = await _target(request, connection_id, user_id, is_admin)
    rate_limits: limits.Limits | None = getattr(request.scope["app"].state, "limits", None)
    if rate_limits is not None and rate_limits.active:
        rate_limits.admit(request, target.connection_id)  # 429 past a rate limit
    plan = await invoke_plan.for_target(request, target)
    if target.gateway_id is None:
        headers = _forward_headers(request)
        return await online.invoke(request, target, plan, sub_path, headers, deadline, started)
    query = request.scope.get("query_string", b"").decode("latin-1")
    parts = plan.rewrite(request.scope["method"], sub_path, query, _forward_headers(request))
    # The request's own fields, then the connection's, which are the same on every invoke:
    # encoded once (about 1.8 KiB, most of it the sealed blob), and sent once per
    # tunnel while the agent keeps them in a head slot (Connection.open_stream).
    head = compact_json.dumps(
        {
            "method": parts.method,
            "url": parts.url,
            "headers": parts.headers,
            "timeout_ms": int(deadline * 1000),
        }
    ).encode()
    fixed = _connection_fields(target, plan)
    prefix = invoke_prefix(request.scope.get("root_path", ""), target.connection_id)
    url, base_url = parts.url, plan.base_url

    def relocate(value: str) -> str:
        return public_location(value, url, base_url, prefix)

    return await _through_gateway(request, target, head, fixed, deadline, started, relocate)


async def _through_gateway(
    request: Request,
    target: InvokeTarget,
    head: bytes,
    fixed: bytes,
    deadline: float,
    started: float,
    relocate: Callable[[str], str],
) -> Response:
    """Pick a member by the gateway's policy and exchange the request with it; refused
    requests move to another member, a lost member's GET/HEAD is retried once, and with no
    member here the request is forwarded to the relay instance that has one."""
    assert target.gateway_id is not None
    hub: Hub = request.scope["app"].state.hub
    has_body = _has_body(request)
    # A small body is read first, so a request refused by a draining member can be replayed
    # on another one: that is what makes a rolling restart lose nothing.
    buffered = await _small_body(request) if has_body else None
    replayable = not has_body or buffered is not None
    thresholds = Thresholds(target.cpu_threshold, target.memory_threshold)
    idempotent = request.scope["method"] in ("GET", "HEAD") and not has_body
    tried: set[str] = set()
    retried = False
    lost: ProblemError | None = None
    while True:
        live = hub.pick(target.gateway_id, frozenset(tried), target.load_balancing, thresholds)
        if live is None and lost is not None:
            raise lost  # no other member to retry on: the original failure stands
        if live is None and not tried and not has_request_header(request.scope, _FORWARDED_FIELD):
            forwarded = await _forward_elsewhere(request, target, thresholds)
            if forwarded is not None:
                return forwarded
        if live is None:
            detail = f"no member of gateway {target.gateway_id} is online"
            if tried:
                detail = f"every online member of gateway {target.gateway_id} refused the request"
            raise ProblemError(503, "Gateway offline", detail, {"Retry-After": "5"})
        tried.add(live.member_id)
        try:
            return await _exchange(
                live, head, fixed, request, has_body, buffered, deadline, started, relocate
            )
        except StreamError as exc:
            if exc.code is ErrorCode.REFUSED_STREAM and replayable:
                continue  # never processed: safe to try another member
            if exc.code is ErrorCode.CANCEL and live.tunnel.closed and idempotent and not retried:
                # The member died before the response started: a GET or HEAD is retried once.
                retried = True
                lost = _problem_for(exc)
                log.info("invoke.retry", member_id=live.member_id, reason=exc.reason)
                continue
            raise _problem_for(exc) from None
        except StreamUnavailable:
            continue


async def _forward_elsewhere(
    request: Request, target: InvokeTarget, thresholds: Thresholds
) -> Response | None:
    """No member here: stream the request to an instance that holds one (scale-out)."""
    registry: Registry = request.scope["app"].state.registry
    gateway_id = target.gateway_id
    if not registry.shared or gateway_id is None:
        return None
    candidates = [
        m for m in await registry.remote_members(gateway_id) if not (m.disabled or m.draining)
    ]
    while candidates:
        member = choose(candidates, target.load_balancing, thresholds, gateway_id, _REMOTE_ROTATION)
        assert member is not None
        try:
            return await forward(
                request.scope["app"].state.peers, member, request, registry.instance_id
            )
        except ForwardFailed as exc:
            log.warning("invoke.forward_failed", instance_id=member.instance_id, error=str(exc))
            registry.mark_dead(member.instance_id)
            candidates = [m for m in candidates if m.instance_id != member.instance_id]
    return None


_REMOTE_ROTATION = RoundRobin()


async def _exchange(
    live: LiveTunnel,
    head: bytes,
    fixed: bytes,
    request: Request,
    has_body: bool,
    buffered: bytes | None,
    deadline: float,
    started: float,
    relocate: Callable[[str], str],
) -> Response:
    stream = await live.tunnel.open_stream(head, not has_body, fixed)
    live.total += 1
    pump = None
    if buffered is not None:
        pump = asyncio.create_task(_send_buffered(stream, buffered))
    elif has_body:
        pump = asyncio.create_task(_pump_request(stream, request))
    try:
        remaining = max(0.0, deadline - (time.monotonic() - started))
        try:
            response_head = await stream.response(remaining + 0.5)
        except TimeoutError:
            await stream.reset(ErrorCode.DEADLINE_EXCEEDED, "deadline passed")
            raise ProblemError(
                504, "Gateway timeout", f"no response from the internal API within {deadline:g}s"
            ) from None
    except BaseException as abandoned:
        if pump is not None:
            pump.cancel()
        await stream.reset(ErrorCode.CANCEL, "request abandoned")
        raise abandoned  # named: see tests/test_compiled_rules.py
    status = int(response_head.get("status", 502))
    headers = raw_response_headers(
        ((str(k), str(v)) for k, v in response_head.get("headers", [])), relocate=relocate
    )
    return TunnelResponse(stream, pump, request.scope["method"] == "HEAD", status, headers)


#: (target, plan) → the OPEN head's connection fields, a JSON object encoded. The entry keeps
#: both objects: an id is only reused once its object is gone, and then the identity check
#: fails. The same bytes object on every request: its hash is computed once, for the
#: tunnel's head slots.
_FIELDS: dict[tuple[int, int], tuple[InvokeTarget, invoke_plan.Plan, bytes]] = {}


def _connection_fields(target: InvokeTarget, plan: invoke_plan.Plan) -> bytes:
    key = (id(target), id(plan))
    found = _FIELDS.get(key)
    if found is not None and found[0] is target and found[1] is plan:
        return found[2]
    fields = {
        "connection_id": target.connection_id,
        "base_url": plan.base_url,
        "auth": plan.auth_spec(),
        "suite": target.seal_suite,
        "sealed": b64e(target.sealed_credentials),
        "key_version": target.key_version,
    }
    text = compact_json.dumps(fields).encode()
    if len(_FIELDS) >= 4096:
        _FIELDS.clear()
    _FIELDS[key] = (target, plan, text)
    return text


_BYTES_REQUEST = Tally(metrics.BYTES.labels(direction="request"))
_BYTES_RESPONSE = Tally(metrics.BYTES.labels(direction="response"))

#: Bodies up to this size are buffered (and so replayable); larger ones stream.
REPLAY_LIMIT = 64 * 1024


async def _small_body(request: Request) -> bytes | None:
    length = request_header(request.scope, b"content-length") or ""
    if not length.isdigit() or int(length) > REPLAY_LIMIT:
        return None
    return await request.body()


async def _send_buffered(stream: TunnelStream, body: bytes) -> None:
    try:
        if body:
            _BYTES_REQUEST.inc(len(body))
            await stream.write(body)
        await stream.end()
    except (StreamError, TransportClosed):
        return


async def _pump_request(stream: TunnelStream, request: Request) -> None:
    try:
        async for chunk in request.stream():
            if chunk:
                _BYTES_REQUEST.inc(len(chunk))
                await stream.write(chunk)
        await stream.end()
    except (StreamError, TransportClosed):
        return
    except Exception as exc:  # the caller went away mid-upload
        log.info("invoke.upload_aborted", error=type(exc).__name__)
        await stream.reset(ErrorCode.CANCEL, "caller aborted the upload")


class BodySink(Protocol):
    """Where a tunnel answer goes: an ASGI ``send`` (:class:`AsgiSink`), or the caller's
    connection itself (:class:`relay.edge.DirectReply`)."""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def body(self, data: bytes | memoryview, more: bool) -> None: ...


class AsgiSink:
    """A :class:`BodySink` over an ASGI ``send``."""

    __slots__ = ("send",)

    def __init__(self, send: Send) -> None:
        self.send = send

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        # The ASGI server writes a Date of its own in front of these; Date is a singleton
        # (RFC 9110 §6.6.1), so on this path the server's stands for the API's.
        headers = [(name, value) for name, value in headers if name != b"date"]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes | memoryview, more: bool) -> None:
        # ASGI bodies are bytes: a view of a tunnel message is copied here, on this path only.
        await self.send({"type": "http.response.body", "body": bytes(data), "more_body": more})


class TunnelResponse(Response):
    """Streams the agent's response body to the caller.

    Starlette's StreamingResponse runs a task group per response just to notice a caller
    that hangs up; here a watcher starts only once a body turns out to span several chunks
    (and the request body is fully read, so the two never share ``receive``). A one-chunk
    answer — the common case — costs no extra task at all.
    """

    def __init__(
        self,
        stream: TunnelStream,
        pump: asyncio.Task[None] | None,
        is_head: bool,
        status: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.stream = stream
        self.pump = pump
        self.is_head = is_head
        self.status_code = status
        self.background = None
        self.raw_headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.status_code in (204, 304):
            # The Content-Length of a 304 describes the representation, not this message
            # (RFC 9110 §8.6); ASGI servers read it as a body they then never get.
            self.raw_headers = [(n, v) for n, v in self.raw_headers if n != b"content-length"]
        await self.deliver(AsgiSink(send), receive)

    async def deliver(self, sink: BodySink, receive: Receive) -> None:
        """The head, then the body chunks as the agent sends them; ``receive`` tells when the
        caller hangs up mid-body."""
        stream, finished = self.stream, False
        watcher: asyncio.Task[None] | None = None
        try:
            await sink.start(self.status_code, self.raw_headers)
            while True:
                chunk = await stream.read()
                if not chunk:
                    finished = True
                    await sink.body(b"", False)
                    break
                _BYTES_RESPONSE.inc(len(chunk))
                if stream.at_end:  # the common small answer: one chunk, then END
                    finished = True
                    await sink.body(b"" if self.is_head else chunk, False)
                    break
                if not self.is_head:
                    await sink.body(chunk, True)
                if watcher is None and (self.pump is None or self.pump.done()):
                    watcher = asyncio.create_task(_watch_disconnect(receive, stream))
        except StreamError as exc:
            if watcher is not None and watcher.done() and exc.code is ErrorCode.CANCEL:
                return  # the caller hung up (often right after a complete Content-Length body)
            log.warning("invoke.body_aborted", stream_id=stream.id, reason=str(exc))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.pump is not None and not self.pump.done():
                self.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.pump
            if not finished:
                await stream.reset(ErrorCode.CANCEL, "caller went away")


async def _watch_disconnect(receive: Receive, stream: TunnelStream) -> None:
    """Reset the stream when the caller hangs up mid-body, so the agent stops reading."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            await stream.reset(ErrorCode.CANCEL, "caller went away")
            return
