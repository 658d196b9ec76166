"""Schema and migrations."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect, text

from relay.store.db import make_engine
from relay.store.migrate import upgrade
from relay.store.models import Base

TABLES = {
    "users",
    "api_tokens",
    "gateways",
    "enrollment_tokens",
    "members",
    "connectors",
    "connections",
    "connection_shares",
    "connector_shares",
    "oauth_tokens",
    "oauth_states",
    "audit_events",
}


async def test_migration_creates_every_table_and_matches_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await upgrade(engine)
        await upgrade(engine)  # idempotent
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            assert TABLES <= tables
            assert "alembic_version" in tables
            for table in Base.metadata.sorted_tables:
                cols = await conn.run_sync(
                    lambda c, t=table.name: {col["name"] for col in inspect(c).get_columns(t)}
                )
                assert cols == set(table.columns.keys()), table.name
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            assert version == "0003"
    finally:
        await engine.dispose()


async def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    finally:
        await engine.dispose()
