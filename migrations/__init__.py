"""Alembic migrations for the idempotency records table.

Two ways to run them (README, "Migrations"):

* ``idempotent db upgrade --url URL``: this history alone, recorded in its own version
  table `VERSION_TABLE`;
* inside an application's own Alembic project: add `VERSION_LOCATION` to its
  ``version_locations`` and run ``alembic upgrade heads`` (or ``idempotent@head``); the
  revisions sit on their own branch, labelled `BRANCH`.

Revision ids start with ``idempotent_`` so they cannot collide with an application's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

#: Where ``idempotent db …`` records the applied revision (never the app's ``alembic_version``).
VERSION_TABLE = "idempotent_alembic_version"
#: The branch label of every revision here: ``alembic upgrade idempotent@head``.
BRANCH = "idempotent"
#: This directory: Alembic's ``script_location`` for ``idempotent db …``.
SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
#: The revisions; what an application adds to its own ``version_locations``.
VERSION_LOCATION = str(Path(__file__).resolve().parent / "versions")


def target_metadata(schema: str | None = None) -> sa.MetaData:
    """The model the migrations build: the tables as `SqlStore` defines them (records,
    Kafka positions, outbox)."""
    from ..stores import _sql_schema

    metadata = _sql_schema.new_metadata(schema)
    _sql_schema.records_table(metadata)
    _sql_schema.positions_table(metadata)
    _sql_schema.outbox_table(metadata)
    return metadata


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """For an application's ``context.configure(include_object=...)``: keeps Alembic's
    autogenerate from proposing to drop idempotent's tables, which its models lack."""
    from ..stores._sql_schema import DEFAULT_OUTBOX_TABLE, DEFAULT_POSITIONS_TABLE, DEFAULT_TABLE

    ours = (DEFAULT_TABLE, DEFAULT_POSITIONS_TABLE, DEFAULT_OUTBOX_TABLE, VERSION_TABLE)
    if type_ == "table":
        return name not in ours
    table = getattr(obj, "table", None)
    return getattr(table, "name", None) not in ours
