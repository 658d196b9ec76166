"""Gateways (member clusters), their enrollment tokens and members.

Live columns (online, RTT, in-flight) come from the hub, not the database: they change many
times a second and would be stale the moment they were written.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from relay.balancing import DEFAULT_POLICY
from relay.config import RelayConfig
from relay.hub import Hub, LiveTunnel
from relay.identity import CurrentUser, hash_token, new_enrollment_token
from relay.problems import ProblemError
from relay.registry import Registry, RemoteMember
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Gateway, Member, utcnow

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
    load_balancing: str = DEFAULT_POLICY
    cpu_threshold: float | None = None
    memory_threshold: float | None = None


Policy = Literal["least-inflight", "round-robin", "random", "primary-failover"]


class GatewayUpdate(BaseModel):
    """PATCH body: only the fields present change (null clears a threshold)."""

    name: GatewayName | None = None
    load_balancing: (
        Literal["least-inflight", "round-robin", "random", "primary-failover"] | None
    ) = None
    cpu_threshold: float | None = Field(default=None, gt=0, le=100)
    memory_threshold: float | None = Field(default=None, gt=0, le=100)


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
    disabled: bool = False
    draining: bool = False
    priority: int = 0
    cpu: float | None = None
    memory: float | None = None
    #: The relay instance holding this member's tunnel (None when offline).
    instance: str | None = None


class GatewayDetail(GatewaySummary):
    members: list[MemberView] = Field(default_factory=list)


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


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
        "load_balancing": gateway.load_balancing,
        "cpu_threshold": gateway.cpu_threshold,
        "memory_threshold": gateway.memory_threshold,
    }


async def _member_view(member: Member, hub: Hub, registry: Registry) -> MemberView:
    """DB facts plus the live view: this instance's hub first, then the shared registry."""
    live: LiveTunnel | RemoteMember | None = hub.live(member.id)
    instance = hub.instance_id if live is not None else None
    if live is None:
        live = await registry.lookup(member.id)
        instance = live.instance_id if live is not None else None
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
        disabled=member.disabled_at is not None,
        draining=live.draining if live is not None else False,
        priority=member.priority,
        cpu=live.cpu if live is not None else None,
        memory=live.memory if live is not None else None,
        instance=instance,
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
    hub, registry = _hub(request), _registry(request)
    views = [await _member_view(m, hub, registry) for m in members]
    return GatewayDetail.model_validate({**_summary(gateway), "members": views})


@router.patch("/{gateway_id}")
async def update_gateway(
    gateway_id: str, body: GatewayUpdate, caller: CurrentUser, session: SessionDep
) -> GatewaySummary:
    """Rename, choose the load-balancing policy, set or clear the CPU/memory thresholds."""
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    for field in body.model_fields_set:
        value = getattr(body, field)
        if field in ("name", "load_balancing") and value is None:
            continue
        setattr(gateway, field, value)
    await session.commit()
    return GatewaySummary.model_validate(_summary(gateway))


async def _set_disabled(
    gateway_id: str, member_id: str, disabled: bool, caller: Any, session: Any, request: Request
) -> Response:
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    member = await session.get(Member, member_id)
    if member is None or member.gateway_id != gateway.id:
        raise ProblemError(404, "Not found", f"no member {member_id} in gateway {gateway_id}")
    member.disabled_at = utcnow() if disabled else None
    await session.commit()
    await _registry(request).set_disabled(member_id, disabled)
    return Response(status_code=204)


@router.post("/{gateway_id}/members/{member_id}/disable", status_code=204)
async def disable_member(
    gateway_id: str, member_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> Response:
    """Stop routing to a member without revoking it (maintenance); its tunnel stays up."""
    return await _set_disabled(gateway_id, member_id, True, caller, session, request)


@router.post("/{gateway_id}/members/{member_id}/enable", status_code=204)
async def enable_member(
    gateway_id: str, member_id: str, caller: CurrentUser, session: SessionDep, request: Request
) -> Response:
    return await _set_disabled(gateway_id, member_id, False, caller, session, request)


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
    await _registry(request).disconnect(member_id, "member revoked")
    return Response(status_code=204)
