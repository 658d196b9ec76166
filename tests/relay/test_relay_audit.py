"""Invoke records are written in batches: one transaction per FLUSH_DELAY under steady load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

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
            batches.append(len(params) if many else 1)

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
