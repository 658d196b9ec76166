"""Invoke records are written in batches: one transaction per FLUSH_DELAY under steady load."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import IntegrityError

from relay import audit
from relay.store.db import make_engine
from relay.store.models import AuditEvent, Base


def _record(engine: Any, index: int) -> None:
    audit._later(engine, (time.time_ns(), "usr_1", "cxn_1", f"GET /x/{index}", "ok", 200, None, 10))


async def test_records_arriving_during_a_write_wait_for_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    batches: list[int] = []

    def count(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        if statement.startswith("INSERT") and " INTO audit_events " in statement:
            # SQLite gets a batch of up to audit._SQLITE_ROWS rows as one multi-row
            # statement (audit._insert), other databases as one executemany.
            batches.append(len(params) if many else len(params) // len(audit._COLUMNS))

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    monkeypatch.setattr(audit, "FLUSH_DELAY", 0.05)
    try:
        # One record every 2 ms for 0.5 s: steady load, as a busy connection makes it.
        started = time.monotonic()
        for index in range(250):
            _record(engine, index)
            await asyncio.sleep(0.002)
        await audit.drain()
        elapsed = time.monotonic() - started
        async with engine.connect() as conn:
            written = await conn.scalar(select(func.count()).select_from(AuditEvent))
    finally:
        await engine.dispose()
    assert written == 250
    assert sum(batches) == 250
    # One batch per 50 ms at most, however long the load took on this machine: a record
    # that arrives while a batch is being written waits for the next one.
    assert len(batches) <= elapsed / 0.05 + 1, (elapsed, batches)


FIELDS: list[dict[str, Any]] = [
    {
        "id": "aud_1",
        "at": dt.datetime(2026, 12, 4, 13, 1, 2, 345678, tzinfo=dt.UTC),
        "actor_id": "usr_1",
        "action": audit.INVOKE,
        "object_type": "connection",
        "object_id": "cxn_1",
        "subject_id": "usr_9",
        "detail": 'GET /v1/connections/cxn_1/invoke/caf\u00e9 "quoted" \\ back',
        "status": 200,
        "result": "ok",
        "bytes_in": None,
        "bytes_out": 2**40,
    },
    {
        "id": "aud_2",
        "at": dt.datetime(2026, 12, 4, 14, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "actor_id": "usr_2",
        "action": audit.CONNECTION_SHARE,
        "object_type": "connection",
        "object_id": "cxn_2",
        "subject_id": None,
        "status": None,
        "result": "refused",
        "bytes_in": 0,
        "bytes_out": 0,
        "detail": None,
    },
]


def _row(fields: dict[str, Any]) -> audit.Row:
    return tuple(fields[name] for name in audit._COLUMNS)


ROWS = [_row(fields) for fields in FIELDS]


async def _stored(engine: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        raw = (await conn.exec_driver_sql("SELECT * FROM audit_events ORDER BY id")).all()
        orm = (await conn.execute(select(AuditEvent).order_by(AuditEvent.id))).all()
    return [tuple(r) for r in raw] + [tuple(r) for r in orm]


async def test_sqlite_batch_stores_what_the_orm_would(tmp_path: Path) -> None:
    """The multi-row SQLite statements and SQLAlchemy's own insert store the same rows."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    for way in ("batch", "core"):
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / way}.db")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            async with engine.begin() as conn:
                if way == "batch":
                    await audit._insert(conn, ROWS)
                else:
                    await conn.execute(insert(AuditEvent), FIELDS)
            found[way] = await _stored(engine)
        finally:
            await engine.dispose()
    assert found["batch"] == found["core"]
    assert found["batch"][0][-1].endswith('caf\u00e9 "quoted" \\ back')


async def test_a_sqlite_batch_longer_than_one_statement_is_stored_whole(tmp_path: Path) -> None:
    """Rows beyond one multi-row statement go out in more of them, the last one shorter."""
    fields = [
        dict(FIELDS[index % 2], id=f"aud_{index:04d}", bytes_out=index)
        for index in range(2 * audit._SQLITE_ROWS + 5)
    ]
    rows = [_row(one) for one in fields]
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'long.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await audit._insert(conn, rows)
        async with engine.connect() as conn:
            stored = (
                await conn.execute(
                    select(AuditEvent.id, AuditEvent.bytes_out).order_by(AuditEvent.id)
                )
            ).all()
    finally:
        await engine.dispose()
    assert [tuple(row) for row in stored] == [(f["id"], f["bytes_out"]) for f in fields]


async def test_a_sqlite_batch_with_a_duplicate_id_is_not_stored_at_all(tmp_path: Path) -> None:
    """OR FAIL keeps the rows before a failing one, but the batch's transaction goes whole."""
    rows = [_row(dict(FIELDS[0], id=f"aud_{i:04d}")) for i in range(audit._SQLITE_ROWS + 3)]
    rows.append(_row(dict(FIELDS[0], id="aud_0001")))
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'dup.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await audit._insert(conn, rows)
        async with engine.connect() as conn:
            written = await conn.scalar(select(func.count()).select_from(AuditEvent))
    finally:
        await engine.dispose()
    assert written == 0


async def test_postgresql_batch_is_the_orm_insert(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await audit._insert(conn, ROWS)
            at = await conn.scalar(select(AuditEvent.at).where(AuditEvent.id == "aud_2"))
            count = await conn.scalar(select(func.count()).select_from(AuditEvent))
    finally:
        await engine.dispose()
    assert count == 2
    assert at == dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 12, 5, 3, 41, 35, 663610, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC),  # no microseconds: still six digits
        dt.datetime(5, 1, 2, 3, 4, 5, 6),  # naive: taken as UTC, as UTCDateTime does
        dt.datetime(2026, 6, 1, 12, 0, 0, 999999, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    ],
)
def test_sqlite_batch_times_are_stored_as_sqlalchemy_stores_them(value: dt.datetime) -> None:
    from sqlalchemy.dialects import sqlite

    dialect = sqlite.dialect()
    column = AuditEvent.__table__.c.at
    sqlalchemy_bind = column.type.dialect_impl(dialect).bind_processor(dialect)
    assert sqlalchemy_bind is not None
    assert audit._sqlite_time(value) == sqlalchemy_bind(value)


def test_an_invoke_row_is_in_the_table_column_order() -> None:
    """invoke_row builds tuples by position: each value lands in the column it names; the id
    and the time are the queued record's moment."""
    ns = 1_764_948_079_178_743_912
    row = audit.invoke_row((ns, "usr_1", "cxn_1", "GET /x", "ok", 200, 5, 1024))
    named = dict(zip(audit._COLUMNS, row, strict=True))
    assert named["id"].startswith(f"aud_{ns:019d}")
    assert len(named["id"]) == len(audit.new_event_id())
    assert named["at"] == dt.datetime(2025, 12, 5, 15, 21, 19, 178743, tzinfo=dt.UTC)
    assert named["at"].tzinfo is dt.UTC
    assert {k: v for k, v in named.items() if k not in ("id", "at")} == {
        "actor_id": "usr_1",
        "action": audit.INVOKE,
        "object_type": "connection",
        "object_id": "cxn_1",
        "subject_id": None,
        "result": "ok",
        "status": 200,
        "bytes_in": 5,
        "bytes_out": 1024,
        "detail": "GET /x",
    }
