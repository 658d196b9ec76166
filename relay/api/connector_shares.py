"""Sharing a connector: others may use it, use and share it, or edit it (relay.sharing).

Each recipient creates their own connections with their own credentials; nothing of the
owner's is shared. Every grant, change and removal is in the audit log.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from relay import audit, sharing
from relay.identity import CurrentUser
from relay.problems import ProblemError
from relay.store import NotFound, queries
from relay.store.db import SessionDep
from relay.store.models import ConnectorShare

router = APIRouter(prefix="/v1/connectors/{connector_id}/shares", tags=["connectors"])

Role = Literal["can_use", "can_use_and_share", "can_edit"]


class ConnectorShareCreate(BaseModel):
    user_id: str
    role: Role = "can_use"


class ConnectorShareView(BaseModel):
    connector_id: str
    user_id: str
    role: str
    granted_by: str
    created_at: dt.datetime


def view(share: ConnectorShare) -> ConnectorShareView:
    return ConnectorShareView(
        connector_id=share.connector_id,
        user_id=share.user_id,
        role=share.role,
        granted_by=share.granted_by,
        created_at=share.created_at,
    )


@router.post("", status_code=201, response_model=ConnectorShareView)
async def share_connector(
    connector_id: str, body: ConnectorShareCreate, caller: CurrentUser, session: SessionDep
) -> JSONResponse:
    """Grant a role (201), or change an existing share's role (200)."""
    found = await sharing.access(session, connector_id, caller)
    if await queries.active_user(session, body.user_id) is None:
        raise NotFound(f"no user {body.user_id}")
    row, created = await sharing.share_connector(session, found, caller, body.user_id, body.role)
    audit.add(
        session,
        actor_id=caller.id,
        action=audit.CONNECTOR_SHARE,
        object_type="connector",
        object_id=connector_id,
        subject_id=body.user_id,
        result="ok",
        detail=body.role,
    )
    await session.commit()
    return JSONResponse(view(row).model_dump(mode="json"), status_code=201 if created else 200)


@router.get("")
async def list_connector_shares(
    connector_id: str, caller: CurrentUser, session: SessionDep
) -> list[ConnectorShareView]:
    found = await sharing.access(session, connector_id, caller)
    if not found.can_share:
        raise ProblemError(403, "Forbidden", f"your access to {connector_id} is {found.role}")
    return [view(s) for s in await sharing.connector_shares(session, connector_id)]


@router.delete("/{user_id}", status_code=204)
async def unshare_connector(
    connector_id: str, user_id: str, caller: CurrentUser, session: SessionDep
) -> Response:
    found = await sharing.access(session, connector_id, caller)
    await sharing.unshare_connector(session, found, caller, user_id)
    audit.add(
        session,
        actor_id=caller.id,
        action=audit.CONNECTOR_UNSHARE,
        object_type="connector",
        object_id=connector_id,
        subject_id=user_id,
        result="ok",
    )
    await session.commit()
    return Response(status_code=204)
