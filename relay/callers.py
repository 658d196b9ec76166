"""Who is calling, for a token seen before: the per-request half of :mod:`relay.identity`.

Every invoke authenticates its bearer token. Once a token's caller is cached, that is a hash,
a cache lookup and, once a minute, a note of the token's use: here, in a module the compiled
build includes (setup.py), instead of an interpreted coroutine per request. A token not in
the cache (new, changed since, or unknown) takes :func:`relay.identity.authenticate`, which
loads it and fills the cache this module reads.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from backhaul.aio.background import Background
from relay.cache import ReadCache
from relay.store import queries
from relay.store.models import utcnow

log = structlog.get_logger("backhaul.relay.identity")

API_TOKEN_PREFIX = "bh_"  # noqa: S105 - a prefix, not a secret
ADMIN = "admin"
#: ``last_used_at`` is written at most this often per token and relay process, in the
#: background, to keep requests read-only.
TOUCH_SECONDS = 60.0


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


#: Token hash → (caller, token id); any write to the store invalidates it.
TOKENS = ReadCache()
#: Token hash → when (monotonic clock) this process last wrote, or set out to write, its use.
TOUCHED: dict[str, float] = {}
_TOUCHED_MAX = 10_000
touches = Background()


def cached_caller(token: str | None, engine: AsyncEngine) -> Principal | None:
    """The caller behind ``token`` when the cache knows it (its use noted); None otherwise,
    refusals included: :func:`relay.identity.authenticate` names those."""
    if not token or not token.startswith(API_TOKEN_PREFIX):
        return None
    digest = hash_token(token)
    cached: tuple[Principal, str] | None = TOKENS.get(digest)
    if cached is None:
        return None
    note_use(engine, digest, cached[1])
    return cached[0]


def note_use(engine: AsyncEngine, digest: str, token_id: str) -> None:
    """Record a token's use in ``last_used_at``, at most once per :data:`TOUCH_SECONDS`.

    In the background, and not through an ORM session: the request does not wait for a
    write, and the write does not count as a store change (relay.cache), which would drop
    every cached token and connection. Had the request waited, every caller of a busy token
    would have found it due at the same moment, once a minute, and each opened a database
    session for the same write (the connection pool's overflow, a thread per connection).
    """
    now = time.monotonic()
    last = TOUCHED.get(digest)
    if last is not None and now - last < TOUCH_SECONDS:
        return
    if len(TOUCHED) >= _TOUCHED_MAX:
        TOUCHED.clear()
    TOUCHED[digest] = now
    touches.spawn(_touch(engine, token_id))


async def drain() -> None:
    """Wait for the tokens' use still being written (before the engine is disposed)."""
    await touches.drain()


async def _touch(engine: AsyncEngine, token_id: str) -> None:
    try:
        async with engine.begin() as conn:
            await queries.touch_api_token(conn, token_id, utcnow())
    except Exception as exc:  # bookkeeping: the request it records has been served
        log.warning("token.touch_failed", token_id=token_id, error=str(exc))
