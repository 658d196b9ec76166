"""The audit log: who shared, unshared or invoked what, when, with what result and volume.

One row per event in ``audit_events``, readable by admins (``GET /v1/audit``,
``backhaul audit``). Rows carry ids, never names or secrets, and have no foreign keys: the
record outlives the connection, connector or user it mentions.

An invoke is recorded when it ends, not when it starts, so the row has the status the caller
saw and the bytes that actually went through: the response body is counted as it is sent, and
the row is written when the body finishes or breaks off. Request bytes are the declared
``Content-Length`` (online invokes count them as they stream). Writing the row never fails
the request it describes: an audit write error is logged.

Event ids are time-ordered (``aud_`` + nanoseconds + random), so ``before=<id>`` pages back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import random
import time
from collections.abc import Callable
from typing import Any

import structlog
from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import Dialect, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from starlette.types import Message, Receive, Scope, Send

from backhaul.aio.background import Background
from relay.headers import request_header
from relay.identity import Principal
from relay.store.models import AuditEvent, UTCDateTime, utcnow

log = structlog.get_logger("backhaul.relay.audit")

CONNECTION_SHARE = "connection.share"
CONNECTION_UNSHARE = "connection.unshare"
CONNECTOR_SHARE = "connector.share"
CONNECTOR_UNSHARE = "connector.unshare"
CONNECTOR_DELETE = "connector.delete"
OAUTH_CONSENT = "oauth.consent"
INVOKE = "invoke"
#: Where online invokes leave the request bytes they streamed.
BYTES_IN_KEY = "backhaul.bytes_in"

_pending = Background()


#: The random part of event ids tells apart rows written in the same nanosecond; it orders
#: nothing and guards nothing, so it comes from a generator seeded once, not from a system
#: call per row.
_ID_RANDOM = random.Random(os.urandom(16))


def new_event_id() -> str:
    return _event_id(time.time_ns())


def _event_id(ns: int) -> str:
    """The id of an event at ``ns`` nanoseconds since the epoch."""
    return f"aud_{ns:019d}{_ID_RANDOM.getrandbits(32):08x}"


def add(session: AsyncSession, **fields: Any) -> AuditEvent:
    """Add an event to the caller's transaction (committed with the change it describes)."""
    event = AuditEvent(id=new_event_id(), at=utcnow(), **fields)
    session.add(event)
    return event


async def write(engine: AsyncEngine, **fields: Any) -> None:
    """Write an event in its own transaction; failures are logged, never raised.

    A Core insert rather than an ORM session: an audit row changes nothing the invoke path
    caches (relay.cache), so it must not count as a store write.
    """
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(AuditEvent).values(id=new_event_id(), at=utcnow(), **fields))
    except Exception as exc:  # the audited request must not fail because of its record
        log.error("audit.write_failed", action=fields.get("action"), error=type(exc).__name__)


#: Invoke records wait this long to be written together: one transaction for many invokes
#: instead of one per invoke (the audit row was the most expensive step of a small request).
FLUSH_DELAY = 0.1
#: A row of ``audit_events`` in the table's column order (:data:`_COLUMNS`).
Row = tuple[Any, ...]
#: What an answered invoke leaves in the queue: ``(time_ns, actor_id, object_id, detail,
#: result, status, bytes_in, bytes_out)``. Its id and time are made when its batch is
#: written (:func:`invoke_row`), not in the request: at one client the relay's work after
#: the answer has gone out still holds the core that the caller's next request waits for.
Invoked = tuple[int, str, str, str, str, int, int | None, int]

#: Keyed by ``id(engine)``: an AsyncEngine's own hash is Python code, run twice per invoke.
#: A batch exists only while its flusher, which holds the engine, runs; a finished flusher
#: left under an id that a later engine reuses is ``done()`` and replaced.
_batches: dict[int, list[Invoked]] = {}
_flushers: dict[int, asyncio.Task[None]] = {}


def _later(engine: AsyncEngine, invoked: Invoked) -> asyncio.Task[None]:
    """Queue an invoke record; the returned task finishes once it is written."""
    key = id(engine)
    batch = _batches.get(key)
    if batch is None:
        batch = _batches[key] = []
    batch.append(invoked)
    task = _flushers.get(key)
    if task is None or task.done():
        task = _flushers[key] = _pending.spawn(_flush_soon(engine))
    return task


