"""The consumed positions of partitioned logs (Kafka consumers).

Revision ID: idempotent_0002
Revises: idempotent_0001
Create Date: 2026-12-03

Written out in full rather than built from the current model, like idempotent_0001. One
row per (consumer group, topic, partition): the next offset to consume and the generation
of the partition's owner (`idempotent.integrations.kafka`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "idempotent_0002"
down_revision = "idempotent_0001"
branch_labels = None
depends_on = None

TABLE = "idempotency_positions"


def upgrade() -> None:
    # A database made by this version's SqlStore.create_schema() and stamped at 0001
    # (`idempotent db stamp idempotent_0001`) already has the table: keep it.
    if not context.is_offline_mode() and sa.inspect(op.get_bind()).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("consumer_group", sa.String(200), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "topic", "partition",
                                name=op.f("pk_idempotency_positions")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table(TABLE)
