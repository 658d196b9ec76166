"""Who is calling: API tokens, enrollment tokens and the FastAPI dependencies that check them.

Tokens are 256-bit random strings, so the database keeps only their SHA-256: a slow password
hash buys nothing against a secret that cannot be guessed, and a fast one lets every request
look its caller up by an indexed column (a database leak still yields no usable token).
The ``bh_`` / ``bhe_`` prefixes let secret scanners and log redaction recognise them.

Bearer handling follows RFC 6750: a missing or bad token is 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import functools
import secrets
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# The cached half, per request, lives in relay.callers (compiled); its names stay here too.
from relay.callers import ADMIN as ADMIN
from relay.callers import API_TOKEN_PREFIX as API_TOKEN_PREFIX
from relay.callers import TOKENS as _TOKENS
from relay.callers import Principal as Principal
from relay.callers import drain as drain
from relay.callers import hash_token as hash_token
from relay.callers import note_use as _note_use
from relay.problems import ProblemError
from relay.store import queries
from relay.store.db import sessions

log = structlog.get_logger("backhaul.relay.identity")

ENROLLMENT_TOKEN_PREFIX = "bhe_"  # noqa: S105
USER = "user"
ROLES = (ADMIN, USER)

_bearer = HTTPBearer(auto_error=False, description="An API token (bh_…)")


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_enrollment_token() -> str:
    return ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


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
    cached: tuple[Principal, str] | None = _TOKENS.get(digest)
    if cached is None:
        cached = await _TOKENS.load(digest, functools.partial(_load_token, request, digest))
    _note_use(request.app.state.engine, digest, cached[1])
    return cached[0]


async def _load_token(request: Request, digest: str) -> tuple[Principal, str]:
    async with sessions(request)() as session:
        found = await queries.user_for_token_hash(session, digest)
    if found is None:  # not cached: unknown digests would push the real ones out
        raise unauthorized("invalid, revoked or deleted-user token")
    user, api_token = found
    return Principal(id=user.id, name=user.name, role=user.role), api_token.id


async def require_admin(user: Annotated[Principal, Depends(current_user)]) -> Principal:
    if not user.is_admin:
        raise ProblemError(403, "Forbidden", "this operation needs the admin role")
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]
AdminUser = Annotated[Principal, Depends(require_admin)]
