"""Table declarations. Alembic migrations in relay/migrations must stay in step with them.

Timestamps are always timezone-aware UTC: SQLite stores no offset, so ``UTCDateTime``
normalizes on the way in and re-attaches UTC on the way out, which keeps comparisons in
Python correct on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id(prefix: str) -> str:
    """A prefixed random id: the prefix tells a reader what kind of object a log line means."""
    return f"{prefix}_{secrets.token_hex(10)}"


class UTCDateTime(TypeDecorator[dt.datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


ID = String(40)
HASH = String(64)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(HASH, unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Gateway(Base):
    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"), index=True)
    hpke_public_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: The gateway private key wrapped under the admin's recovery key (JSON; opaque here).
    wrapped_private_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    load_balancing: Mapped[str] = mapped_column(
        String(32), default="least-inflight", server_default="least-inflight"
    )
    cpu_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    gateway_id: Mapped[str] = mapped_column(
        ID, ForeignKey("gateways.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(HASH, unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Member(Base):
    __tablename__ = "members"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    gateway_id: Mapped[str] = mapped_column(
        ID, ForeignKey("gateways.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    hostname: Mapped[str] = mapped_column(String(255))
    signing_public_key: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: Lower is preferred by the primary-failover policy (enrollment order by default).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Connector(Base):
    __tablename__ = "connectors"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"), index=True)
    base_url: Mapped[str] = mapped_column(Text)
    auth_type: Mapped[str] = mapped_column(String(16))
    api_key_name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    api_key_in: Mapped[str | None] = mapped_column(String(8), nullable=True)
    gateway_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("gateways.id"), nullable=True, index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: auth_type "windows": negotiate | ntlm | kerberos, and the SPN override (migration 0002).
    windows_scheme: Mapped[str | None] = mapped_column(String(16), nullable=True)
    spn: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: Imported connectors: the API document as given (OpenAPI 2.0 or 3.x) and what the
    #: importer read from it and apiProperties.json (relay.importer.ConnectorSettings).
    definition: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: OAuth client secret, encrypted with the relay's key (relay.secretbox).
    oauth_client_secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Connection(Base):
    __tablename__ = "connections"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    connector_id: Mapped[str] = mapped_column(ID, ForeignKey("connectors.id"), index=True)
    owner_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    seal_suite: Mapped[str] = mapped_column(String(64))
    sealed_credentials: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: The gateway key generation these credentials are sealed to (rotation re-seals).
    key_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: Imported connectors: the chosen connectionParameterSets entry, the non-secret
    #: parameter values, the base URL after dynamichosturl and the set's auth scheme.
    parameter_set: Mapped[str | None] = mapped_column(String(128), nullable=True)
    parameter_values: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    base_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    auth_type: Mapped[str | None] = mapped_column(String(16), nullable=True)


class ConnectionShare(Base):
    __tablename__ = "connection_shares"

    connection_id: Mapped[str] = mapped_column(
        ID, ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"), primary_key=True, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ConnectorShare(Base):
    """A connector shared with a user: ``can_use``, ``can_use_and_share`` or ``can_edit``."""

    __tablename__ = "connector_shares"

    connector_id: Mapped[str] = mapped_column(
        ID, ForeignKey("connectors.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(24))
    granted_by: Mapped[str] = mapped_column(ID, ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class OAuthToken(Base):
    """An online connection's OAuth tokens, encrypted with the relay's key."""

    __tablename__ = "oauth_tokens"

    connection_id: Mapped[str] = mapped_column(
        ID, ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    has_refresh_token: Mapped[bool] = mapped_column(Boolean, default=False)
    scope: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class OAuthState(Base):
    """One pending consent: the state (hashed) bound to a user and a connection."""

    __tablename__ = "oauth_states"

    state_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    connection_id: Mapped[str] = mapped_column(
        ID, ForeignKey("connections.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"))
    #: The PKCE code verifier and the redirect URI, encrypted with the relay's key.
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Who did what to which object, when, with what result (and how many bytes moved).

    No foreign keys: the record outlives the connection, connector or user it names.
    """

    __tablename__ = "audit_events"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    actor_id: Mapped[str] = mapped_column(ID, index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    object_type: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str] = mapped_column(ID, index=True)
    subject_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    result: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_in: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes_out: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
