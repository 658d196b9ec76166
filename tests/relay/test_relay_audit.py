"""Invoke records are written in batches: one transaction per FLUSH_DELAY under steady load."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select

from relay import audit
from relay.store.db import make_engine
from relay.store.models import AuditEvent, Base


def _record(engine: Any, index: int) -> None:
    audit._later(
        engine,
        actor_id="usr_1",
        action=audit.INVOKE,
        object_type="connection",
        object_id="cxn_1",
        detail=f"GET /x/{index}",
        status=200,
        result="ok",
        bytes_in=None,
        bytes_out=10,
    )


async def test_records_arriving_during_a_write_wait_for_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    batches: list[int] = []

    def count(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        if statement.startswith("INSERT INTO audit_events"):
            # SQLite gets a batch as one JSON array (audit._insert), other databases as
            # one executemany.
            batches.append(len(params) if many else len(json.loads(params[0])))

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


ROWS: list[dict[str, Any]] = [
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


async def _stored(engine: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        raw = (await conn.exec_driver_sql("SELECT * FROM audit_events ORDER BY id")).all()
        orm = (await conn.execute(select(AuditEvent).order_by(AuditEvent.id))).all()
    return [tuple(r) for r in raw] + [tuple(r) for r in orm]


async def test_sqlite_batch_stores_what_the_orm_would(tmp_path: Path) -> None:
    """The one-statement SQLite batch and SQLAlchemy's own insert store the same rows."""
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
                    await conn.execute(insert(AuditEvent), ROWS)
            found[way] = await _stored(engine)
        finally:
            await engine.dispose()
    assert found["batch"] == found["core"]
    assert found["batch"][0][-1].endswith('caf\u00e9 "quoted" \\ back')


async def test_sqlite_without_json_functions_falls_back_to_executemany(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        audit, "_SQLITE_BATCH", audit._SQLITE_BATCH.replace("json_each", "json_nope")
    )
    monkeypatch.setattr(audit, "_sqlite_json", True)
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        for _ in range(2):  # the second batch goes straight to executemany
            async with engine.begin() as conn:
                await audit._insert(
                    conn, [dict(r, id=r["id"] + secrets.token_hex(2)) for r in ROWS]
                )
        async with engine.connect() as conn:
            written = await conn.scalar(select(func.count()).select_from(AuditEvent))
    finally:
        await engine.dispose()
    assert written == 4
    assert audit._sqlite_json is False


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
