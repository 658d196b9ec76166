"""Bring a database to the current schema, programmatically.

:func:`prepare` is what the relay runs at every start, and ``backhaul-relay migrate`` too:

- a database already at :data:`HEAD` is left alone, after one small query;
- an empty database gets the tables of :mod:`relay.store.models` and the revision stamp in
  one transaction (Alembic's "building an up to date database from scratch" recipe), with
  no migration replayed;
- any other database is brought to :data:`HEAD` by Alembic.

Alembic is imported only in the last case. Its modules are about 10 MiB of a relay's memory
for as long as the process lives (bench/PROFILE.md, "The relay's base memory"), and most
starts are restarts of a relay whose database is current. ``tests/relay/test_relay_store.py``
holds both ways of building a schema to the same result: every table, column, index,
constraint and foreign key, on SQLite and on PostgreSQL.

Alembic is configured in code with the migrations shipped inside the package, so a relay
installed from a wheel needs no alembic.ini on disk. The migration runs on a connection the
caller already holds (Alembic's "connection sharing" recipe), which works inside a running
event loop and with any async driver.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.store.models import Base

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: The newest revision under ``relay/migrations/versions``: a new migration moves it (a test
#: holds it to Alembic's own idea of the head).
HEAD = "0003"

#: Alembic's version table, as Alembic itself creates it.
_VERSION = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


class Prepared(Enum):
    """What :func:`prepare` found, and so did."""

    CURRENT = "current"
    CREATED = "created"
    UPGRADED = "upgraded"


def alembic_config(database_url: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if database_url is not None:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Run ``alembic upgrade`` to ``revision`` on ``engine`` (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


def _current_or_create(connection: Connection) -> Prepared | None:
    """At :data:`HEAD`, or empty and now created at it; ``None``: Alembic's work."""
    tables = set(inspect(connection).get_table_names())
    if _VERSION.name in tables:
        versions = connection.execute(select(_VERSION.c.version_num)).scalars().all()
        return Prepared.CURRENT if list(versions) == [HEAD] else None
    if tables & set(Base.metadata.tables):
        return None  # tables without a version: let Alembic say what is wrong
    Base.metadata.create_all(connection)
    _VERSION.create(connection)
    connection.execute(_VERSION.insert().values(version_num=HEAD))
    return Prepared.CREATED


async def prepare(engine: AsyncEngine) -> Prepared:
    """Bring the database behind ``engine`` to :data:`HEAD` (see the module docstring)."""
    async with engine.begin() as conn:
        done = await conn.run_sync(_current_or_create)
    if done is not None:
        return done
    await upgrade(engine)
    return Prepared.UPGRADED
