"""Invoking an online connector: the relay itself calls the API, no gateway involved.

The request is the caller's, after the same header filtering as the gateway path and the
connector's policies (:mod:`relay.plan`), with the connection's credentials applied last:
Basic, an API key (header or query), or an OAuth 2.0 bearer token. Both bodies stream through
one pooled httpx client (:mod:`relay.egress`), which also refuses private destinations.

OAuth: the access token is fetched (and refreshed if it is about to expire) once, before the
request is sent; the response body then streams for as long as it takes, whatever the
token's lifetime. When the API answers 401, the relay refreshes the token once and repeats
the request once — only when it can: a request without a body, or one small enough to have
been buffered (``RETRY_BUFFER_BYTES``); a streamed upload cannot be replayed and its 401 is
passed on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import httpx
import structlog
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from relay import audit, credentials, egress, metrics
from relay.headers import response_headers
from relay.locations import invoke_prefix, public_location
from relay.oauth.client import ConsentRequired, OAuthError
from relay.oauth.tokens import Tokens
from relay.plan import Plan
from relay.problems import ProblemError
from relay.request_parts import RequestParts
from relay.store.queries import InvokeTarget

log = structlog.get_logger("backhaul.relay.online")

#: Bodies up to this size are buffered so a 401 can be retried after a token refresh.
RETRY_BUFFER_BYTES = 1024 * 1024


def consent_problem(exc: ConsentRequired) -> ProblemError:
    return ProblemError(409, "Consent required", str(exc))


def tokens_for(request: Request) -> Tokens:
    state = request.app.state
    found: Tokens | None = getattr(state, "oauth_tokens", None)
    if found is None:
        found = Tokens(state.config, state.db, egress.client(state, state.config))
        state.oauth_tokens = found
    return found


def _with_credentials(
    parts: RequestParts, plan: Plan, creds: dict[str, Any], token: str | None
) -> tuple[str, list[tuple[str, str]]]:
    """The URL and headers with the connection's credentials, replacing any same-named."""
    headers = list(parts.headers)
    url = parts.url
    if plan.auth_type == "basic":
        raw = f"{creds.get('username', '')}:{creds.get('password', '')}".encode()
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        headers.append(("authorization", "Basic " + base64.b64encode(raw).decode("ascii")))
    elif plan.auth_type == "api_key" and plan.api_key_name:
        key = str(creds.get("api_key", ""))
        if plan.api_key_in == "query":
            pairs = [
                (k, v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if k != plan.api_key_name
            ]
            pairs.append((plan.api_key_name, key))
            query = urlencode(pairs, quote_via=quote, safe="")
            url = parts.base_url + parts.path + "?" + query
        else:
            name = plan.api_key_name.lower()
            headers = [(k, v) for k, v in headers if k.lower() != name]
            headers.append((name, key))
    elif plan.auth_type == "oauth2" and token is not None:
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        headers.append(("authorization", f"Bearer {token}"))
    return url, headers


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() != "0"
    return "transfer-encoding" in request.headers


async def _stream_request(request: Request) -> AsyncIterator[bytes]:
    request.scope[audit.BYTES_IN_KEY] = 0
    async for chunk in request.stream():
        if chunk:
            request.scope[audit.BYTES_IN_KEY] += len(chunk)
            metrics.BYTES.labels(direction="request").inc(len(chunk))
            yield chunk


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    content: bytes | AsyncIterator[bytes] | None,
    remaining: float,
) -> httpx.Response:
    outgoing = client.build_request(method, url, headers=headers, content=content)
    try:
        # The response head must come within the deadline; the body may take longer.
        async with asyncio.timeout(remaining):
            return await client.send(outgoing, stream=True)
    except (TimeoutError, httpx.TimeoutException):
        raise ProblemError(
            504, "Gateway timeout", f"no response from the API within {remaining:g}s"
        ) from None
    except egress.EgressDenied as exc:  # the connection's own lookup (egress.VettedBackend)
        raise ProblemError(502, "Target not allowed", str(exc)) from None
    except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
        raise ProblemError(
            502,
            "Internal API unreachable",
            f"cannot reach {httpx.URL(url).host}: {type(exc).__name__}",
        ) from None
    except httpx.HTTPError as exc:
        raise ProblemError(
            502, "Internal API error", f"the API broke HTTP: {type(exc).__name__}"
        ) from None


