"""Stream an invoke to the relay instance that holds a tunnel of the right gateway.

The request goes to the other instance's own invoke URL with the caller's own bearer token:
that instance authenticates and authorizes the caller again against the shared database, so
forwarding grants nothing a caller couldn't get by reaching that instance directly. The
``X-Backhaul-Forwarded-By`` header stops a second hop (loops are impossible by construction).
Bodies stream both ways; nothing is buffered.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx
import structlog
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from relay.headers import response_headers
from relay.registry import RemoteMember

log = structlog.get_logger("backhaul.relay.forward")

FORWARDED_HEADER = "x-backhaul-forwarded-by"
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


class ForwardFailed(Exception):
    """The other instance could not be reached; try another or answer 503."""


def peer_client(ca_file: str | None, timeout: float) -> httpx.AsyncClient:
    """The client used between relay instances: pooled, verified, no environment proxies."""
    context = ssl.create_default_context(cafile=ca_file)
    return httpx.AsyncClient(
        verify=context,
        timeout=httpx.Timeout(timeout, connect=5.0),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        trust_env=False,
        follow_redirects=False,
    )


async def forward(
    client: httpx.AsyncClient, member: RemoteMember, request: Request, instance_id: str
) -> StreamingResponse:
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    query: bytes = request.scope.get("query_string", b"")
    target = member.url.rstrip("/") + raw_path.decode("latin-1")
    if query:
        target += "?" + query.decode("latin-1")
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
    headers.append((FORWARDED_HEADER, instance_id))
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    outgoing = client.build_request(
        request.method,
        httpx.URL(target),
        headers=headers,
        content=_body(request) if has_body else None,
    )
    try:
        response = await client.send(outgoing, stream=True)
    except httpx.TransportError as exc:
        raise ForwardFailed(f"relay instance {member.instance_id} unreachable: {exc}") from exc
    log.info("forward.sent", to=member.instance_id, status=response.status_code)
    return StreamingResponse(
        _relay(response),
        status_code=response.status_code,
        headers=response_headers(
            [*response.headers.multi_items(), ("x-backhaul-instance", member.instance_id)], _DROP
        ),
        background=BackgroundTask(response.aclose),
    )


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            await response.aclose()
