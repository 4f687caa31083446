"""The records table and the positions table, on their own `MetaData` so they never mix
with the user's models."""

from __future__ import annotations

import sqlalchemy as sa

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEFAULT_TABLE = "idempotency_records"
#: The consumed positions of partitioned logs (Kafka), `positions_table`.
DEFAULT_POSITIONS_TABLE = "idempotency_positions"
#: Messages staged for publishing after COMMIT (`idempotent.outbox`), `outbox_table`.
DEFAULT_OUTBOX_TABLE = "idempotency_outbox"
#: The columns of a record, in the order of `Record`'s fields.
COLUMNS = (
    "namespace", "key", "state", "fingerprint", "result", "token",
    "lease_until", "created_at", "completed_at", "expires_at",
)

#: Room for a key or namespace of up to 128 characters, or ``sha256:<64 hex>``.
KEY_COLUMN_LENGTH = 200


def records_table(metadata: sa.MetaData, name: str = DEFAULT_TABLE) -> sa.Table:
    """One row per (namespace, key). Times are epoch seconds (double precision)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("namespace", sa.String(KEY_COLUMN_LENGTH), nullable=False),
        sa.Column("key", sa.String(KEY_COLUMN_LENGTH), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("token", sa.String(32), nullable=True),
        sa.Column("lease_until", sa.Double, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("completed_at", sa.Double, nullable=True),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("namespace", "key"),
        sa.CheckConstraint("state IN ('in_progress', 'completed', 'failed')", name="state"),
        sa.Index(None, "expires_at"),
        # the primary key is the only index a claim needs; SQLite stores the row in it
        sqlite_with_rowid=False,
    )


def positions_table(metadata: sa.MetaData, name: str = DEFAULT_POSITIONS_TABLE) -> sa.Table:
    """One row per (consumer group, topic, partition): the next offset to consume, written
    in the same transaction as the effects of the messages before it, and the
    ``generation`` of the partition's current owner (bumped on every assignment, so a
    consumer whose partition moved on cannot advance it). No CHECK on ``next_offset``: a
    bad stored offset is reported by the consumer as a typed error, never silently used."""
    return sa.Table(
        name,
        metadata,
        sa.Column("consumer_group", sa.String(KEY_COLUMN_LENGTH), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "topic", "partition"),
        sqlite_with_rowid=False,
    )


def outbox_table(metadata: sa.MetaData, name: str = DEFAULT_OUTBOX_TABLE) -> sa.Table:
    """One row per staged message (`idempotent.outbox`): written in the producer's own
    transaction, published after it commits. ``id`` is the message's deterministic id (a
    Celery task id, a message id), so a re-publish is a duplicate the consumer drops;
    ``confirm_namespace``/``confirm_key`` name the consumer's record that confirms
    delivery; ``next_at`` is when a relay next looks at the entry (NULL: done)."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(KEY_COLUMN_LENGTH), nullable=False),
        sa.Column("publisher", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("publishes", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("confirm_namespace", sa.String(KEY_COLUMN_LENGTH), nullable=True),
        sa.Column("confirm_key", sa.String(KEY_COLUMN_LENGTH), nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("next_at", sa.Double, nullable=True),
        sa.Column("published_at", sa.Double, nullable=True),
        sa.Column("confirmed_at", sa.Double, nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(
            "state IN ('pending', 'published', 'sent', 'confirmed', 'unconfirmed')",
            name="state"),
        sa.Index(None, "next_at"),
    )


def new_metadata(schema: str | None = None) -> sa.MetaData:
    return sa.MetaData(naming_convention=NAMING_CONVENTION, schema=schema)
