"""Every read and write the relay performs, as small async functions over a session.

Visibility rules live here, in one place: gateways and connectors are visible to their owner
and to admins; a connection is visible to its owner, to users it is shared with, and (for
metadata only) to admins. Using a connection's credentials (invoke) needs ownership or a
share even for admins, because credentials are personal.

Functions flush but do not commit: the caller owns the transaction.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from relay.store import Conflict, Forbidden, NotFound
from relay.store.models import (
    ApiToken,
    Connection,
    ConnectionShare,
    Connector,
    EnrollmentToken,
    Gateway,
    Member,
    User,
    new_id,
    utcnow,
)

# -- users and API tokens ------------------------------------------------------------------


async def create_user(session: AsyncSession, name: str, role: str) -> User:
    user = User(id=new_id("usr"), name=name, role=role, created_at=utcnow())
    session.add(user)
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:
        raise Conflict(f"a user named {name!r} already exists") from exc
    return user


async def active_user(session: AsyncSession, user_id: str) -> User | None:
    return await session.scalar(select(User).where(User.id == user_id, User.deleted_at.is_(None)))


async def add_api_token(session: AsyncSession, user_id: str, token_hash: str) -> ApiToken:
    token = ApiToken(id=new_id("tok"), user_id=user_id, token_hash=token_hash, created_at=utcnow())
    session.add(token)
    await session.flush()
    return token


async def user_for_token_hash(
    session: AsyncSession, token_hash: str
) -> tuple[User, ApiToken] | None:
    """The live user behind a token hash; None when unknown, revoked or the user is deleted."""
    row = (
        await session.execute(
            select(User, ApiToken)
            .join(ApiToken, ApiToken.user_id == User.id)
            .where(
                ApiToken.token_hash == token_hash,
                ApiToken.revoked_at.is_(None),
                User.deleted_at.is_(None),
            )
        )
    ).first()
    return None if row is None else (row[0], row[1])


async def touch_api_token(conn: AsyncConnection, token_id: str, when: dt.datetime) -> None:
    """A Core statement on a connection, not a session: not a change the caches see."""
    await conn.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=when))


async def delete_user(session: AsyncSession, user_id: str) -> None:
    """Soft delete: the row stays for audit and ownership; every token dies with it."""
    now = utcnow()
    result = await session.execute(
        update(User).where(User.id == user_id, User.deleted_at.is_(None)).values(deleted_at=now)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound(f"no user {user_id}")
    await session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


# -- gateways, enrollment, members ---------------------------------------------------------


async def create_gateway(session: AsyncSession, name: str, owner_id: str) -> Gateway:
    gateway = Gateway(id=new_id("gw"), name=name, owner_id=owner_id, created_at=utcnow())
    session.add(gateway)
    await session.flush()
    return gateway


async def add_enrollment_token(
    session: AsyncSession, gateway_id: str, token_hash: str, ttl: dt.timedelta
) -> EnrollmentToken:
    now = utcnow()
    token = EnrollmentToken(
        id=new_id("enr"),
        gateway_id=gateway_id,
        token_hash=token_hash,
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(token)
    await session.flush()
    return token


async def visible_gateways(session: AsyncSession, user_id: str, is_admin: bool) -> list[Gateway]:
    query = select(Gateway).order_by(Gateway.created_at, Gateway.id)
    if not is_admin:
        query = query.where(Gateway.owner_id == user_id)
    return list(await session.scalars(query))


async def visible_gateway(
    session: AsyncSession, gateway_id: str, user_id: str, is_admin: bool
) -> Gateway:
    gateway = await session.get(Gateway, gateway_id)
    if gateway is None or not (is_admin or gateway.owner_id == user_id):
        raise NotFound(f"no gateway {gateway_id}")
    return gateway


async def gateway_members(session: AsyncSession, gateway_id: str) -> list[Member]:
    query = (
        select(Member)
        .where(Member.gateway_id == gateway_id)
        .order_by(Member.enrolled_at, Member.id)
    )
    return list(await session.scalars(query))


async def revoke_member(session: AsyncSession, gateway_id: str, member_id: str) -> Member:
    member = await session.get(Member, member_id)
    if member is None or member.gateway_id != gateway_id:
        raise NotFound(f"no member {member_id} in gateway {gateway_id}")
    if member.revoked_at is None:
        member.revoked_at = utcnow()
        await session.flush()
    return member


async def enrollment_by_hash(session: AsyncSession, token_hash: str) -> EnrollmentToken | None:
    return await session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash)
    )


async def consume_enrollment(session: AsyncSession, token_id: str) -> bool:
    """Mark a token used; False when another request got there first.

    A conditional UPDATE is the one race-free way on every database: two concurrent
    enrollments with the same token both run it, only one sees a row change.
    """
    result = await session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == token_id, EnrollmentToken.used_at.is_(None))
        .values(used_at=utcnow())
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def claim_gateway_key(session: AsyncSession, gateway_id: str, public_key: str) -> str:
    """Set the gateway's HPKE key if it has none; return the key it has afterwards."""
    await session.execute(
        update(Gateway)
        .where(Gateway.id == gateway_id, Gateway.hpke_public_key.is_(None))
        .values(hpke_public_key=public_key)
    )
    current = await session.scalar(select(Gateway.hpke_public_key).where(Gateway.id == gateway_id))
    if current is None:
        raise NotFound(f"no gateway {gateway_id}")
    return current


