"""Initial schema: identity, gateways and members, connectors, sealed connections.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(40)
HASH = sa.String(64)


def _ts(name: str, nullable: bool = False) -> sa.Column[dt.datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("deleted_at", nullable=True),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", ID, primary_key=True),
        sa.Column("user_id", ID, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("token_hash", HASH, nullable=False, unique=True),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
    )
    op.create_table(
        "gateways",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner_id", ID, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("hpke_public_key", sa.Text(), nullable=True),
        _ts("created_at"),
        # Clusters: the private key wrapped under the admin's recovery key (the relay can't
        # unwrap it), the key generation connections are sealed to, and load balancing.
        sa.Column("wrapped_private_key", sa.Text(), nullable=True),
        sa.Column("key_version", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("load_balancing", sa.String(32), nullable=False, server_default="least-inflight"),
        sa.Column("cpu_threshold", sa.Float(), nullable=True),
        sa.Column("memory_threshold", sa.Float(), nullable=True),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "gateway_id",
            ID,
            sa.ForeignKey("gateways.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("token_hash", HASH, nullable=False, unique=True),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
    )
    op.create_table(
        "members",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "gateway_id",
            ID,
            sa.ForeignKey("gateways.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("signing_public_key", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        _ts("enrolled_at"),
        _ts("revoked_at", nullable=True),
        _ts("last_seen_at", nullable=True),
        _ts("disabled_at", nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_table(
        "connectors",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner_id", ID, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("auth_type", sa.String(16), nullable=False),
        sa.Column("api_key_name", sa.String(256), nullable=True),
        sa.Column("api_key_in", sa.String(8), nullable=True),
        sa.Column("gateway_id", ID, sa.ForeignKey("gateways.id"), nullable=True, index=True),
        _ts("created_at"),
    )
    op.create_table(
        "connections",
        sa.Column("id", ID, primary_key=True),
        sa.Column("connector_id", ID, sa.ForeignKey("connectors.id"), nullable=False, index=True),
        sa.Column("owner_id", ID, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("seal_suite", sa.String(64), nullable=False),
        sa.Column("sealed_credentials", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        sa.Column("key_version", sa.Integer(), nullable=False, server_default="1"),
    )
    op.create_table(
        "connection_shares",
        sa.Column(
            "connection_id",
            ID,
            sa.ForeignKey("connections.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("user_id", ID, sa.ForeignKey("users.id"), primary_key=True, index=True),
        _ts("created_at"),
    )


def downgrade() -> None:
    for table in (
        "connection_shares",
        "connections",
        "connectors",
        "members",
        "enrollment_tokens",
        "gateways",
        "api_tokens",
        "users",
    ):
        op.drop_table(table)
