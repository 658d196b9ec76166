"""Connectors: which API a connection talks to, how it authenticates, through which gateway.

Base URLs are normalized by :func:`relay.urls.normalize_base_url` (re-exported here).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, StringConstraints, field_validator, model_validator

from relay import audit, sharing
from relay.identity import CurrentUser
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Connector
from relay.urls import normalize_base_url
from relay.windows import WindowsScheme, check_spn

__all__ = ["normalize_base_url", "router"]

router = APIRouter(prefix="/v1/connectors", tags=["connectors"])

AuthType = Literal["none", "basic", "api_key", "windows"]


class ConnectorCreate(BaseModel):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
    base_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    auth_type: AuthType
    gateway_id: str | None = None
    api_key_name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    api_key_in: Literal["header", "query"] | None = None
    #: auth_type windows only (relay.windows): default negotiate, and an SPN override.
    windows_scheme: WindowsScheme | None = None
    spn: Annotated[str, StringConstraints(min_length=3, max_length=255)] | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return normalize_base_url(value)

    @model_validator(mode="after")
    def _api_key(self) -> ConnectorCreate:
        if self.auth_type == "api_key":
            if self.api_key_name is None:
                raise ValueError("api_key_name is required when auth_type is api_key")
            if self.api_key_in is None:
                self.api_key_in = "header"
        elif self.api_key_name is not None or self.api_key_in is not None:
            raise ValueError("api_key_name and api_key_in apply only to auth_type api_key")
        if self.auth_type == "windows":
            if self.gateway_id is None:
                raise ValueError("auth_type windows needs a gateway_id: only an agent can do it")
            self.windows_scheme = self.windows_scheme or "negotiate"
            if self.spn is not None:
                check_spn(self.spn)
        elif self.windows_scheme is not None or self.spn is not None:
            raise ValueError("windows_scheme and spn apply only to auth_type windows")
        return self


class ConnectorView(BaseModel):
    id: str
    name: str
    owner_id: str
    base_url: str
    auth_type: str
    api_key_name: str | None
    api_key_in: str | None
    gateway_id: str | None
    created_at: dt.datetime
    windows_scheme: str | None = None
    spn: str | None = None
    #: The caller's access: owner, admin, can_use, can_use_and_share or can_edit.
    access: str = "owner"
    #: "openapi2" or "openapi3" for imported connectors, None for hand-made ones.
    source: str | None = None


def view(connector: Connector, access: str = sharing.OWNER) -> ConnectorView:
    return ConnectorView(
        id=connector.id,
        name=connector.name,
        owner_id=connector.owner_id,
        base_url=connector.base_url,
        auth_type=connector.auth_type,
        api_key_name=connector.api_key_name,
        api_key_in=connector.api_key_in,
        gateway_id=connector.gateway_id,
        created_at=connector.created_at,
        windows_scheme=connector.windows_scheme,
        spn=connector.spn,
        access=access,
        source=(connector.settings or {}).get("source"),
    )


@router.post("", status_code=201)
async def create_connector(
    body: ConnectorCreate, caller: CurrentUser, session: SessionDep
) -> ConnectorView:
    if body.gateway_id is not None:
        await queries.visible_gateway(session, body.gateway_id, caller.id, caller.is_admin)
    connector = await queries.create_connector(
        session,
        Connector(
            name=body.name,
            owner_id=caller.id,
            base_url=body.base_url,
            auth_type=body.auth_type,
            api_key_name=body.api_key_name,
            api_key_in=body.api_key_in,
            gateway_id=body.gateway_id,
            windows_scheme=body.windows_scheme,
            spn=body.spn,
        ),
    )
    await session.commit()
    return view(connector)


@router.get("")
async def list_connectors(caller: CurrentUser, session: SessionDep) -> list[ConnectorView]:
    return [view(a.connector, a.role) for a in await sharing.visible(session, caller)]


@router.get("/{connector_id}")
async def get_connector(
    connector_id: str, caller: CurrentUser, session: SessionDep
) -> ConnectorView:
    found = await sharing.access(session, connector_id, caller)
    return view(found.connector, found.role)


@router.delete("/{connector_id}", status_code=204)
async def delete_connector(connector_id: str, caller: CurrentUser, session: SessionDep) -> Response:
    """Owner or admin; the connector's connections (and their shares and tokens) go with it."""
    found = await sharing.access(session, connector_id, caller)
    removed = await sharing.delete_connector(session, found)
    audit.add(
        session,
        actor_id=caller.id,
        action=audit.CONNECTOR_DELETE,
        object_type="connector",
        object_id=connector_id,
        result="ok",
        detail=f"{removed} connection(s) deleted with it",
    )
    await session.commit()
    return Response(status_code=204)
