"""Reads and writes for gateway clusters: the member limit, the gateway key record, and the
per-connection swap a key rotation makes.

Kept beside :mod:`relay.store.queries` (same rules: functions flush, the caller commits).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from relay.store import NotFound
from relay.store.models import Connection, Connector, Gateway, Member

__all__ = [
    "MAX_MEMBERS",
    "SealedConnection",
    "active_member_count",
    "active_member_ids",
    "claim_gateway_key",
    "connections_below",
    "lock_gateway",
    "swap_sealed",
]

#: Members per gateway (revoked ones do not count), as in Microsoft's gateway clusters.
MAX_MEMBERS = 10


async def lock_gateway(session: AsyncSession, gateway_id: str) -> Gateway:
    """The gateway row, locked until the transaction ends (PostgreSQL; SQLite serializes
    writers anyway), so two enrollments cannot both take the tenth seat."""
    gateway = await session.scalar(
        select(Gateway).where(Gateway.id == gateway_id).with_for_update()
    )
    if gateway is None:
        raise NotFound(f"no gateway {gateway_id}")
    return gateway


async def active_member_count(session: AsyncSession, gateway_id: str) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(Member)
        .where(Member.gateway_id == gateway_id, Member.revoked_at.is_(None))
    )
    return int(count or 0)


async def active_member_ids(session: AsyncSession, gateway_id: str) -> list[str]:
    query = (
        select(Member.id)
        .where(Member.gateway_id == gateway_id, Member.revoked_at.is_(None))
        .order_by(Member.priority, Member.enrolled_at, Member.id)
    )
    return list(await session.scalars(query))


async def claim_gateway_key(
    session: AsyncSession, gateway_id: str, public_key: str, key_record: str | None
) -> bool:
    """Give a keyless gateway its first key (and wrapped-key record); False if it has one."""
    result = await session.execute(
        update(Gateway)
        .where(Gateway.id == gateway_id, Gateway.hpke_public_key.is_(None))
        .values(hpke_public_key=public_key, wrapped_private_key=key_record)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SealedConnection:
    """One gateway connection's sealed credentials, as a re-seal needs them."""

    id: str
    base_url: str
    seal_suite: str
    sealed_credentials: bytes
    key_version: int


async def connections_below(
    session: AsyncSession, gateway_id: str, key_version: int, limit: int = 500
) -> list[SealedConnection]:
    """Connections of ``gateway_id`` sealed to a key older than ``key_version``."""
    rows = await session.execute(
        select(Connection, Connector)
        .join(Connector, Connector.id == Connection.connector_id)
        .where(Connector.gateway_id == gateway_id, Connection.key_version < key_version)
        .order_by(Connection.created_at, Connection.id)
        .limit(limit)
    )
    return [
        SealedConnection(
            id=connection.id,
            # Imported connectors may give each connection its own base URL.
            base_url=getattr(connection, "base_url", None) or connector.base_url,
            seal_suite=connection.seal_suite,
            sealed_credentials=bytes(connection.sealed_credentials),
            key_version=connection.key_version,
        )
        for connection, connector in rows
    ]


async def swap_sealed(
    session: AsyncSession,
    old: SealedConnection,
    suite: str,
    blob: bytes,
    key_version: int,
) -> bool:
    """Replace the blob only if nobody changed it meanwhile (credentials replaced by the
    owner, another relay instance re-sealed it); False when it changed."""
    result = await session.execute(
        update(Connection)
        .where(
            Connection.id == old.id,
            Connection.key_version == old.key_version,
            Connection.sealed_credentials == old.sealed_credentials,
        )
        .values(seal_suite=suite, sealed_credentials=blob, key_version=key_version)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
