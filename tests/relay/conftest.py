"""Fixtures for the relay tests; the helpers live in relay_helpers (importable by name)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.relay.relay_helpers import Relay, make_config, start


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(make_config(tmp_path / "data")):
        yield r


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh database on the machine's real PostgreSQL, dropped afterwards."""
    name = "backhaul_test_" + secrets.token_hex(4)
    admin = await asyncpg.connect("postgresql://127.0.0.1:5432/test")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+asyncpg://127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
