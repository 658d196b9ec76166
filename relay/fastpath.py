"""The invoke route without the framework's per-request machinery.

``ANY /v1/connections/{id}/invoke/{path}`` is the data path: every caller request crosses it.
FastAPI's middleware stack (body limit, telemetry, server errors, exceptions, routing,
dependency injection) and the access log cost more CPU than the relay's own work on a small
request, so :class:`RelayApp` answers invoke requests before that stack — with the same URL
and body limits (:class:`relay.limits.RequestLimits`), the same authentication and handler,
the same problem responses, and the same activity record for the admin page — and passes
everything else on. The FastAPI routes stay registered, so the OpenAPI document still lists
the invoke operation.

Agent tunnels (``/v1/tunnel``) are taken off the top too, through the same handshake cap
(:class:`relay.limits.HandshakeGate`): a tunnel lives for days, and every layer it passes
keeps a suspended frame per tunnel for all that time.

Under uvicorn's httptools protocol most invoke requests do not reach this ASGI application at
all: :mod:`relay.edge` answers them in the protocol itself, with :func:`respond` and
:func:`finish` from here. What it leaves to ASGI (URLs and bodies the limits middleware must
see, requests behind trusted proxies, in-process test clients) comes through here.

Successful invokes are not written to the request log (the audit log records every one of
them, in batches); refusals and failures are, with method, path and status, and at debug
level every invoke is.
"""

from __future__ import annotations

import logging
import time

import structlog
from fastapi import FastAPI, Request, Response, WebSocket
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import invoke, tunnel
from relay.activity import INVOKE_PATH, Activity, Outcome
from relay.callers import cached_caller
from relay.headers import bearer_token
from relay.identity import authenticate
from relay.limits import HandshakeGate, RequestLimits
from relay.problems import ProblemError, problem

log = structlog.get_logger("backhaul.relay.invoke")
#: Checked before the per-request debug line: building a log call that the level filter then
#: drops costs more than the rest of the request's bookkeeping.
_stdlib_log = logging.getLogger("backhaul.relay.invoke")

_PREFIX = "/v1/connections/"
_METHODS = frozenset(invoke.METHODS)


class RelayApp(FastAPI):
    """The relay's ASGI application: FastAPI, with invoke requests taken off the top."""

    _edge: ASGIApp | None = None
    _gate: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == tunnel.TUNNEL_PATH:
            scope["app"] = self
            gate = self._gate
            if gate is None:
                config = self.state.config
                gate = self._gate = HandshakeGate(
                    _serve_tunnel,
                    config.max_pending_handshakes,
                    config.max_pending_handshakes_per_address,
                )
            await gate(scope, receive, send)
            return
        if scope["type"] == "http" and is_invoke(scope):
            scope["app"] = self
            edge = self._edge
            if edge is None:
                config = self.state.config
                edge = self._edge = RequestLimits(
                    _answer_invoke, config.max_url_bytes, config.max_body_bytes
                )
            await edge(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _serve_tunnel(scope: Scope, receive: Receive, send: Send) -> None:
    await tunnel.tunnel_endpoint(WebSocket(scope, receive, send))


def is_invoke(scope: Scope) -> bool:
    """An invoke request (``ANY /v1/connections/{id}/invoke/...``), by method and path."""
    path: str = scope["path"]
    return (
        path.startswith(_PREFIX)
        and scope["method"] in _METHODS
        and INVOKE_PATH.match(path) is not None
    )


async def _answer_invoke(scope: Scope, receive: Receive, send: Send) -> None:
    """Authenticate, invoke, answer; record the outcome for the admin page."""
    match = INVOKE_PATH.match(scope["path"])
    assert match is not None
    connection_id = match.group(1)
    started = time.perf_counter()
    outcome = Outcome(send)
    try:
        response = await respond(Request(scope, receive), connection_id)
        await response(scope, receive, outcome.send)
    except Exception:
        log.exception("invoke.crashed", connection_id=connection_id)
        if outcome.started:
            raise
        await problem(500, "Internal Server Error", "the relay failed; see its log")(
            scope, receive, outcome.send
        )
    finally:
        finish(scope, connection_id, outcome, started)


async def respond(request: Request, connection_id: str) -> Response:
    """The invoke's answer for the caller the bearer token names, a problem included."""
    try:
        token = bearer_token(request.scope)
        # A token seen before is known without a coroutine of relay.identity's.
        user = cached_caller(token, request.scope["app"].state.engine)
        if user is None:
            user = await authenticate(request, token)
        return await invoke.invoke(connection_id, request, user)
    except ProblemError as exc:
        return exc.response()


def finish(scope: Scope, connection_id: str, outcome: Outcome, started: float) -> None:
    """An invoke has been answered: the admin page's activity record, and the request log
    line (refusals and failures; every invoke at debug level)."""
    activity: Activity = scope["app"].state.activity
    status, title, detail = outcome.summary()
    activity.record(connection_id, status, title, detail)
    level = logging.INFO if status >= 400 else logging.DEBUG
    if level == logging.INFO or _stdlib_log.isEnabledFor(level):
        log.log(
            level,
            "http request",
            method=scope["method"],
            path=scope["path"],
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
