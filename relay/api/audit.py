"""The audit log, for admins: shares, unshares, consents and invokes (relay.audit)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from relay import audit
from relay.identity import AdminUser
from relay.store.db import SessionDep
from relay.store.models import AuditEvent

router = APIRouter(prefix="/v1/audit", tags=["audit"])


class AuditEventView(BaseModel):
    id: str
    at: dt.datetime
    actor_id: str
    action: str
    object_type: str
    object_id: str
    subject_id: str | None
    result: str
    status: int | None
    bytes_in: int | None
    bytes_out: int | None
    detail: str | None


def view(event: AuditEvent) -> AuditEventView:
    return AuditEventView(
        id=event.id,
        at=event.at,
        actor_id=event.actor_id,
        action=event.action,
        object_type=event.object_type,
        object_id=event.object_id,
        subject_id=event.subject_id,
        result=event.result,
        status=event.status,
        bytes_in=event.bytes_in,
        bytes_out=event.bytes_out,
        detail=event.detail,
    )


@router.get("")
async def list_events(
    _: AdminUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: str | None = None,
    action: str | None = None,
    actor_id: str | None = None,
    object_id: str | None = None,
) -> list[AuditEventView]:
    """Newest first; page back with ``before=<the last id you got>``."""
    rows = await audit.events(
        session,
        limit=limit,
        before=before,
        action=action,
        actor_id=actor_id,
        object_id=object_id,
    )
    return [view(e) for e in rows]
