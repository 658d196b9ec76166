"""Who is calling: API tokens, enrollment tokens and the FastAPI dependencies that check them.

Tokens are 256-bit random strings, so the database keeps only their SHA-256: a slow password
hash buys nothing against a secret that cannot be guessed, and a fast one lets every request
look its caller up by an indexed column (a database leak still yields no usable token).
The ``bh_`` / ``bhe_`` prefixes let secret scanners and log redaction recognise them.

Bearer handling follows RFC 6750: a missing or bad token is 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from relay.cache import ReadCache
from relay.problems import ProblemError
from relay.store import queries
from relay.store.db import sessions
from relay.store.models import utcnow

API_TOKEN_PREFIX = "bh_"  # noqa: S105 - a prefix, not a secret
ENROLLMENT_TOKEN_PREFIX = "bhe_"  # noqa: S105
ADMIN = "admin"
USER = "user"
ROLES = (ADMIN, USER)
#: ``last_used_at`` is written at most this often per token, to keep reads read-only.
TOUCH_EVERY = dt.timedelta(minutes=1)

_bearer = HTTPBearer(auto_error=False, description="An API token (bh_…)")


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_enrollment_token() -> str:
    return ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, detached from any database session."""

    id: str
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def unauthorized(detail: str) -> ProblemError:
    challenge = 'Bearer realm="backhaul"'
    if "missing" not in detail:
        challenge += ', error="invalid_token"'
    return ProblemError(401, "Unauthorized", detail, {"WWW-Authenticate": challenge})


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Authenticate the bearer token.

    Uses its own short session rather than the request's, so a long streaming invoke does
    not hold a database connection for its whole life.
    """
    return await authenticate(request, credentials.credentials if credentials else None)


async def authenticate(request: Request, token: str | None) -> Principal:
    """The caller behind a bearer token, or a 401 problem (RFC 6750 §3)."""
    if not token:
        raise unauthorized("missing bearer token (Authorization: Bearer bh_...)")
    if not token.startswith(API_TOKEN_PREFIX):
        raise unauthorized("invalid, revoked or deleted-user token")
    digest = hash_token(token)
    cached: tuple[Principal, dt.datetime] | None = _TOKENS.get(digest)
    now = utcnow()
    if cached is not None and now - cached[1] <= TOUCH_EVERY:
        return cached[0]
    async with sessions(request)() as session:
        found = await queries.user_for_token_hash(session, digest)
        if found is None:
            raise unauthorized("invalid, revoked or deleted-user token")
        user, api_token = found
        last_used = api_token.last_used_at
        if last_used is None or now - last_used > TOUCH_EVERY:
            await queries.touch_api_token(session, api_token.id, now)
            await session.commit()
            last_used = now
        principal = Principal(id=user.id, name=user.name, role=user.role)
    _TOKENS.put(digest, (principal, last_used))
    return principal


#: Token hash → (caller, last recorded use); any write to the store invalidates it.
_TOKENS = ReadCache()


async def require_admin(user: Annotated[Principal, Depends(current_user)]) -> Principal:
    if not user.is_admin:
        raise ProblemError(403, "Forbidden", "this operation needs the admin role")
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]
AdminUser = Annotated[Principal, Depends(require_admin)]
