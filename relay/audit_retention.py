"""Audit retention: events older than ``audit_retention_days`` are deleted, a batch at a time.

Every invoke writes an audit row, so a busy relay adds millions a day; without retention the
table (and a SQLite relay's disk) grows for good. Event ids are time-ordered (``aud_`` and
nanoseconds since the epoch, relay/audit.py), so "older than" is a range of the primary key:
no other index is read, and each batch is a short transaction that requests and audit writes
can pass between. Every relay process (each worker, each instance sharing a database) runs
the sweep; deleting what is already gone deletes nothing, so they need no coordination.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.models import AuditEvent

log = structlog.get_logger("backhaul.relay.audit")

#: Rows deleted per transaction.
BATCH = 5000
#: Seconds between sweeps (with a tenth of jitter either way, so the processes sharing a
#: database spread out).
EVERY = 3600.0


def first_id_after(moment: dt.datetime) -> str:
    """The smallest event id an event written at or after ``moment`` can have."""
    nanoseconds = int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
    return f"aud_{nanoseconds:019d}"


async def prune(
    engine: AsyncEngine,
    older_than: dt.datetime,
    batch: int = BATCH,
    stop: asyncio.Event | None = None,
) -> int:
    """Delete the events written before ``older_than``; return how many went. Between two
    batches, ``stop`` (when set) ends it early."""
    cut = first_id_after(older_than)
    total = 0
    while stop is None or not stop.is_set():
        oldest = select(AuditEvent.id).where(AuditEvent.id < cut).order_by(AuditEvent.id)
        async with engine.begin() as conn:
            result = await conn.execute(
                delete(AuditEvent).where(AuditEvent.id.in_(oldest.limit(batch).scalar_subquery()))
            )
        deleted = int(result.rowcount)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)  # the requests in between come first
    return total


class Pruner:
    """Runs :func:`prune` at start and every :data:`EVERY` seconds; ``days`` 0 keeps all.

    Stopping waits for the batch under way rather than cancelling it: a database operation
    cancelled half-way can leave its connection to the garbage collector.
    """

    def __init__(self, engine: AsyncEngine, days: float, every: float = EVERY) -> None:
        self.engine = engine
        self.days = days
        self.every = every
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        if self.days > 0 and self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None

    async def sweep(self) -> int:
        older_than = dt.datetime.now(dt.UTC) - dt.timedelta(days=self.days)
        try:
            deleted = await prune(self.engine, older_than, stop=self._stopping)
        except Exception as exc:  # a failed sweep is retried at the next; the relay serves on
            log.warning("audit.prune_failed", error=str(exc))
            return 0
        if deleted:
            log.info("audit.pruned", deleted=deleted, older_than=older_than.isoformat())
        return deleted

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.sweep()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every * random.uniform(0.9, 1.1)):
                    await self._stopping.wait()
