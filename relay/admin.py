"""The admin status page: ``GET /admin`` (static HTML, script and style) and the one JSON
document it polls, ``GET /v1/admin/overview``.

The page holds no secret of its own: the admin pastes an API token once, the script keeps it
in ``sessionStorage`` (gone with the tab) and sends it as a Bearer token every two seconds;
every figure comes from the overview, which only admins may read. The page is served with a
Content-Security-Policy that allows only its own script and style and calls only this origin,
and the script writes every value with ``textContent``, so a member name can't inject markup.

The overview is this instance's view: gateways and members from the database, live columns
(online, RTT, in-flight, version) from the hub and the shared registry, requests per minute
and recent errors from :mod:`relay.activity`.
"""

from __future__ import annotations

import datetime as dt
import time
from importlib import resources

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel
from sqlalchemy import select

from backhaul.version import __version__
from relay.activity import Activity, Recorder
from relay.api.gateways import MemberView, _member_view
from relay.hub import Hub
from relay.identity import AdminUser
from relay.registry import Registry
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Connection, Connector

router = APIRouter(tags=["admin"])

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_STATIC = {
    "admin": ("index.html", "text/html; charset=utf-8"),
    "admin/admin.js": ("admin.js", "text/javascript; charset=utf-8"),
    "admin/admin.css": ("admin.css", "text/css; charset=utf-8"),
}
_STARTED = time.time()


def _static(name: str) -> bytes:
    return resources.files("relay").joinpath("web", name).read_bytes()


def _route(path: str, filename: str, media_type: str) -> None:
    async def serve() -> Response:
        return Response(_static(filename), media_type=media_type, headers=_HEADERS)

    router.add_api_route(f"/{path}", serve, methods=["GET"], include_in_schema=False)


for _path, (_filename, _media) in _STATIC.items():
    _route(_path, _filename, _media)


class ErrorView(BaseModel):
    at: dt.datetime
    status: int
    title: str
    detail: str
    connection_id: str
    gateway_id: str | None
    gateway_name: str | None


class GatewayOverview(BaseModel):
    id: str
    name: str
    load_balancing: str
    requests_per_minute: int
    errors_per_minute: int
    members: list[MemberView]


class Overview(BaseModel):
    instance: str
    version: str
    uptime_seconds: float
    generated_at: dt.datetime
    gateways: list[GatewayOverview]
    recent_errors: list[ErrorView]


@router.get("/v1/admin/overview")
async def overview(caller: AdminUser, session: SessionDep, request: Request) -> Overview:
    """Everything the admin page shows, in one call (admins only)."""
    state = request.app.state
    hub: Hub = state.hub
    registry: Registry = state.registry
    activity: Activity = state.activity
    gateways = await queries.visible_gateways(session, caller.id, True)
    names = {g.id: g.name for g in gateways}
    rows = await session.execute(
        select(Connection.id, Connector.gateway_id).join(
            Connector, Connection.connector_id == Connector.id
        )
    )
    gateway_of: dict[str, str | None] = {cid: gid for cid, gid in rows.all()}
    per_gateway: dict[str, list[int]] = {}
    for connection_id, (total, failed) in activity.last_minute().items():
        gid = gateway_of.get(connection_id)
        if gid is not None:
            counts = per_gateway.setdefault(gid, [0, 0])
            counts[0] += total
            counts[1] += failed
    views = []
    for gateway in gateways:
        members = await queries.gateway_members(session, gateway.id)
        counts = per_gateway.get(gateway.id, [0, 0])
        views.append(
            GatewayOverview(
                id=gateway.id,
                name=gateway.name,
                load_balancing=gateway.load_balancing,
                requests_per_minute=counts[0],
                errors_per_minute=counts[1],
                members=[await _member_view(m, hub, registry) for m in members],
            )
        )
    errors = []
    for event in reversed(activity.errors):
        gid = gateway_of.get(event.connection_id)
        errors.append(
            ErrorView(
                at=dt.datetime.fromtimestamp(event.at, dt.UTC),
                status=event.status,
                title=event.title,
                detail=event.detail,
                connection_id=event.connection_id,
                gateway_id=gid,
                gateway_name=names.get(gid) if gid else None,
            )
        )
    return Overview(
        instance=hub.instance_id,
        version=__version__,
        uptime_seconds=round(time.time() - _STARTED, 1),
        generated_at=dt.datetime.now(dt.UTC),
        gateways=views,
        recent_errors=errors,
    )


def install(app: FastAPI) -> None:
    """Mount the page and the overview, and start recording invoke activity."""
    activity = Activity()
    app.state.activity = activity
    app.add_middleware(Recorder, activity=activity)
    app.include_router(router)
