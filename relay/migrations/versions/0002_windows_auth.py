"""Windows authentication on connectors: the scheme and an optional SPN override.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.add_column(sa.Column("windows_scheme", sa.String(16), nullable=True))
        batch.add_column(sa.Column("spn", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.drop_column("spn")
        batch.drop_column("windows_scheme")
