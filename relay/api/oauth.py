"""OAuth 2.0 consent for online connections (relay.oauth.flow).

``POST /v1/connections/{id}/oauth/start`` (the owner) answers the provider's authorization
URL; the owner opens it in a browser, signs in, and the provider sends the browser to
``GET /v1/oauth/callback``, which needs no bearer token: the one-time state is what
identifies the user and the connection. ``GET /v1/connections/{id}/oauth`` tells whether the
connection is signed in; ``DELETE`` signs it out (the tokens are removed).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response

from relay import audit, egress
from relay.identity import CurrentUser
from relay.importer import settings as connector_settings
from relay.importer.settings import OAuthSettings
from relay.oauth import flow, tokens
from relay.oauth.client import OAuthError
from relay.problems import ProblemError
from relay.secretbox import SecretBox, SecretBoxError, box_for
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Connection, Connector, OAuthToken

router = APIRouter(tags=["oauth"])


def _box(request: Request) -> SecretBox:
    try:
        return box_for(request.app.state.config)
    except SecretBoxError as exc:
        raise ProblemError(503, "Relay secret key missing", str(exc)) from None


async def _oauth_settings(
    session: SessionDep, connection: Connection
) -> tuple[Connector, OAuthSettings]:
    connector = await session.get(Connector, connection.connector_id)
    assert connector is not None
    found = connector_settings.load(connector.settings)
    pset = None if found is None else found.parameter_set(connection.parameter_set)
    if pset is None or pset.oauth is None or connector.gateway_id is not None:
        raise ProblemError(
            409, "Not an OAuth connection", f"connection {connection.id} does not use OAuth 2.0"
        )
    return connector, pset.oauth


@router.post("/v1/connections/{connection_id}/oauth/start")
async def start_consent(
    connection_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> dict[str, Any]:
    """The authorization URL to open in the owner's browser (valid once, for a few minutes)."""
    connection = await queries.managed_connection(session, connection_id, caller.id, False)
    _, settings = await _oauth_settings(session, connection)
    started = await flow.start(
        session, request.app.state.config, _box(request), connection, settings, caller.id
    )
    await session.commit()
    return {
        "authorize_url": started.authorize_url,
        "redirect_uri": started.redirect_uri,
        "expires_at": started.expires_at.isoformat(),
    }


@router.get("/v1/oauth/callback")
async def callback(
    request: Request,
    session: SessionDep,
    state: str | None = None,
    code: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> dict[str, Any]:
    """Where the provider sends the browser back (RFC 6749 §4.1.2)."""
    if not state:
        raise ProblemError(400, "Consent failed", "the callback has no state")
    box = _box(request)
    config = request.app.state.config
    try:
        pending = await flow.claim(session, box, state)
    except SecretBoxError as exc:
        raise ProblemError(400, "Consent failed", str(exc)) from None
    except OAuthError as exc:
        await session.rollback()
        raise ProblemError(400, "Consent failed", str(exc)) from None
    await session.commit()  # the state is spent whatever happens next

    def record(result: str, detail: str) -> None:
        audit.add(
            session,
            actor_id=pending.user_id,
            action=audit.OAUTH_CONSENT,
            object_type="connection",
            object_id=pending.connection_id,
            result=result,
            detail=detail[:500],
        )

    if error or not code:
        reason = (error or "no code") + (
            f": {error_description[:200]}" if error_description else ""
        )
        record("refused", reason)
        await session.commit()
        raise ProblemError(400, "Consent refused", f"the provider answered {reason}")
    connection = await session.get(Connection, pending.connection_id)
    assert connection is not None
    connector, settings = await _oauth_settings(session, connection)
    try:
        secret = tokens.client_secret(box, connector.id, connector.oauth_client_secret)
        got = await flow.finish(
            session,
            egress.client(request.app.state, config),
            config,
            box,
            pending,
            settings,
            secret,
            code,
        )
    except (OAuthError, SecretBoxError) as exc:
        await session.rollback()
        record("error", str(exc))
        await session.commit()
        raise ProblemError(400, "Consent failed", str(exc)) from None
    record("ok", settings.identity_provider)
    await session.commit()
    expires = None if got.expires_at is None else dt.datetime.fromtimestamp(got.expires_at, dt.UTC)
    return {
        "connection_id": pending.connection_id,
        "status": "connected",
        "expires_at": None if expires is None else expires.isoformat(),
        "scope": got.scope,
    }


@router.get("/v1/connections/{connection_id}/oauth")
async def consent_status(
    connection_id: str, caller: CurrentUser, session: SessionDep
) -> dict[str, Any]:
    connection = await queries.visible_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    await _oauth_settings(session, connection)
    row = await session.get(OAuthToken, connection.id)
    return {
        "connection_id": connection.id,
        "connected": row is not None,
        "expires_at": None if row is None or row.expires_at is None else row.expires_at.isoformat(),
        "refreshable": bool(row is not None and row.has_refresh_token),
        "scope": None if row is None else row.scope,
    }


@router.delete("/v1/connections/{connection_id}/oauth", status_code=204)
async def sign_out(connection_id: str, caller: CurrentUser, session: SessionDep) -> Response:
    connection = await queries.managed_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    await tokens.forget(session, connection.id)
    await session.commit()
    return Response(status_code=204)
