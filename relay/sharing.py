"""Who may do what with a connector or a connection: the sharing rules makers know.

Connector access, from least to most:

================== =========================================================================
``can_use``        see the connector and create one's own connections (own credentials)
``can_use_and_share``  … and share the connector with others as ``can_use`` or
                   ``can_use_and_share``
``can_edit``       … and re-import its definition and share it with any role
owner, admin       … and delete it (its connections go with it)
================== =========================================================================

A connection is shared for use only: the recipients call the API with the owner's
credentials. Only its owner (or an admin) shares it, and not at all when the connector's
parameter set says ``allowSharing: false``. When a user loses access to a connector, the
connections they made on it stop working (refused at invoke) until access is given back.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from relay.identity import Principal
from relay.importer import settings as connector_settings
from relay.store import Conflict, Forbidden, NotFound, queries
from relay.store.models import (
    Connection,
    ConnectionShare,
    Connector,
    ConnectorShare,
    OAuthState,
    OAuthToken,
    utcnow,
)

CAN_USE = "can_use"
CAN_USE_AND_SHARE = "can_use_and_share"
CAN_EDIT = "can_edit"
OWNER = "owner"
ADMIN = "admin"
ROLES = (CAN_USE, CAN_USE_AND_SHARE, CAN_EDIT)
_RANK = {CAN_USE: 1, CAN_USE_AND_SHARE: 2, CAN_EDIT: 3, OWNER: 4, ADMIN: 4}


@dataclass(frozen=True)
class ConnectorAccess:
    connector: Connector
    role: str

    @property
    def can_share(self) -> bool:
        return _RANK[self.role] >= _RANK[CAN_USE_AND_SHARE]

    @property
    def can_edit(self) -> bool:
        return _RANK[self.role] >= _RANK[CAN_EDIT]

    @property
    def can_delete(self) -> bool:
        return self.role in (OWNER, ADMIN)

    def may_grant(self, role: str) -> bool:
        """``can_use_and_share`` passes on at most what it has; editors grant anything."""
        return self.can_edit or (self.can_share and _RANK[role] <= _RANK[CAN_USE_AND_SHARE])


async def role_of(
    session: AsyncSession, connector: Connector, user_id: str, is_admin: bool
) -> str | None:
    if connector.owner_id == user_id:
        return OWNER
    if is_admin:
        return ADMIN
    share = await session.get(ConnectorShare, (connector.id, user_id))
    return None if share is None else share.role


async def access(session: AsyncSession, connector_id: str, caller: Principal) -> ConnectorAccess:
    """The caller's access to a connector; NotFound when it has none (not even its name)."""
    connector = await session.get(Connector, connector_id)
    role = (
        None if connector is None else await role_of(session, connector, caller.id, caller.is_admin)
    )
    if connector is None or role is None:
        raise NotFound(f"no connector {connector_id}")
    return ConnectorAccess(connector, role)


async def visible(session: AsyncSession, caller: Principal) -> list[ConnectorAccess]:
    """Connectors the caller owns, was given, or (admins) every connector."""
    query = select(Connector).order_by(Connector.created_at, Connector.id)
    if not caller.is_admin:
        shared = select(ConnectorShare.connector_id).where(ConnectorShare.user_id == caller.id)
        query = query.where(or_(Connector.owner_id == caller.id, Connector.id.in_(shared)))
    out = []
    for connector in await session.scalars(query):
        role = await role_of(session, connector, caller.id, caller.is_admin)
        if role is not None:
            out.append(ConnectorAccess(connector, role))
    return out


async def owner_may_use(session: AsyncSession, connector: Connector, owner_id: str) -> bool:
    """Whether a connection's owner still has access to its connector."""
    if connector.owner_id == owner_id:
        return True
    if await session.get(ConnectorShare, (connector.id, owner_id)) is not None:
        return True
    user = await queries.active_user(session, owner_id)
    return user is not None and user.role == ADMIN


# -- connector shares ------------------------------------------------------------------------


async def share_connector(
    session: AsyncSession, found: ConnectorAccess, caller: Principal, user_id: str, role: str
) -> tuple[ConnectorShare, bool]:
    """Grant or change a share; returns the row and whether it is new."""
    if role not in ROLES:
        raise Conflict(f"role must be one of {', '.join(ROLES)}")
    if not found.can_share:
        raise Forbidden(
            f"your access to {found.connector.id} ({found.role}) does not allow sharing"
        )
    if not found.may_grant(role):
        raise Forbidden(f"with {found.role} you may share as can_use or can_use_and_share only")
    if user_id == found.connector.owner_id:
        raise Conflict("the owner already has every right on the connector")
    if user_id == caller.id:
        raise Conflict("you cannot change your own access")
    existing = await session.get(ConnectorShare, (found.connector.id, user_id))
    if existing is not None:
        if not found.may_grant(existing.role):
            raise Forbidden(f"{user_id} has {existing.role}; only an editor may change that")
        existing.role = role
        existing.granted_by = caller.id
        await session.flush()
        return existing, False
    row = ConnectorShare(
        connector_id=found.connector.id,
        user_id=user_id,
        role=role,
        granted_by=caller.id,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return row, True


async def connector_shares(session: AsyncSession, connector_id: str) -> list[ConnectorShare]:
    query = (
        select(ConnectorShare)
        .where(ConnectorShare.connector_id == connector_id)
        .order_by(ConnectorShare.created_at, ConnectorShare.user_id)
    )
    return list(await session.scalars(query))


async def unshare_connector(
    session: AsyncSession, found: ConnectorAccess, caller: Principal, user_id: str
) -> None:
    """Editors remove any share, sharers those they could grant, anyone their own."""
    share = await session.get(ConnectorShare, (found.connector.id, user_id))
    if share is None:
        raise NotFound(f"connector {found.connector.id} is not shared with {user_id}")
    if user_id != caller.id and not found.may_grant(share.role):
        raise Forbidden(f"your access ({found.role}) does not allow removing this share")
    await session.delete(share)
    await session.flush()


async def delete_connector(session: AsyncSession, found: ConnectorAccess) -> int:
    """Delete a connector with its connections, their shares and tokens; returns how many."""
    if not found.can_delete:
        raise Forbidden(f"only the owner of {found.connector.id} or an admin may delete it")
    ids = select(Connection.id).where(Connection.connector_id == found.connector.id)
    count = len(list(await session.scalars(ids)))
    for table in (ConnectionShare, OAuthToken, OAuthState):
        await session.execute(delete(table).where(table.connection_id.in_(ids)))
    await session.execute(delete(Connection).where(Connection.connector_id == found.connector.id))
    await session.execute(
        delete(ConnectorShare).where(ConnectorShare.connector_id == found.connector.id)
    )
    await session.delete(found.connector)
    await session.flush()
    return count


# -- connection shares -----------------------------------------------------------------------


async def connection_sharing_refusal(session: AsyncSession, connection: Connection) -> str | None:
    """Why a connection may not be shared (``allowSharing: false``), or None."""
    connector = await session.get(Connector, connection.connector_id)
    if connector is None:
        return None
    found = connector_settings.load(connector.settings)
    if found is None:
        return None
    pset = found.parameter_set(connection.parameter_set)
    if pset is not None and not pset.allow_sharing:
        return (
            f"connector {connector.id} does not allow sharing connections made with its "
            f"{pset.name!r} parameter set (allowSharing: false); share the connector instead"
        )
    return None
