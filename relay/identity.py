"""Who is calling: API tokens, enrollment tokens and the FastAPI dependencies that check them.

Tokens are 256-bit random strings, so the database keeps only their SHA-256: a slow password
hash buys nothing against a secret that cannot be guessed, and a fast one lets every request
look its caller up by an indexed column (a database leak still yields no usable token).
The ``bh_`` / ``bhe_`` prefixes let secret scanners and log redaction recognise them.

Bearer handling follows RFC 6750: a missing or bad token is 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from backhaul.aio.background import Background
from relay.cache import ReadCache
from relay.problems import ProblemError
from relay.store import queries
from relay.store.db import sessions
from relay.store.models import utcnow

log = structlog.get_logger("backhaul.relay.identity")

API_TOKEN_PREFIX = "bh_"  # noqa: S105 - a prefix, not a secret
ENROLLMENT_TOKEN_PREFIX = "bhe_"  # noqa: S105
ADMIN = "admin"
USER = "user"
ROLES = (ADMIN, USER)
#: ``last_used_at`` is written at most this often per token and relay process, in the
#: background, to keep requests read-only.
TOUCH_SECONDS = 60.0

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


#: Token hash → (caller, token id); any write to the store invalidates it.
_TOKENS = ReadCache()
#: Token hash → when (monotonic clock) this process last wrote, or set out to write, its use.
_TOUCHED: dict[str, float] = {}
_TOUCHED_MAX = 10_000
_touches = Background()


def _note_use(engine: AsyncEngine, digest: str, token_id: str) -> None:
    """Record a token's use in ``last_used_at``, at most once per :data:`TOUCH_SECONDS`.

    In the background, and not through an ORM session: the request does not wait for a
    write, and the write does not count as a store change (relay.cache), which would drop
    every cached token and connection. Had the request waited, every caller of a busy token
    would have found it due at the same moment, once a minute, and each opened a database
    session for the same write (the connection pool's overflow, a thread per connection).
    """
    now = time.monotonic()
    last = _TOUCHED.get(digest)
    if last is not None and now - last < TOUCH_SECONDS:
        return
    if len(_TOUCHED) >= _TOUCHED_MAX:
        _TOUCHED.clear()
    _TOUCHED[digest] = now
    _touches.spawn(_touch(engine, token_id))


async def drain() -> None:
    """Wait for the tokens' use still being written (before the engine is disposed)."""
    await _touches.drain()


async def _touch(engine: AsyncEngine, token_id: str) -> None:
    try:
        async with engine.begin() as conn:
            await queries.touch_api_token(conn, token_id, utcnow())
    except Exception as exc:  # bookkeeping: the request it records has been served
        log.warning("token.touch_failed", token_id=token_id, error=str(exc))


async def require_admin(user: Annotated[Principal, Depends(current_user)]) -> Principal:
    if not user.is_admin:
        raise ProblemError(403, "Forbidden", "this operation needs the admin role")
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]
AdminUser = Annotated[Principal, Depends(require_admin)]