async def add_member(
    session: AsyncSession,
    gateway_id: str,
    name: str,
    hostname: str,
    signing_public_key: str,
    version: str,
) -> Member:
    member = Member(
        id=new_id("mem"),
        gateway_id=gateway_id,
        name=name,
        hostname=hostname,
        signing_public_key=signing_public_key,
        version=version,
        enrolled_at=utcnow(),
    )
    session.add(member)
    await session.flush()
    return member


@dataclass(frozen=True)
class MemberRecord:
    """What the tunnel handshake needs to admit or refuse a member."""

    id: str
    gateway_id: str
    name: str
    signing_public_key: str
    revoked: bool
    disabled: bool = False
    priority: int = 0


async def member_for_handshake(session: AsyncSession, member_id: str) -> MemberRecord | None:
    member = await session.get(Member, member_id)
    if member is None:
        return None
    return MemberRecord(
        id=member.id,
        gateway_id=member.gateway_id,
        name=member.name,
        signing_public_key=member.signing_public_key,
        revoked=member.revoked_at is not None,
        disabled=member.disabled_at is not None,
        priority=member.priority,
    )


async def touch_member(session: AsyncSession, member_id: str, version: str, hostname: str) -> None:
    """Record a successful handshake (and commit it: the tunnel holds no other transaction)."""
    await session.execute(
        update(Member)
        .where(Member.id == member_id)
        .values(last_seen_at=utcnow(), version=version[:64], hostname=hostname[:255])
    )
    await session.commit()


# -- connectors ----------------------------------------------------------------------------


async def create_connector(session: AsyncSession, connector: Connector) -> Connector:
    connector.id = new_id("ctr")
    connector.created_at = utcnow()
    session.add(connector)
    await session.flush()
    return connector


# -- connections and shares ----------------------------------------------------------------


def _shared_with(user_id: str) -> object:
    return exists().where(
        ConnectionShare.connection_id == Connection.id, ConnectionShare.user_id == user_id
    )


async def add_connection(session: AsyncSession, connection: Connection) -> Connection:
    connection.created_at = utcnow()
    session.add(connection)
    await session.flush()
    return connection


async def usable_connections(session: AsyncSession, user_id: str) -> list[Connection]:
    """Connections the user owns or that are shared with them."""
    query = (
        select(Connection)
        .where(or_(Connection.owner_id == user_id, _shared_with(user_id)))  # type: ignore[arg-type]
        .order_by(Connection.created_at, Connection.id)
    )
    return list(await session.scalars(query))


async def _can_use(session: AsyncSession, connection: Connection, user_id: str) -> bool:
    if connection.owner_id == user_id:
        return True
    share = await session.get(ConnectionShare, (connection.id, user_id))
    return share is not None


async def visible_connection(
    session: AsyncSession, connection_id: str, user_id: str, is_admin: bool
) -> Connection:
    connection = await session.get(Connection, connection_id)
    if connection is None or not (is_admin or await _can_use(session, connection, user_id)):
        raise NotFound(f"no connection {connection_id}")
    return connection


