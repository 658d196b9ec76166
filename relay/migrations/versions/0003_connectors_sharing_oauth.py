"""Imported connector definitions, connector sharing, OAuth 2.0 tokens and the audit log.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.String(40)
HASH = sa.String(64)


def _ts(name: str, nullable: bool = False) -> sa.Column[dt.datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.add_column(sa.Column("definition", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("settings", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("oauth_client_secret", sa.LargeBinary(), nullable=True))
        batch.add_column(_ts("updated_at", nullable=True))
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("parameter_set", sa.String(128), nullable=True))
        batch.add_column(sa.Column("parameter_values", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("base_url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("auth_type", sa.String(16), nullable=True))
    op.create_table(
        "connector_shares",
        sa.Column(
            "connector_id",
            ID,
            sa.ForeignKey("connectors.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("user_id", ID, sa.ForeignKey("users.id"), primary_key=True, index=True),
        sa.Column("role", sa.String(24), nullable=False),
        sa.Column("granted_by", ID, sa.ForeignKey("users.id"), nullable=False),
        _ts("created_at"),
    )
    op.create_table(
        "oauth_tokens",
        sa.Column(
            "connection_id",
            ID,
            sa.ForeignKey("connections.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        _ts("expires_at", nullable=True),
        sa.Column("has_refresh_token", sa.Boolean(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=True),
        _ts("updated_at"),
    )
    op.create_table(
        "oauth_states",
        sa.Column("state_hash", HASH, primary_key=True),
        sa.Column(
            "connection_id",
            ID,
            sa.ForeignKey("connections.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("user_id", ID, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", ID, primary_key=True),
        _ts("at"),
        sa.Column("actor_id", ID, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("object_type", sa.String(16), nullable=False),
        sa.Column("object_id", ID, nullable=False),
        sa.Column("subject_id", ID, nullable=True),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("bytes_in", sa.BigInteger(), nullable=True),
        sa.Column("bytes_out", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_actor_id", "audit_events", ["actor_id"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    op.create_index("ix_audit_events_object_id", "audit_events", ["object_id"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("oauth_states")
    op.drop_table("oauth_tokens")
    op.drop_table("connector_shares")
    with op.batch_alter_table("connections") as batch:
        for column in ("auth_type", "base_url", "parameter_values", "parameter_set"):
            batch.drop_column(column)
    with op.batch_alter_table("connectors") as batch:
        for column in ("updated_at", "oauth_client_secret", "settings", "definition"):
            batch.drop_column(column)
