"""Gateways (member clusters), their enrollment tokens and members.

Live columns (online, RTT, in-flight) come from the hub, not the database: they change many
times a second and would be stale the moment they were written.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from relay.config import RelayConfig
from relay.hub import Hub
from relay.identity import CurrentUser, hash_token, new_enrollment_token
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Gateway, Member

router = APIRouter(prefix="/v1/gateways", tags=["gateways"])

GatewayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]


class GatewayCreate(BaseModel):
    name: GatewayName


class GatewayCreated(BaseModel):
    id: str
    name: str
    owner_id: str
    enrollment_token: str
    enrollment_expires_at: dt.datetime


class EnrollmentTokenCreated(BaseModel):
    enrollment_token: str
    expires_at: dt.datetime


class GatewaySummary(BaseModel):
    id: str
    name: str
    owner_id: str
    created_at: dt.datetime
    hpke_public_key: str | None


class MemberView(BaseModel):
    id: str
    name: str
    hostname: str
    online: bool
    version: str
    rtt_ms: float | None
    inflight: int
    total: int
    session_id: str | None
    revoked: bool
    enrolled_at: dt.datetime
    last_seen_at: dt.datetime | None


class GatewayDetail(GatewaySummary):
    members: list[MemberView] = Field(default_factory=list)


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _ttl(request: Request) -> dt.timedelta:
    config: RelayConfig = request.app.state.config
    return dt.timedelta(seconds=config.enrollment_ttl_seconds)


def _summary(gateway: Gateway) -> dict[str, object]:
    return {
        "id": gateway.id,
        "name": gateway.name,
        "owner_id": gateway.owner_id,
        "created_at": gateway.created_at,
        "hpke_public_key": gateway.hpke_public_key,
    }


def _member_view(member: Member, hub: Hub) -> MemberView:
    live = hub.live(member.id)
    return MemberView(
        id=member.id,
        name=member.name,
        hostname=member.hostname,
        online=live is not None,
        version=live.version if live is not None else member.version,
        rtt_ms=live.rtt_ms if live is not None else None,
        inflight=live.inflight if live is not None else 0,
        total=live.total if live is not None else 0,
        session_id=live.session_id if live is not None else None,
        revoked=member.revoked_at is not None,
        enrolled_at=member.enrolled_at,
        last_seen_at=member.last_seen_at,
    )


@router.post("", status_code=201)
async def create_gateway(
    body: GatewayCreate, caller: CurrentUser, session: SessionDep, request: Request
) -> GatewayCreated:
    gateway = await queries.create_gateway(session, body.name, caller.id)
    token = new_enrollment_token()
    row = await queries.add_enrollment_token(session, gateway.id, hash_token(token), _ttl(request))
    await session.commit()
    return GatewayCreated(
        id=gateway.id,
        name=gateway.name,
        owner_id=gateway.owner_id,
        enrollment_token=token,
        enrollment_expires_at=row.expires_at,
    )


@router.get("")
async def list_gateways(caller: CurrentUser, session: SessionDep) -> list[GatewaySummary]:
    gateways = await queries.visible_gateways(session, caller.id, caller.is_admin)
    return [GatewaySummary.model_validate(_summary(g)) for g in gateways]


@router.get("/{gateway_id}")
async def get_gateway(
    gateway_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> GatewayDetail:
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    members = await queries.gateway_members(session, gateway.id)
    hub = _hub(request)
    return GatewayDetail.model_validate(
        {**_summary(gateway), "members": [_member_view(m, hub) for m in members]}
    )


@router.post("/{gateway_id}/enrollment-tokens", status_code=201)
async def create_enrollment_token(
    gateway_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> EnrollmentTokenCreated:
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    token = new_enrollment_token()
    row = await queries.add_enrollment_token(session, gateway.id, hash_token(token), _ttl(request))
    await session.commit()
    return EnrollmentTokenCreated(enrollment_token=token, expires_at=row.expires_at)


@router.delete("/{gateway_id}/members/{member_id}", status_code=204)
async def revoke_member(
    gateway_id: str, member_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> Response:
    """Revoke in the database first, so a reconnect after the disconnect is already refused."""
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    await queries.revoke_member(session, gateway.id, member_id)
    await session.commit()
    await _hub(request).disconnect(member_id, "member revoked")
    return Response(status_code=204)
