"""The idempotency records table.

Revision ID: idempotent_0001
Revises:
Create Date: 2026-11-25

Written out in full rather than built from the current model, so that this revision
keeps creating exactly what it created when it was released. Constraint and index names
follow the naming convention of ``idempotent.stores._sql_schema``, given
in full (``op.f``) so that an application's own naming convention cannot rename them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "idempotent_0001"
down_revision = None
branch_labels = ("idempotent",)
depends_on = None

TABLE = "idempotency_records"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("namespace", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("token", sa.String(32), nullable=True),
        sa.Column("lease_until", sa.Double(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("completed_at", sa.Double(), nullable=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "key", name=op.f("pk_idempotency_records")),
        sa.CheckConstraint(
            "state IN ('in_progress', 'completed', 'failed')",
            name=op.f("ck_idempotency_records_state"),
        ),
        sqlite_with_rowid=False,
    )
    op.create_index(op.f("ix_idempotency_records_expires_at"), TABLE, ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotency_records_expires_at"), table_name=TABLE)
    op.drop_table(TABLE)
