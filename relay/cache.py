"""A read cache for the invoke path, invalidated by any write to the store.

Every invoke needs the caller's token and the connection's routing facts; reading them from
the database on each request costs more than the rest of the relay's work. Writes, on the
other hand, are rare (a new connection, a share, a revocation). So entries are stamped with a
*generation* that every committed write bumps — on this instance through SQLAlchemy's session
events, on the others through the registry's pub/sub — and an entry from an older generation
is a miss. An entry carries the generation its load started in, so a write committed while
the load ran makes it a miss at once. A revocation is therefore never served from the cache,
not even for a moment. Concurrent misses of one key share one load (:meth:`ReadCache.load`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session

from relay.problems import ProblemError
from relay.store import Forbidden, NotFound

T = TypeVar("T")

_MAX_ENTRIES = 10_000


class Generation:
    """A counter bumped after every committed write; listeners hear about local bumps."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self.value = 0
        self.listeners: list[Callable[[], None]] = []

    def bump(self, notify: bool = True) -> None:
        self.value = next(self._counter)
        if notify:
            for listener in self.listeners:
                listener()


GENERATION = Generation()


#: What a load that failed leaves for the callers waiting on it: load it yourselves.
_RETRY: Any = object()


class ReadCache:
    """Bounded LRU of values valid for one store generation."""

    def __init__(self, generation: Generation = GENERATION, size: int = _MAX_ENTRIES) -> None:
        self._generation = generation
        self._size = size
        self._entries: OrderedDict[Any, tuple[int, Any]] = OrderedDict()
        #: Loads under way: key → (the generation they started in, their result to come).
        self._flights: dict[Any, tuple[int, asyncio.Future[Any]]] = {}

    def get(self, key: Any) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != self._generation.value:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Any, value: Any, generation: int | None = None) -> None:
        """Cache ``value``, valid while the store is at ``generation`` (default: now)."""
        stamp = self._generation.value if generation is None else generation
        self._entries[key] = (stamp, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    async def load(self, key: Any, load: Callable[[], Awaitable[Any]]) -> Any:
        """``key``'s value from ``load``, cached; for a key :meth:`get` missed.

        The value is stamped with the generation the load *started* in: a write committed
        while it ran (a revocation, say) may not be in what it read, so the entry is then
        stale at once rather than valid for the new generation. Callers that miss the same
        key in the same generation while a load runs wait for its result instead of each
        querying the store: after every write, all the requests in flight for a busy
        connection miss together. If the load fails or is cancelled, they load for
        themselves.
        """
        generation = self._generation.value
        flight = self._flights.get(key)
        if flight is not None and flight[0] == generation:
            # shield: a waiter's cancellation must not cancel the result the others share.
            value = await asyncio.shield(flight[1])
            if value is not _RETRY:
                return value
            return await load()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        flight = (generation, future)
        self._flights[key] = flight
        loaded = False
        try:
            value = await load()
            loaded = True
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not loaded:
                future.set_result(_RETRY)
        future.set_result(value)
        self.put(key, value, generation)
        return value


async def lookup(
    cache: ReadCache, key: Any, load: Callable[[AsyncSession], Awaitable[T]], sessions: Any
) -> T:
    """``load`` through the cache; NotFound and Forbidden are cached too, as the 404 and 403
    problems they become, so a caller probing unknown ids costs no query either."""
    cached = cache.get(key)
    if cached is None:
        cached = await _miss(cache, key, load, sessions)
    if isinstance(cached, ProblemError):
        raise ProblemError(cached.status, cached.title, cached.detail)
    found: T = cached
    return found


async def _miss(
    cache: ReadCache, key: Any, load: Callable[[AsyncSession], Awaitable[Any]], sessions: Any
) -> Any:
    """A miss of :func:`lookup` (a function of its own: the closure below would cost every
    hit an environment object in the compiled build)."""

    async def query() -> Any:
        async with sessions() as session:
            try:
                return await load(session)
            except NotFound as missing:
                return ProblemError(404, "Not found", str(missing))
            except Forbidden as refused:
                return ProblemError(403, "Forbidden", str(refused))

    return await cache.load(key, query)


def _mark_dirty(session: Session, *_: Any) -> None:
    session.info["backhaul_dirty"] = True


def _on_execute(state: ORMExecuteState) -> None:
    if state.is_update or state.is_delete or state.is_insert:
        state.session.info["backhaul_dirty"] = True


def _after_commit(session: Session) -> None:
    if session.info.pop("backhaul_dirty", False):
        GENERATION.bump()


def install() -> None:
    """Watch every ORM session of the process (idempotent)."""
    if not event.contains(Session, "after_commit", _after_commit):
        event.listen(Session, "before_flush", _mark_dirty)
        event.listen(Session, "do_orm_execute", _on_execute)
        event.listen(Session, "after_commit", _after_commit)
