"""Schema and migrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.db import make_engine
from relay.store.migrate import HEAD, Prepared, alembic_config, prepare, upgrade
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


def test_head_is_alembics_head() -> None:
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD


def _schema(connection: Connection) -> dict[str, Any]:
    """Everything a reflection sees of the schema, names included, in a comparable form."""
    found = inspect(connection)
    schema: dict[str, Any] = {}
    for table in found.get_table_names():
        pk = found.get_pk_constraint(table)
        schema[table] = {
            "columns": sorted(
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in found.get_columns(table)
            ),
            "primary key": (pk.get("name"), pk["constrained_columns"]),
            "foreign keys": sorted(
                (
                    str(fk.get("name")),
                    fk["constrained_columns"],
                    fk["referred_table"],
                    fk["referred_columns"],
                    sorted((fk.get("options") or {}).items()),
                )
                for fk in found.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (str(i["name"]), i["column_names"], bool(i["unique"]))
                for i in found.get_indexes(table)
            ),
            "unique": sorted(
                (str(u.get("name")), u["column_names"]) for u in found.get_unique_constraints(table)
            ),
            "checks": sorted(
                (str(c.get("name")), c["sqltext"]) for c in found.get_check_constraints(table)
            ),
        }
    return schema


async def _built_both_ways(created: AsyncEngine, migrated: AsyncEngine) -> None:
    assert await prepare(created) is Prepared.CREATED
    assert await prepare(created) is Prepared.CURRENT
    await upgrade(migrated)
    assert await prepare(migrated) is Prepared.CURRENT
    async with created.connect() as a, migrated.connect() as b:
        schema = await a.run_sync(_schema)
        assert set(schema) == {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"}
        assert schema == await b.run_sync(_schema)
        for conn in (a, b):
            versions = await conn.execute(text("SELECT version_num FROM alembic_version"))
            assert versions.scalars().all() == [HEAD]


async def test_an_empty_sqlite_database_is_created_as_the_migrations_build_it(
    tmp_path: Path,
) -> None:
    created = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'created.db'}")
    migrated = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'migrated.db'}")
    try:
        await _built_both_ways(created, migrated)
    finally:
        await created.dispose()
        await migrated.dispose()


async def test_an_empty_postgresql_database_is_created_as_the_migrations_build_it(
    postgres_url: str, tmp_path: Path
) -> None:
    created = make_engine(postgres_url)
    migrated = make_engine(postgres_url)
    try:
        # Built one way, compared, dropped (tables and version), built the other way.
        assert await prepare(created) is Prepared.CREATED
        async with created.connect() as conn:
            schema = await conn.run_sync(_schema)
        async with created.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.execute(text("DROP TABLE alembic_version"))
        await upgrade(migrated)
        assert await prepare(migrated) is Prepared.CURRENT
        async with migrated.connect() as conn:
            assert await conn.run_sync(_schema) == schema
    finally:
        await created.dispose()
        await migrated.dispose()


async def test_a_database_behind_the_head_is_upgraded_by_alembic(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        await upgrade(engine, "0002")
        assert await prepare(engine) is Prepared.UPGRADED
        assert await prepare(engine) is Prepared.CURRENT
    finally:
        await engine.dispose()


async def test_tables_without_a_version_are_left_to_alembic_which_refuses(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'odd.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.tables["users"].create)
        with pytest.raises(Exception, match="already exists"):
            await prepare(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["empty", "current"])
def test_preparing_a_new_or_current_database_does_not_load_alembic(
    tmp_path: Path, database: str
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'lean.db'}"
    script = (
        "import asyncio, sys\n"
        "import relay.app\n"
        "from relay.store.db import make_engine\n"
        "from relay.store.migrate import prepare\n"
        "async def main():\n"
        f"    engine = make_engine({url!r})\n"
        "    print((await prepare(engine)).value)\n"
        "    await engine.dispose()\n"
        "asyncio.run(main())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'mako'}))\n"
    )
    if database == "current":
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    expected = "created" if database == "empty" else "current"
    assert done.stdout.decode().split() == [expected, "[]"]
