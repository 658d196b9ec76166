"""POST /v1/enroll: an agent trades a one-time enrollment token for a member identity.

The token is the only authentication, so every failure is a 401 whose detail says which
check failed (unknown, expired, already used): an operator re-running ``enroll`` needs to
know whether to mint a new token. The token is consumed by a conditional UPDATE in the same
transaction that creates the member, so two agents racing with one token get one member,
and a refused request (bad key, 409) leaves the token unused.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, StringConstraints

from backhaul.errors import SealError
from backhaul.keys import b64d
from backhaul.seal import validate_public_key
from relay.identity import ENROLLMENT_TOKEN_PREFIX, hash_token
from relay.problems import ProblemError
from relay.store import queries
from relay.store.db import SessionDep
from relay.store.models import Gateway, utcnow

router = APIRouter(prefix="/v1", tags=["enrollment"])


class EnrollRequest(BaseModel):
    token: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
    hostname: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
    version: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    signing_public_key: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    hpke_public_key: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class EnrollResponse(BaseModel):
    member_id: str
    gateway_id: str
    gateway_name: str


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


@router.post("/enroll", status_code=201)
async def enroll(body: EnrollRequest, session: SessionDep) -> EnrollResponse:
    if not body.token.startswith(ENROLLMENT_TOKEN_PREFIX):
        raise _refused("unknown enrollment token")
    token = await queries.enrollment_by_hash(session, hash_token(body.token))
    if token is None:
        raise _refused("unknown enrollment token")
    if token.used_at is not None:
        raise _refused("enrollment token already used; create a new one")
    if utcnow() >= token.expires_at:
        raise _refused("enrollment token expired; create a new one")
    _check_signing_key(body.signing_public_key)
    _check_hpke_key(body.hpke_public_key)

    if not await queries.consume_enrollment(session, token.id):
        await session.rollback()
        raise _refused("enrollment token already used; create a new one")
    gateway_key = await queries.claim_gateway_key(session, token.gateway_id, body.hpke_public_key)
    if gateway_key != body.hpke_public_key:
        await session.rollback()
        raise ProblemError(
            409,
            "Gateway key mismatch",
            "this gateway already has a key; a further member must join with the gateway's "
            "existing key",
        )
    member = await queries.add_member(
        session,
        token.gateway_id,
        body.name,
        body.hostname,
        body.signing_public_key,
        body.version,
    )
    gateway = await session.get(Gateway, token.gateway_id)
    assert gateway is not None
    await session.commit()
    return EnrollResponse(member_id=member.id, gateway_id=gateway.id, gateway_name=gateway.name)
