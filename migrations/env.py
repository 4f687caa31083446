"""Alembic environment of idempotent's own migration history.

Used by ``idempotent db upgrade|downgrade|current`` (`idempotent._migrate`), which passes an
open connection in ``config.attributes["connection"]``, or else a URL as
``sqlalchemy.url``. Revisions are recorded in their own version table,
``idempotent_alembic_version``, so they never meet the application's Alembic history.

An application that adds ``idempotent.migrations:versions`` to its own
``version_locations`` does not run this file: its own env.py runs our revisions, and
they are recorded in its version table, on their own branch (label ``idempotent``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from idempotent.migrations import VERSION_TABLE, target_metadata

config = context.config


def run_offline() -> None:
    """``--sql``: print the DDL instead of running it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata(),
        version_table=VERSION_TABLE,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite cannot ALTER most things: copy-and-move
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    given = config.attributes.get("connection")
    if given is not None:
        run_online(given)
    else:
        url = config.get_main_option("sqlalchemy.url") or ""
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            run_online(conn)
        engine.dispose()