async def invoke(
    request: Request,
    target: InvokeTarget,
    plan: Plan,
    sub_path: str,
    headers: list[list[str]],
    deadline: float,
    started: float,
) -> Response:
    config = request.app.state.config
    stored = credentials.open_online(
        config, target.connection_id, target.seal_suite, target.sealed_credentials
    )
    query = request.scope.get("query_string", b"").decode("latin-1")
    parts = plan.rewrite(request.method, sub_path, query, headers, stored.get("secrets"))
    prefix = invoke_prefix(request.scope.get("root_path", ""), target.connection_id)

    def relocate(value: str) -> str:
        return public_location(value, parts.url, plan.base_url, prefix)

    try:
        await egress.check(parts.url, config)
    except egress.EgressDenied as exc:
        raise ProblemError(502, "Target not allowed", str(exc)) from None
    token: str | None = None
    if plan.auth_type == "oauth2":
        if plan.oauth is None:
            raise ProblemError(502, "Credentials unusable", "the connector has no OAuth settings")
        try:
            token = await tokens_for(request).access_token(plan.oauth)
        except ConsentRequired as exc:
            raise consent_problem(exc) from None
        except OAuthError as exc:
            raise ProblemError(502, "Token refresh failed", str(exc)) from None
    content: bytes | AsyncIterator[bytes] | None = None
    replayable = True
    if _has_body(request):
        length = request.headers.get("content-length", "")
        if plan.auth_type == "oauth2" and length.isdigit() and int(length) <= RETRY_BUFFER_BYTES:
            content = await request.body()
            request.scope[audit.BYTES_IN_KEY] = len(content)
        else:
            content, replayable = _stream_request(request), False
    client = egress.client(request.app.state, config)
    url, out_headers = _with_credentials(parts, plan, stored.get("credentials", {}), token)
    remaining = max(0.001, deadline - (time.monotonic() - started))
    upstream = await _send(client, parts.method, url, out_headers, content, remaining)
    if upstream.status_code == 401 and plan.oauth is not None and token and replayable:
        fresh = await tokens_for(request).after_unauthorized(plan.oauth, token)
        if fresh is not None:
            await upstream.aclose()
            upstream = await _resend(client, parts, plan, stored, fresh, content, deadline, started)
    return StreamingResponse(
        _relay_body(upstream, request.method == "HEAD"),
        status_code=upstream.status_code,
        headers=response_headers(upstream.headers.multi_items(), relocate=relocate),
    )


async def _resend(
    client: httpx.AsyncClient,
    parts: RequestParts,
    plan: Plan,
    stored: dict[str, Any],
    token: str,
    content: bytes | AsyncIterator[bytes] | None,
    deadline: float,
    started: float,
) -> httpx.Response:
    """The same request once more, with a refreshed token (bodies here are buffered)."""
    url, out_headers = _with_credentials(parts, plan, stored.get("credentials", {}), token)
    remaining = max(0.001, deadline - (time.monotonic() - started))
    log.info("online.retry_after_401", connection_id=plan.connection_id)
    return await _send(client, parts.method, url, out_headers, content, remaining)


async def _relay_body(upstream: httpx.Response, is_head: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            metrics.BYTES.labels(direction="response").inc(len(chunk))
            if not is_head:
                yield chunk
    except httpx.HTTPError as exc:
        log.warning("online.body_aborted", error=type(exc).__name__)
        raise
    finally:
        with contextlib.suppress(Exception):
            await upstream.aclose()
