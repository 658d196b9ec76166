"""Persistent state of the relay: users, tokens, gateways, members, connectors, connections.

``models`` declares the tables, ``db`` makes engines and sessions, ``migrate`` brings a
database to the current schema with Alembic, ``queries`` holds every read and write the rest
of the relay performs. Types stay portable (SQLite now, PostgreSQL later).
"""

from __future__ import annotations

from relay import RelayError


class StoreError(RelayError):
    """A store lookup the caller cannot complete."""


class NotFound(StoreError):
    """The row does not exist, or the caller may not even know it exists."""


class Forbidden(StoreError):
    """The row exists but the caller may not use it."""


class Conflict(StoreError):
    """The write would break a uniqueness or dependency rule."""