async def managed_connection(
    session: AsyncSession, connection_id: str, user_id: str, is_admin: bool
) -> Connection:
    """A connection the caller may change: owner or admin. Share holders get Forbidden."""
    connection = await visible_connection(session, connection_id, user_id, is_admin)
    if not (is_admin or connection.owner_id == user_id):
        raise Forbidden(f"only the owner of {connection_id} may change it")
    return connection


async def delete_connection(session: AsyncSession, connection: Connection) -> None:
    await session.execute(
        delete(ConnectionShare).where(ConnectionShare.connection_id == connection.id)
    )
    await session.delete(connection)
    await session.flush()


async def add_share(session: AsyncSession, connection_id: str, user_id: str) -> ConnectionShare:
    if await session.get(ConnectionShare, (connection_id, user_id)) is not None:
        raise Conflict(f"connection {connection_id} is already shared with {user_id}")
    share = ConnectionShare(connection_id=connection_id, user_id=user_id, created_at=utcnow())
    session.add(share)
    await session.flush()
    return share


async def shares_of(session: AsyncSession, connection_id: str) -> list[ConnectionShare]:
    query = (
        select(ConnectionShare)
        .where(ConnectionShare.connection_id == connection_id)
        .order_by(ConnectionShare.created_at, ConnectionShare.user_id)
    )
    return list(await session.scalars(query))


async def remove_share(session: AsyncSession, connection_id: str, user_id: str) -> None:
    share = await session.get(ConnectionShare, (connection_id, user_id))
    if share is None:
        raise NotFound(f"connection {connection_id} is not shared with {user_id}")
    await session.delete(share)
    await session.flush()


# -- invoke --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvokeTarget:
    """Everything the invoke path needs to route one call, with no ORM object attached."""

    connection_id: str
    connector_id: str
    #: None for an online connector: the relay calls the API itself (relay.online).
    gateway_id: str | None
    base_url: str
    auth_type: str
    api_key_name: str | None
    api_key_in: str | None
    seal_suite: str
    sealed_credentials: bytes
    #: The gateway's load balancing, read with the connection so routing needs no 2nd query.
    load_balancing: str = "least-inflight"
    cpu_threshold: float | None = None
    memory_threshold: float | None = None
    #: The gateway key generation ``sealed_credentials`` is sealed to (the OPEN head says it).
    key_version: int = 1


async def invoke_target(
    session: AsyncSession, connection_id: str, user_id: str, is_admin: bool
) -> InvokeTarget:
    """Resolve a connection for a caller.

    Raises NotFound when the connection does not exist, Forbidden when it exists but is
    neither owned by nor shared with the caller. ``is_admin`` grants nothing here: an admin
    may see a connection's metadata but may not spend someone else's credentials.
    """
    del is_admin
    row = (
        await session.execute(
            select(Connection, Connector)
            .join(Connector, Connector.id == Connection.connector_id)
            .where(Connection.id == connection_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no connection {connection_id}")
    connection, connector = row[0], row[1]
    if not await _can_use(session, connection, user_id):
        raise Forbidden(f"connection {connection_id} is neither owned by nor shared with you")
    routing = (
        {}
        if connector.gateway_id is None
        else await _gateway_routing(session, connector.gateway_id)
    )
    return InvokeTarget(
        connection_id=connection.id,
        connector_id=connector.id,
        gateway_id=connector.gateway_id,
        base_url=connection.base_url or connector.base_url,
        auth_type=connection.auth_type or connector.auth_type,
        api_key_name=connector.api_key_name,
        api_key_in=connector.api_key_in,
        seal_suite=connection.seal_suite,
        sealed_credentials=bytes(connection.sealed_credentials),
        key_version=connection.key_version,
        **routing,
    )


async def _gateway_routing(session: AsyncSession, gateway_id: str) -> dict[str, Any]:
    gateway = await session.get(Gateway, gateway_id)
    if gateway is None:
        return {}
    return {
        "load_balancing": gateway.load_balancing,
        "cpu_threshold": gateway.cpu_threshold,
        "memory_threshold": gateway.memory_threshold,
    }
