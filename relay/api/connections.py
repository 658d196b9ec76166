"""Connections: a connector plus one caller's credentials, sealed to the gateway at once.

The credentials exist in clear only inside this request handler: they are validated, sealed
with HPKE to the gateway's public key (bound to the connection id and base URL) and dropped.
Validation errors name the offending field and never echo its value.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, StringConstraints

from backhaul.seal import seal
from relay.identity import CurrentUser
from relay.problems import ProblemError
from relay.store import Forbidden, queries
from relay.store.db import SessionDep
from relay.store.models import Connection, Connector, Gateway, new_id

router = APIRouter(prefix="/v1/connections", tags=["connections"])

#: Credential fields each auth type requires; anything else is refused.
CREDENTIAL_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "basic": ("username", "password"),
    "api_key": ("api_key",),
}
MAX_CREDENTIAL_BYTES = 16 * 1024


class ConnectionCreate(BaseModel):
    connector_id: str
    credentials: dict[str, Any]
    name: Annotated[str, StringConstraints(strip_whitespace=True, max_length=128)] | None = None


class CredentialsUpdate(BaseModel):
    credentials: dict[str, Any]


class ConnectionView(BaseModel):
    id: str
    connector_id: str
    owner_id: str
    name: str | None
    seal_suite: str
    created_at: dt.datetime


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "Invalid credentials", detail)


def check_credentials(auth_type: str, credentials: dict[str, Any]) -> dict[str, str]:
    """Return the credentials when they fit ``auth_type``; the message never holds a value."""
    wanted = CREDENTIAL_FIELDS.get(auth_type)
    if wanted is None:
        raise _invalid(f"auth type {auth_type!r} is not supported for gateway connections")
    for key in credentials:
        if key not in wanted:
            raise _invalid(f"credentials.{key}: not used by auth type {auth_type}")
    clean: dict[str, str] = {}
    for key in wanted:
        if key not in credentials:
            raise _invalid(f"credentials.{key}: required for auth type {auth_type}")
        value = credentials[key]
        if not isinstance(value, str):
            raise _invalid(f"credentials.{key}: must be a string")
        if key != "username" and not value:
            raise _invalid(f"credentials.{key}: must not be empty")
        clean[key] = value
    if sum(len(v.encode()) for v in clean.values()) > MAX_CREDENTIAL_BYTES:
        raise _invalid(f"credentials: larger than {MAX_CREDENTIAL_BYTES} bytes")
    return clean


def view(connection: Connection) -> ConnectionView:
    return ConnectionView(
        id=connection.id,
        connector_id=connection.connector_id,
        owner_id=connection.owner_id,
        name=connection.name,
        seal_suite=connection.seal_suite,
        created_at=connection.created_at,
    )


async def _sealing_key(session: SessionDep, connector: Connector) -> str:
    if connector.gateway_id is None:
        raise ProblemError(
            422,
            "Unsupported connector",
            f"connector {connector.id} has no gateway; only gateway connectors are supported",
        )
    gateway = await session.get(Gateway, connector.gateway_id)
    if gateway is None or gateway.hpke_public_key is None:
        raise ProblemError(
            409,
            "Gateway has no key",
            f"gateway {connector.gateway_id} has no enrolled member yet; enroll an agent first",
        )
    return gateway.hpke_public_key


@router.post("", status_code=201)
async def create_connection(
    body: ConnectionCreate, caller: CurrentUser, session: SessionDep
) -> ConnectionView:
    connector = await queries.visible_connector(
        session, body.connector_id, caller.id, caller.is_admin
    )
    credentials = check_credentials(connector.auth_type, body.credentials)
    key = await _sealing_key(session, connector)
    connection_id = new_id("cxn")
    suite, blob = seal(key, connection_id, connector.base_url, credentials)
    del credentials
    connection = await queries.add_connection(
        session,
        Connection(
            id=connection_id,
            connector_id=connector.id,
            owner_id=caller.id,
            name=body.name or None,
            seal_suite=suite,
            sealed_credentials=blob,
        ),
    )
    await session.commit()
    return view(connection)


@router.get("")
async def list_connections(caller: CurrentUser, session: SessionDep) -> list[ConnectionView]:
    return [view(c) for c in await queries.usable_connections(session, caller.id)]


@router.get("/{connection_id}")
async def get_connection(
    connection_id: str, caller: CurrentUser, session: SessionDep
) -> ConnectionView:
    return view(
        await queries.visible_connection(session, connection_id, caller.id, caller.is_admin)
    )


@router.delete("/{connection_id}", status_code=204)
async def delete_connection(
    connection_id: str, caller: CurrentUser, session: SessionDep
) -> Response:
    connection = await queries.managed_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    await queries.delete_connection(session, connection)
    await session.commit()
    return Response(status_code=204)


@router.put("/{connection_id}/credentials")
async def replace_credentials(
    connection_id: str, body: CredentialsUpdate, caller: CurrentUser, session: SessionDep
) -> ConnectionView:
    """Owner only: an admin may delete a connection but not put words in someone's mouth."""
    connection = await queries.visible_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    if connection.owner_id != caller.id:
        raise Forbidden(f"only the owner of {connection_id} may replace its credentials")
    connector = await session.get(Connector, connection.connector_id)
    assert connector is not None
    credentials = check_credentials(connector.auth_type, body.credentials)
    key = await _sealing_key(session, connector)
    connection.seal_suite, connection.sealed_credentials = seal(
        key, connection.id, connector.base_url, credentials
    )
    del credentials
    await session.commit()
    return view(connection)
