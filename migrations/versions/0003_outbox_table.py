"""The transactional outbox (`idempotent.outbox`).

Revision ID: idempotent_0003
Revises: idempotent_0002
Create Date: 2026-12-03

Written out in full rather than built from the current model, like idempotent_0001. One
row per staged message: written in the producer's transaction, published after COMMIT by
the producer or a relay, confirmed by the consumer's record.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "idempotent_0003"
down_revision = "idempotent_0002"
branch_labels = None
depends_on = None

TABLE = "idempotency_outbox"


def upgrade() -> None:
    # A database made by this version's SqlStore.create_schema() and then adopted (stamped
    # at 0001 and upgraded) already has the table: keep it.
    if not context.is_offline_mode() and sa.inspect(op.get_bind()).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("publisher", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("publishes", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("confirm_namespace", sa.String(200), nullable=True),
        sa.Column("confirm_key", sa.String(200), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("next_at", sa.Double(), nullable=True),
        sa.Column("published_at", sa.Double(), nullable=True),
        sa.Column("confirmed_at", sa.Double(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_outbox")),
        sa.CheckConstraint(
            "state IN ('pending', 'published', 'sent', 'confirmed', 'unconfirmed')",
            name=op.f("ck_idempotency_outbox_state"),
        ),
    )
    op.create_index(op.f("ix_idempotency_outbox_next_at"), TABLE, ["next_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotency_outbox_next_at"), table_name=TABLE)
    op.drop_table(TABLE)
