"""``idempotent db upgrade|downgrade|current``: idempotent's own Alembic history.

The history lives in ``idempotent.migrations`` and records itself in its own version
table (``idempotent_alembic_version``), so running it never touches an application's
``alembic_version``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True)
class Migration:
    """The revisions applied before and after a command (empty: none, the base)."""

    before: tuple[str, ...]
    after: tuple[str, ...]


def _migrations() -> Any:
    """``idempotent.migrations``: a top-level directory that setuptools' ``package-dir``
    installs under ``idempotent``, which mypy cannot follow; hence imported by name."""
    return importlib.import_module("idempotent.migrations")


def _config(url: str | None, connection: sa.Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", _migrations().SCRIPT_LOCATION)
    if url is not None:  # configparser interpolation: a literal % must be doubled
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def heads() -> tuple[str, ...]:
    """The newest revision(s) of the history."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(_config(None)).get_heads())


def current(engine: sa.Engine) -> tuple[str, ...]:
    """The revision(s) recorded in the database (empty: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": _migrations().VERSION_TABLE})
        return tuple(ctx.get_current_heads())


def upgrade(engine: sa.Engine, revision: str = "heads") -> Migration:
    """Apply the history up to ``revision``, in one transaction where the database allows."""
    from alembic import command

    before = current(engine)
    with engine.begin() as conn:
        command.upgrade(_config(None, conn), revision)
    return Migration(before, current(engine))


def downgrade(engine: sa.Engine, revision: str) -> Migration:
    """Undo the history down to ``revision`` (``base`` drops the records table)."""
    from alembic import command

    before = current(engine)
    with engine.begin() as conn:
        command.downgrade(_config(None, conn), revision)
    return Migration(before, current(engine))


def sql(url: str, revision: str, *, down: bool = False) -> None:
    """Print the DDL of an upgrade (or downgrade, ``from:to``) instead of running it."""
    from alembic import command

    cfg = _config(url)
    if down:
        command.downgrade(cfg, revision, sql=True)
    else:
        command.upgrade(cfg, revision, sql=True)
