"""``GET /v1/connections/{id}/openapi.json``: the connection's API, served by the relay."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from relay import openapi_doc
from relay.identity import CurrentUser
from relay.importer import settings as connector_settings
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Connector

router = APIRouter(tags=["connections"])


@router.get("/v1/connections/{connection_id}/openapi.json")
async def connection_openapi(
    connection_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> dict[str, Any]:
    """OpenAPI 3.0 of the connector's operations, pointed at this connection's invoke URL."""
    connection = await queries.visible_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    connector = await session.get(Connector, connection.connector_id)
    assert connector is not None
    config = request.app.state.config
    base = config.public_url or str(request.base_url).rstrip("/")
    return openapi_doc.build(
        connection.id,
        connection.name or connector.name,
        connection.auth_type or connector.auth_type,
        connection.parameter_set,
        connector_settings.load(connector.settings),
        connector.definition,
        f"{base}/v1/connections/{connection.id}/invoke",
    )
