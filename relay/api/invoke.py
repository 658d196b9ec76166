"""The invoke operation's routes: ``ANY /v1/connections/{id}/invoke/{path}``, one route per
method so that each has its own operation id in the OpenAPI document.

The handler is :func:`relay.invoke.invoke`. FastAPI reads the signature of the function it
routes to, which a function of the compiled build (setup.py) does not expose, so the route
is this wrapper. Most invoke requests never reach it: :mod:`relay.edge` and
:mod:`relay.fastpath` answer them before routing.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from relay import invoke as handler
from relay.identity import CurrentUser

router = APIRouter()


async def invoke(connection_id: str, path: str, request: Request, user: CurrentUser) -> Response:
    del path  # the decoded form is unsafe to use; the handler reads the raw target
    return await handler.invoke(connection_id, request, user)


for _method in handler.METHODS:
    router.add_api_route(
        "/v1/connections/{connection_id}/invoke/{path:path}",
        invoke,
        methods=[_method],
        operation_id=f"invoke_{_method.lower()}",
        summary="Call the connection's API through its gateway",
        response_class=Response,
    )
