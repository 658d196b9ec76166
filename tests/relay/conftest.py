"""Fixtures for the relay tests; the helpers live in relay_helpers (importable by name)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.relay.relay_helpers import Relay, make_config, start


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(make_config(tmp_path / "data")):
        yield r