async def _flush_soon(engine: AsyncEngine) -> None:
    """Write the queued records every FLUSH_DELAY while records keep coming.

    The delay comes before every batch, not only the first: rows queued while one batch is
    being written wait for the next, instead of going out at once in a batch of their own —
    under steady load that had shrunk the batches to a row or two, each a transaction with
    several round trips to the database thread.
    """
    while True:
        await asyncio.sleep(FLUSH_DELAY)
        invoked = _batches.pop(id(engine), None)
        if not invoked:
            return
        rows = [invoke_row(one) for one in invoked]
        try:
            async with engine.begin() as conn:
                await _insert(conn, rows)
        except Exception as exc:  # the audited requests must not fail because of their records
            log.error("audit.write_failed", action=INVOKE, rows=len(rows), error=type(exc).__name__)


#: The columns of a batch row, in the table's order.
_COLUMNS = tuple(column.name for column in AuditEvent.__table__.columns)
#: The order :func:`invoke_row` builds its tuples in.
_ROW_COLUMNS = (
    "id",
    "at",
    "actor_id",
    "action",
    "object_type",
    "object_id",
    "subject_id",
    "result",
    "status",
    "bytes_in",
    "bytes_out",
    "detail",
)
if _COLUMNS != _ROW_COLUMNS:  # the model changed: invoke_row must follow it
    raise RuntimeError(f"audit_events columns are {_COLUMNS}, invoke_row builds {_ROW_COLUMNS}")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def invoke_row(invoked: Invoked) -> Row:
    """An invoke's record as the row it is stored as: a tuple in column order, not a dict
    of fields to be taken apart again column by column."""
    ns, actor_id, object_id, detail, result, status, bytes_in, bytes_out = invoked
    return (
        _event_id(ns),
        _EPOCH + dt.timedelta(microseconds=ns // 1000),
        actor_id,
        INVOKE,
        "connection",
        object_id,
        None,
        result,
        status,
        bytes_in,
        bytes_out,
        detail,
    )


#: SQLite takes a batch as multi-row ``INSERT ... VALUES (...), (...)`` statements of up to
#: this many rows, each prepared once per size and then taken from the statement cache: the
#: database thread binds a statement's parameters in one call and runs one step for its
#: rows. 64 rows at most, and no more parameters than the 999 of SQLite before 3.32.
#: ``OR FAIL``: a statement that cannot abort half-way needs no statement journal, which
#: SQLite otherwise writes for every statement after a transaction's first (a duplicate id
#: still fails the batch, whose transaction is then rolled back whole). Against the one
#: statement over a JSON array this replaced, which parsed each row's array once per column:
#: the database thread 0.003 against 0.004-0.005 ms per small invoke (bench/PROFILE.md, "The
#: audit row, again").
_SQLITE_ROWS = min(64, 999 // len(_COLUMNS))
_ROW_SQL = "(" + ", ".join("?" * len(_COLUMNS)) + ")"


@functools.cache
def _sqlite_insert(rows: int) -> str:
    """The statement for ``rows`` rows, made once per size."""
    return (
        f"INSERT OR FAIL INTO audit_events ({', '.join(_COLUMNS)}) VALUES "  # noqa: S608
        + ", ".join([_ROW_SQL] * rows)
    )


async def _insert(conn: AsyncConnection, rows: list[Row]) -> None:
    """Insert a batch of rows: multi-row statements on SQLite, ``executemany`` elsewhere."""
    if conn.dialect.name != "sqlite":
        await conn.execute(
            insert(AuditEvent), [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
        )
        return
    binds = _sqlite_binds(conn.dialect)
    for first in range(0, len(rows), _SQLITE_ROWS):
        chunk = rows[first : first + _SQLITE_ROWS]
        values: list[Any] = []
        for row in chunk:
            bound = list(row)
            for index, bind in binds:
                value = bound[index]
                if value is not None:
                    bound[index] = bind(value)
            values.extend(bound)
        await conn.exec_driver_sql(_sqlite_insert(len(chunk)), tuple(values))


@functools.cache
def _sqlite_binds(dialect: Dialect) -> tuple[tuple[int, Callable[[Any], Any]], ...]:
    """The columns whose values SQLite gets converted (by position), and how: the values the
    ORM would store, so that reads through it see the same rows. Only the time, as it is."""
    binds: list[tuple[int, Callable[[Any], Any]]] = []
    for index, column in enumerate(AuditEvent.__table__.columns):
        if isinstance(column.type, UTCDateTime):
            binds.append((index, _sqlite_time))
        elif (bind := column.type.dialect_impl(dialect).bind_processor(dialect)) is not None:
            binds.append((index, bind))
    return tuple(binds)


def _sqlite_time(value: Any) -> str:
    """A time as SQLAlchemy stores UTCDateTime on SQLite (``2026-12-05 03:41:19.178743``),
    from ``datetime.isoformat`` in C: SQLAlchemy's own processors take 1.4 us a row."""
    assert isinstance(value, dt.datetime)
    when: dt.datetime = value
    if when.tzinfo is not dt.UTC and when.utcoffset() is not None:
        when = when.astimezone(dt.UTC)
    return when.isoformat(" ", "microseconds")[:26]


async def drain() -> None:
    """Wait for invoke records still being written (shutdown, tests)."""
    await _pending.drain()


def _declared_length(scope: Scope) -> int | None:
    value = request_header(scope, b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


async def invoke_refused(
    request: Request, user: Principal, connection_id: str, status: int, detail: str
) -> None:
    await write(
        request.scope["app"].state.engine,
        actor_id=user.id,
        action=INVOKE,
        object_type="connection",
        object_id=connection_id[:40],
        result="refused",
        status=status,
        bytes_in=0,
        bytes_out=0,
        detail=detail[:500],
    )


def track_invoke(
    request: Request, user: Principal, connection_id: str, response: Response
) -> Response:
    """Record the invoke once its response body has gone out (or broken off)."""
    detail = f"{request.scope['method']} {request.scope['path']}"[:500]
    return AuditedResponse(request, response, user.id, connection_id, detail)


class AuditedResponse(Response):
    """Any response, wrapped at the ASGI level to count the body bytes it sends.

    Counting ``send`` messages works for every response class the invoke path produces
    (a tunnel stream, an online stream, a forwarded one, a plain body). A caller that has read
    the whole declared body may hang up before the stream has seen its own end: that is a
    delivered response, not an aborted one.
    """

    def __init__(
        self, request: Request, inner: Response, actor_id: str, object_id: str, detail: str
    ) -> None:
        self.inner = inner
        self.status_code = inner.status_code
        self.background = inner.background
        self.raw_headers = inner.raw_headers
        self._request = request
        self._actor_id = actor_id
        self._object_id = object_id
        self._detail = detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = self.inner.status_code
        sent = 0
        declared: int | None = None
        started = finished = False

        async def counting(message: Message) -> None:
            nonlocal status, sent, declared, started, finished
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"content-length" and value.strip().isdigit():
                        declared = int(value)
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                finished = finished or not message.get("more_body", False)
            await send(message)

        try:
            await self.inner(scope, receive, counting)
            if self.background is not None and self.background is not self.inner.background:
                await self.background()
        finally:
            self.record(status, sent, declared, started, finished)

    def record(
        self, status: int, sent: int, declared: int | None, started: bool, finished: bool
    ) -> None:
        """Queue the invoke's row: ``sent`` body bytes of ``declared``, ``finished`` when the
        body's end went out (also called by :class:`relay.edge.DirectReply`, which counts
        them itself)."""
        scope = self._request.scope
        head = scope["method"] == "HEAD" and started
        complete = finished or head or (declared is not None and sent >= declared)
        result = "aborted"
        if complete:
            result = "ok" if status < 400 else "error"
        bytes_in = scope[BYTES_IN_KEY] if BYTES_IN_KEY in scope else _declared_length(scope)
        # Not awaited: the row goes out with the next batch, and shutdown waits for it
        # (drain). Waiting here held every request's task for the batch delay.
        _later(
            self._request.scope["app"].state.engine,
            (
                time.time_ns(),
                self._actor_id,
                self._object_id,
                self._detail,
                result,
                status,
                bytes_in,
                sent,
            ),
        )


async def events(
    session: AsyncSession,
    *,
    limit: int,
    before: str | None = None,
    action: str | None = None,
    actor_id: str | None = None,
    object_id: str | None = None,
) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if actor_id is not None:
        query = query.where(AuditEvent.actor_id == actor_id)
    if object_id is not None:
        query = query.where(AuditEvent.object_id == object_id)
    return list(await session.scalars(query))
