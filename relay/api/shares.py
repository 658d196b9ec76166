"""Sharing a connection lets another user invoke it with the owner's credentials.

Refused when the connector's parameter set says ``allowSharing: false`` (relay.sharing);
every share and unshare is in the audit log.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response
from pydantic import BaseModel

from relay import audit, sharing
from relay.identity import CurrentUser
from relay.problems import ProblemError
from relay.store import NotFound, queries
from relay.store.db import SessionDep
from relay.store.models import ConnectionShare

router = APIRouter(prefix="/v1/connections/{connection_id}/shares", tags=["connections"])


class ShareCreate(BaseModel):
    user_id: str


class ShareView(BaseModel):
    connection_id: str
    user_id: str
    created_at: dt.datetime


def view(share: ConnectionShare) -> ShareView:
    return ShareView(
        connection_id=share.connection_id, user_id=share.user_id, created_at=share.created_at
    )


@router.post("", status_code=201)
async def share(
    connection_id: str, body: ShareCreate, caller: CurrentUser, session: SessionDep
) -> ShareView:
    connection = await queries.managed_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    if await queries.active_user(session, body.user_id) is None:
        raise NotFound(f"no user {body.user_id}")
    if body.user_id == connection.owner_id:
        raise ProblemError(409, "Conflict", "the owner already has access to the connection")
    refusal = await sharing.connection_sharing_refusal(session, connection)
    if refusal is not None:
        raise ProblemError(403, "Sharing not allowed", refusal)
    row = await queries.add_share(session, connection.id, body.user_id)
    audit.add(
        session,
        actor_id=caller.id,
        action=audit.CONNECTION_SHARE,
        object_type="connection",
        object_id=connection.id,
        subject_id=body.user_id,
        result="ok",
    )
    await session.commit()
    return view(row)


@router.get("")
async def list_shares(
    connection_id: str, caller: CurrentUser, session: SessionDep
) -> list[ShareView]:
    connection = await queries.managed_connection(
        session, connection_id, caller.id, caller.is_admin
    )
    return [view(s) for s in await queries.shares_of(session, connection.id)]


@router.delete("/{user_id}", status_code=204)
async def unshare(
    connection_id: str, user_id: str, caller: CurrentUser, session: SessionDep
) -> Response:
    """The owner or an admin removes a share; a recipient may also drop its own."""
    if user_id == caller.id:
        await queries.visible_connection(session, connection_id, caller.id, caller.is_admin)
    else:
        await queries.managed_connection(session, connection_id, caller.id, caller.is_admin)
    await queries.remove_share(session, connection_id, user_id)
    audit.add(
        session,
        actor_id=caller.id,
        action=audit.CONNECTION_UNSHARE,
        object_type="connection",
        object_id=connection_id,
        subject_id=user_id,
        result="ok",
    )
    await session.commit()
    return Response(status_code=204)
