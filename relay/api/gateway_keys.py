"""A gateway's key: read the wrapped private key (for the admin's CLI to unwrap locally),
and rotate it (relay.rotation does the work).

Both need the gateway's owner or an admin. The wrapped key is useless without the recovery
key, which the relay never sees, but it is still not handed to anyone else.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from relay import rotation
from relay.identity import CurrentUser
from relay.store import clusters, queries
from relay.store.db import SessionDep

router = APIRouter(prefix="/v1/gateways", tags=["gateways"])


class GatewayKey(BaseModel):
    gateway_id: str
    hpke_public_key: str | None
    wrapped_private_key: dict[str, Any] | None
    key_version: int
    rotation: dict[str, Any] | None


class KeyRotation(BaseModel):
    hpke_public_key: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    wrapped_private_key: dict[str, Any]
    #: The new private key sealed to the current public key, with its author's proof.
    transport: Annotated[str, StringConstraints(min_length=1, max_length=65536)]
    key_version: int = Field(ge=2)


@router.get("/{gateway_id}/key")
async def get_key(gateway_id: str, caller: CurrentUser, session: SessionDep) -> GatewayKey:
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    record = rotation.KeyRecord.load(gateway.wrapped_private_key)
    active = await clusters.active_member_ids(session, gateway.id)
    return GatewayKey(
        gateway_id=gateway.id,
        hpke_public_key=gateway.hpke_public_key,
        wrapped_private_key=record.wrapped,
        key_version=gateway.key_version,
        rotation=rotation.describe(record, active),
    )


@router.post(
    "/{gateway_id}/key-rotation",
    responses={202: {"description": "Accepted; finishes when a member is online"}},
)
async def rotate_key(
    gateway_id: str,
    body: KeyRotation,
    caller: CurrentUser,
    session: SessionDep,
    request: Request,
    response: Response,
) -> dict[str, Any]:
    """Start a rotation and drive it: 200 when every connection was re-sealed and the gateway
    uses the new key, 202 when it waits for a member to come online."""
    gateway = await queries.visible_gateway(session, gateway_id, caller.id, caller.is_admin)
    await session.close()  # the rotation uses its own short transactions
    complete, status = await rotation.start(
        request.app.state,
        gateway.id,
        hpke_public_key=body.hpke_public_key,
        wrapped_private_key=body.wrapped_private_key,
        transport=body.transport,
        key_version=body.key_version,
    )
    response.status_code = 200 if complete else 202
    return status
