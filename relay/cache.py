"""A read cache for the invoke path, invalidated by any write to the store.

Every invoke needs the caller's token and the connection's routing facts; reading them from
the database on each request costs more than the rest of the relay's work. Writes, on the
other hand, are rare (a new connection, a share, a revocation). So entries are stamped with a
*generation* that every committed write bumps — on this instance through SQLAlchemy's session
events, on the others through the registry's pub/sub — and an entry from an older generation
is a miss. A revocation is therefore never served from the cache, not even for a moment.
"""

from __future__ import annotations

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


class ReadCache:
    """Bounded LRU of values valid for one store generation."""

    def __init__(self, generation: Generation = GENERATION, size: int = _MAX_ENTRIES) -> None:
        self._generation = generation
        self._size = size
        self._entries: OrderedDict[Any, tuple[int, Any]] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != self._generation.value:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Any, value: Any) -> None:
        self._entries[key] = (self._generation.value, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


async def lookup(
    cache: ReadCache, key: Any, load: Callable[[AsyncSession], Awaitable[T]], sessions: Any
) -> T:
    """``load`` through the cache; NotFound and Forbidden are cached too, as the 404 and 403
    problems they become, so a caller probing unknown ids costs no query either."""
    cached = cache.get(key)
    if cached is None:
        async with sessions() as session:
            try:
                cached = await load(session)
            except NotFound as missing:
                cached = ProblemError(404, "Not found", str(missing))
            except Forbidden as refused:
                cached = ProblemError(403, "Forbidden", str(refused))
        cache.put(key, cached)
    if isinstance(cached, ProblemError):
        raise ProblemError(cached.status, cached.title, cached.detail)
    found: T = cached
    return found


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
