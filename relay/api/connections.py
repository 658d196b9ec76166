"""Connections: a connector plus one caller's credentials, protected at once.

The credentials exist in clear only inside this request handler: they are validated, sealed
with HPKE to the gateway's public key (bound to the connection id and base URL) and dropped.
An online connector's credentials are encrypted with the relay's key instead, since the relay
itself calls that API (:mod:`relay.credentials`). Validation errors name the offending field
and never echo its value.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, StringConstraints

from relay import credentials as connection_credentials
from relay import sharing, windows
from relay.identity import CurrentUser
from relay.oauth import tokens as oauth_tokens
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
    "oauth2": (),
}
MAX_CREDENTIAL_BYTES = 16 * 1024


class ConnectionCreate(BaseModel):
    connector_id: str
    credentials: dict[str, Any] = {}
    name: Annotated[str, StringConstraints(strip_whitespace=True, max_length=128)] | None = None
    #: Imported connectors: values by the names in apiProperties.json, and which set.
    parameters: dict[str, Any] | None = None
    parameter_set: str | None = None


class CredentialsUpdate(BaseModel):
    credentials: dict[str, Any] = {}
    parameters: dict[str, Any] | None = None


class ConnectionView(BaseModel):
    id: str
    connector_id: str
    owner_id: str
    name: str | None
    seal_suite: str
    created_at: dt.datetime
    parameter_set: str | None = None
    parameters: dict[str, Any] | None = None


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "Invalid credentials", detail)


def check_credentials(auth_type: str, credentials: dict[str, Any]) -> dict[str, str]:
    """Return the credentials when they fit ``auth_type``; the message never holds a value."""
    if auth_type == "windows":
        return windows.check_credentials(credentials)
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
        parameter_set=connection.parameter_set,
        parameters=connection.parameter_values,
    )


async def _sealing_key(session: SessionDep, connector: Connector) -> str | None:
    """The gateway's HPKE key; None for an online connector (the relay's key protects it)."""
    if connector.gateway_id is None:
        return None
    gateway = await session.get(Gateway, connector.gateway_id)
    if gateway is None or gateway.hpke_public_key is None:
        raise ProblemError(
            409,
            "Gateway has no key",
            f"gateway {connector.gateway_id} has no enrolled member yet; enroll an agent first",
        )
    return gateway.hpke_public_key


async def _key_version(session: SessionDep, connector: Connector) -> int:
    """The gateway key generation :func:`_sealing_key` returned (1 for online connectors)."""
    gateway = (
        None if connector.gateway_id is None else await session.get(Gateway, connector.gateway_id)
    )
    return 1 if gateway is None else gateway.key_version


@router.post("", status_code=201)
async def create_connection(
    body: ConnectionCreate, caller: CurrentUser, session: SessionDep, request: Request
) -> ConnectionView:
    connector = (await sharing.access(session, body.connector_id, caller)).connector
    prepared = connection_credentials.prepare(
        connector, body.credentials, body.parameters, body.parameter_set
    )
    credentials = check_credentials(prepared.auth_type, prepared.credentials)
    key = await _sealing_key(session, connector)
    connection_id = new_id("cxn")
    suite, blob = connection_credentials.protect(
        request.app.state.config, connector, key, connection_id, prepared, credentials
    )
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
            key_version=await _key_version(session, connector),
            parameter_set=prepared.parameter_set,
            parameter_values=prepared.parameter_values,
            base_url=prepared.base_url,
            auth_type=prepared.auth_type if prepared.parameter_set is not None else None,
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
    await oauth_tokens.forget(session, connection.id)
    await queries.delete_connection(session, connection)
    await session.commit()
    return Response(status_code=204)


@router.put("/{connection_id}/credentials")
async def replace_credentials(
    connection_id: str,
    body: CredentialsUpdate,
    caller: CurrentUser,
    session: SessionDep,
    request: Request,
) -> ConnectionView:
    """Owner only: an admin may delete a connection but not put words in someone's mouth."""
    connection = await queries.visible_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    if connection.owner_id != caller.id:
        raise Forbidden(f"only the owner of {connection_id} may replace its credentials")
    connector = await session.get(Connector, connection.connector_id)
    assert connector is not None
    prepared = connection_credentials.prepare(
        connector, body.credentials, body.parameters, connection.parameter_set
    )
    credentials = check_credentials(prepared.auth_type, prepared.credentials)
    key = await _sealing_key(session, connector)
    connection.seal_suite, connection.sealed_credentials = connection_credentials.protect(
        request.app.state.config, connector, key, connection.id, prepared, credentials
    )
    del credentials
    connection.key_version = await _key_version(session, connector)
    connection.parameter_values = prepared.parameter_values
    connection.base_url = prepared.base_url
    await session.commit()
    return view(connection)
