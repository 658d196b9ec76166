"""Audit retention: events past ``audit_retention_days`` are deleted by id range, in batches,
on SQLite and on PostgreSQL; the relay runs the sweep at start."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay import audit, audit_retention
from relay.app import create_app
from relay.config import RelayConfig
from relay.store import migrate
from relay.store.db import make_engine
from relay.store.models import AuditEvent

NOW = dt.datetime.now(dt.UTC)
AGES = [400, 91, 90.01, 89.99, 1, 0]  # days


def _row(age_days: float, index: int) -> dict[str, Any]:
    at = NOW - dt.timedelta(days=age_days)
    nanoseconds = int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000
    return {
        "id": f"aud_{nanoseconds:019d}{index:08x}",
        "at": at,
        "actor_id": "usr_1",
        "action": audit.INVOKE,
        "object_type": "connection",
        "object_id": "cxn_1",
        "result": "ok",
    }


async def _filled(url: str) -> AsyncEngine:
    engine = make_engine(url)
    await migrate.prepare(engine)
    async with engine.begin() as conn:
        await conn.execute(insert(AuditEvent), [_row(a, i) for i, a in enumerate(AGES)])
    return engine


async def _ages(engine: AsyncEngine) -> list[float]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(AuditEvent.at).order_by(AuditEvent.id))).scalars()
        return [round((NOW - at).total_seconds() / 86400, 2) for at in rows]


async def _prunes_by_age(url: str) -> None:
    engine = await _filled(url)
    try:
        older_than = NOW - dt.timedelta(days=90)
        assert await audit_retention.prune(engine, older_than, batch=1) == 3  # a batch a row
        assert await _ages(engine) == [89.99, 1, 0]
        assert await audit_retention.prune(engine, older_than) == 0
    finally:
        await engine.dispose()


async def test_events_older_than_the_window_go_and_the_rest_stay_on_sqlite(
    tmp_path: Path,
) -> None:
    await _prunes_by_age(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")


async def test_events_older_than_the_window_go_and_the_rest_stay_on_postgresql(
    postgres_url: str,
) -> None:
    await _prunes_by_age(postgres_url)


def test_the_cut_sorts_with_the_ids_the_relay_writes() -> None:
    before = audit.new_event_id()
    cut = audit_retention.first_id_after(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    after = audit_retention.first_id_after(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    assert after < before < cut


async def test_zero_days_keeps_everything(tmp_path: Path) -> None:
    engine = await _filled(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    try:
        pruner = audit_retention.Pruner(engine, 0, every=0.01)
        pruner.start()
        await asyncio.sleep(0.1)
        await pruner.stop()
        assert len(await _ages(engine)) == len(AGES)
    finally:
        await engine.dispose()


async def test_a_failed_sweep_deletes_nothing_and_the_next_one_runs(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")  # no tables yet
    try:
        pruner = audit_retention.Pruner(engine, 90, every=0.01)
        assert await pruner.sweep() == 0
        await migrate.prepare(engine)
        async with engine.begin() as conn:
            await conn.execute(insert(AuditEvent), [_row(a, i) for i, a in enumerate(AGES)])
        assert await pruner.sweep() == 3
    finally:
        await engine.dispose()


async def test_the_relay_sweeps_at_start(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    await (await _filled(url)).dispose()
    config = RelayConfig(data_dir=tmp_path, database_url=url, dev=True, audit_retention_days=30)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if len(await _ages(app.state.engine)) < len(AGES):
                break
            await asyncio.sleep(0.01)
        assert await _ages(app.state.engine) == [1, 0]


async def test_stopping_ends_a_sweep_between_batches_without_cancelling_one(
    tmp_path: Path,
) -> None:
    engine = await _filled(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    try:
        stop = asyncio.Event()
        stop.set()
        assert await audit_retention.prune(engine, NOW, batch=1, stop=stop) == 0
        pruner = audit_retention.Pruner(engine, 90)
        pruner.start()
        await asyncio.sleep(0)  # the sweep has begun its first batch
        await pruner.stop()  # waits for that batch, then ends
        assert len(await _ages(engine)) in range(3, len(AGES) + 1)
    finally:
        await engine.dispose()
