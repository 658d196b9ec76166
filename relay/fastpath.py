"""The invoke route without the framework's per-request machinery.

``ANY /v1/connections/{id}/invoke/{path}`` is the data path: every caller request crosses it.
FastAPI's routing, dependency injection and exception middleware cost more CPU than the
relay's own work on a small request, so this middleware answers invoke requests itself —
same authentication, same handler, same problem responses — and passes everything else on.
The FastAPI routes stay registered, so the OpenAPI document still lists the invoke operation.
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import invoke
from relay.identity import authenticate
from relay.problems import ProblemError

_INVOKE = re.compile(r"^/v1/connections/([^/]+)/invoke(?:/|$)")


class InvokeFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _INVOKE.match(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] not in invoke.METHODS:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
        try:
            user = await authenticate(request, token if scheme.lower() == "bearer" else None)
            response = await invoke.invoke(match.group(1), "", request, user)
        except ProblemError as exc:
            response = exc.response()
        await response(scope, receive, send)
