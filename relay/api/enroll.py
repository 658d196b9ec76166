"""POST /v1/enroll: an agent trades a one-time enrollment token for a member identity.

The token is the only authentication, so every failure is a 401 whose detail says which
check failed (unknown, expired, already used): an operator re-running ``enroll`` needs to
know whether to mint a new token. The token is consumed by a conditional UPDATE in the same
transaction that creates the member, so two agents racing with one token get one member,
and a refused request (bad key, 409) leaves the token unused.

Clusters (docs/clusters.md): ``POST /v1/enroll/prepare`` checks a token *without* using it
and tells the agent the gateway's id, public key and recovery-wrapped private key, so a
joining member can unwrap the key locally (a wrong recovery key then costs nothing) and the
first member can bind its wrapped key to the gateway id. The first member sends
``wrapped_private_key``; further members send ``join: true`` and the gateway's current public
key. A gateway holds at most :data:`~relay.store.clusters.MAX_MEMBERS` non-revoked members;
each new one gets ``priority`` = the number of members before it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, StringConstraints

from backhaul.errors import SealError
from backhaul.keys import b64d
from backhaul.recovery import RecoveryKeyError, check_blob
from backhaul.seal import validate_public_key
from relay.identity import ENROLLMENT_TOKEN_PREFIX, hash_token
from relay.problems import ProblemError
from relay.rotation import KeyRecord
from relay.store import clusters, queries
from relay.store.db import SessionDep
from relay.store.models import EnrollmentToken, Gateway, utcnow

router = APIRouter(prefix="/v1", tags=["enrollment"])


class EnrollRequest(BaseModel):
    token: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
    hostname: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
    version: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    signing_public_key: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    hpke_public_key: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    #: A further member of a gateway that already has a key (it sends that key).
    join: bool = False
    #: First member only: the gateway private key wrapped under the recovery key.
    wrapped_private_key: dict[str, Any] | None = None
    #: The key version the agent was told by prepare (checked when given).
    key_version: int | None = Field(default=None, ge=1)


class EnrollResponse(BaseModel):
    member_id: str
    gateway_id: str
    gateway_name: str


class PrepareRequest(BaseModel):
    token: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class PrepareResponse(BaseModel):
    gateway_id: str
    gateway_name: str
    hpke_public_key: str | None
    wrapped_private_key: dict[str, Any] | None
    key_version: int
    members: int
    max_members: int


def _refused(detail: str) -> ProblemError:
    return ProblemError(401, "Enrollment refused", detail)


def _check_signing_key(text: str) -> None:
    try:
        raw = b64d(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ProblemError(
            422,
            "Invalid request",
            "signing_public_key: must be a 32-byte Ed25519 public key, base64url",
        )


def _check_hpke_key(text: str) -> None:
    try:
        validate_public_key(text)
    except SealError as exc:
        raise ProblemError(422, "Invalid request", f"hpke_public_key: {exc}") from exc


async def _valid_token(session: SessionDep, text: str) -> EnrollmentToken:
    if not text.startswith(ENROLLMENT_TOKEN_PREFIX):
        raise _refused("unknown enrollment token")
    token = await queries.enrollment_by_hash(session, hash_token(text))
    if token is None:
        raise _refused("unknown enrollment token")
    if token.used_at is not None:
        raise _refused("enrollment token already used; create a new one")
    if utcnow() >= token.expires_at:
        raise _refused("enrollment token expired; create a new one")
    return token


@router.post("/enroll/prepare")
async def prepare(body: PrepareRequest, session: SessionDep) -> PrepareResponse:
    """Check a token without using it; describe the gateway it enrolls into."""
    token = await _valid_token(session, body.token)
    gateway = await session.get(Gateway, token.gateway_id)
    if gateway is None:
        raise _refused("unknown enrollment token")
    return PrepareResponse(
        gateway_id=gateway.id,
        gateway_name=gateway.name,
        hpke_public_key=gateway.hpke_public_key,
        wrapped_private_key=KeyRecord.load(gateway.wrapped_private_key).wrapped,
        key_version=gateway.key_version,
        members=await clusters.active_member_count(session, gateway.id),
        max_members=clusters.MAX_MEMBERS,
    )


def _join_hint(gateway: Gateway) -> str:
    return (
        f"gateway {gateway.name} ({gateway.id}) already has a key; add a further member with "
        "the gateway's existing key: backhaul-agent enroll --join --recovery-key KEY"
    )


@router.post("/enroll", status_code=201)
async def enroll(body: EnrollRequest, session: SessionDep) -> EnrollResponse:
    token = await _valid_token(session, body.token)
    _check_signing_key(body.signing_public_key)
    _check_hpke_key(body.hpke_public_key)
    record: str | None = None
    if body.wrapped_private_key is not None:
        if body.join:
            raise ProblemError(
                422, "Invalid request", "wrapped_private_key: only the first member sends it"
            )
        try:
            record = KeyRecord(wrapped=check_blob(body.wrapped_private_key)).dump()
        except RecoveryKeyError as exc:
            raise ProblemError(422, "Invalid request", f"wrapped_private_key: {exc}") from None

    if not await queries.consume_enrollment(session, token.id):
        await session.rollback()
        raise _refused("enrollment token already used; create a new one")
    gateway = await clusters.lock_gateway(session, token.gateway_id)
    members = await clusters.active_member_count(session, gateway.id)
    try:
        if members >= clusters.MAX_MEMBERS:
            raise ProblemError(
                409,
                "Gateway full",
                f"gateway {gateway.name} ({gateway.id}) already has {members} members, the "
                f"maximum is {clusters.MAX_MEMBERS}; revoke one before adding another",
            )
        if body.key_version is not None and gateway.key_version != body.key_version:
            raise ProblemError(
                409,
                "Gateway key changed",
                f"gateway {gateway.id} is now at key version {gateway.key_version} (it was "
                "rotated during enrollment); run the enrollment again",
            )
        if body.join:
            if gateway.hpke_public_key is None:
                raise ProblemError(
                    409,
                    "Gateway has no key",
                    f"gateway {gateway.name} ({gateway.id}) has no member yet; enroll the first "
                    "member without --join",
                )
            if body.hpke_public_key != gateway.hpke_public_key:
                raise ProblemError(
                    409,
                    "Gateway key mismatch",
                    "the key this member holds is not the gateway's current key; run the "
                    "enrollment again",
                )
        elif not await clusters.claim_gateway_key(
            session, gateway.id, body.hpke_public_key, record
        ):
            await session.refresh(gateway)
            if gateway.hpke_public_key != body.hpke_public_key:
                raise ProblemError(409, "Gateway key mismatch", _join_hint(gateway))
    except ProblemError:
        await session.rollback()
        raise
    member = await queries.add_member(
        session,
        token.gateway_id,
        body.name,
        body.hostname,
        body.signing_public_key,
        body.version,
    )
    member.priority = members
    name = gateway.name
    await session.commit()
    return EnrollResponse(member_id=member.id, gateway_id=token.gateway_id, gateway_name=name)
