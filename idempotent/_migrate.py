"""``idempotent db upgrade|downgrade|current|stamp``: idempotent's own Alembic history.

The history lives in ``idempotent.migrations`` and records itself in its own version
table (``idempotent_alembic_version``), so running it never touches an application's
``alembic_version``.

A database that never ran the history but already holds the records table (made by
``SqlStore.create_schema()``) is *adopted* by `upgrade`: when the table matches the model
(columns, types, nullability, primary key, indexes) the newest revision is stamped instead
of run; when it does not, `SchemaMismatch` names the differences.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True)
class Migration:
    """The revisions applied before and after a command (empty: none, the base);
    ``adopted``: an existing records table was stamped rather than created."""

    before: tuple[str, ...]
    after: tuple[str, ...]
    adopted: bool = False


class AdoptionError(Exception):
    """`upgrade` met a records table it did not create and cannot adopt."""


class SchemaMismatch(AdoptionError):
    """`upgrade` met a records table it did not create and that differs from the model."""

    def __init__(self, table: str, differences: list[str]) -> None:
        self.table = table
        self.differences = differences
        super().__init__(
            f"the existing table {table} does not match idempotent's model "
            f"({'; '.join(differences)}), so `idempotent db upgrade` will not adopt it: "
            "fix the table, or, if it is what you want, record the revision without "
            "running it with `idempotent db stamp REVISION`")


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
    """Apply the history up to ``revision``, in one transaction where the database allows.

    On a database that never ran the history but holds the records table already (from
    ``SqlStore.create_schema()``), the table is adopted: if it matches the model, the
    first revision is stamped (the records table is not touched) and the later ones run,
    creating what the database lacks and keeping what create_schema() made; if it does
    not match, `SchemaMismatch`."""
    from alembic import command

    before = current(engine)
    with engine.begin() as conn:
        if not before and _has_records_table(conn):
            _adopt(conn, revision)
            adopted = True
        else:
            command.upgrade(_config(None, conn), revision)
            adopted = False
    return Migration(before, current(engine), adopted)


def stamp(engine: sa.Engine, revision: str = "heads") -> Migration:
    """Record ``revision`` in the version table without running any migration (``base``
    forgets every revision and drops nothing)."""
    from alembic import command

    before = current(engine)
    with engine.begin() as conn:
        command.stamp(_config(None, conn), revision)
    return Migration(before, current(engine))


#: The revision that creates the records table (unchanged by the later ones).
FIRST_REVISION = "idempotent_0001"


def records_table_name() -> str:
    """The table the history creates (the default `SqlStore` table)."""
    from .stores._sql_schema import DEFAULT_TABLE

    return DEFAULT_TABLE


def _has_records_table(conn: sa.Connection) -> bool:
    return bool(sa.inspect(conn).has_table(records_table_name()))


def differences(conn: sa.Connection) -> list[str]:
    """How the database's records table differs from the model the history builds, in
    words (empty: it matches): columns (type, nullability), primary key, indexes."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from .stores import _sql_schema

    name = records_table_name()
    model = _sql_schema.new_metadata()  # the records table alone: the others come later
    _sql_schema.records_table(model)

    def only_ours(obj_name: str | None, type_: str, parent: Any) -> bool:
        return type_ != "table" or obj_name == name

    ctx = MigrationContext.configure(conn, opts={"include_name": only_ours,
                                                 "compare_type": True})
    out: list[str] = []
    for diff in compare_metadata(ctx, model):
        for op in diff if isinstance(diff, list) else [diff]:
            out.append(_in_words(op))
    want = list(model.tables[name].primary_key.columns.keys())
    have = sa.inspect(conn).get_pk_constraint(name).get("constrained_columns") or []
    if list(have) != want:
        out.append(f"primary key ({', '.join(have) or 'none'}), the model's is "
                   f"({', '.join(want)})")
    return out


def _in_words(op: Any) -> str:
    """One item of Alembic's autogenerate comparison, as a phrase."""
    kind = op[0]
    if kind in ("add_column", "remove_column"):
        column = op[3]
        return (f"missing column {column.name}" if kind == "add_column"
                else f"unexpected column {column.name}")
    if kind in ("add_index", "remove_index"):
        index = op[1]
        cols = ", ".join(str(getattr(c, "name", c)) for c in getattr(index, "expressions", ()))
        return (f"missing index {index.name} ({cols})" if kind == "add_index"
                else f"unexpected index {index.name}")
    if kind in ("add_constraint", "remove_constraint"):
        which = "missing" if kind == "add_constraint" else "unexpected"
        return f"{which} constraint {op[1].name}"
    if kind == "modify_type":
        return f"column {op[3]} is {op[5]}, the model's is {op[6]}"
    if kind == "modify_nullable":
        def null(flag: Any) -> str:
            return "nullable" if flag else "NOT NULL"

        return f"column {op[3]} is {null(op[5])}, the model's is {null(op[6])}"
    if kind == "add_table":
        return f"missing table {op[1].name}"
    return " ".join(str(part) for part in op[:4] if isinstance(part, str))


def _adopt(conn: sa.Connection, revision: str) -> None:
    """Stamp the newest revision over an existing records table that matches the model."""
    from alembic import command
    from alembic.script import ScriptDirectory

    found = differences(conn)
    if found:
        raise SchemaMismatch(records_table_name(), found)
    cfg = _config(None, conn)
    script = ScriptDirectory.from_config(cfg)
    newest = set(script.get_heads())
    wanted = {rev.revision for rev in script.get_revisions(revision) if rev is not None}
    if wanted != newest:
        # the table is the newest revision's: an older target would need downgrades
        raise AdoptionError(
            f"the existing table {records_table_name()} matches the newest revision "
            f"({', '.join(sorted(newest))}), not {revision}: run `idempotent db upgrade` "
            f"without a revision, or `idempotent db stamp {revision}` if the table is that "
            "revision's")
    # The records table is the first revision's (unchanged since): record that one, then
    # run the later revisions, which create the tables a create_schema() of an older
    # version lacked and keep those it made.
    command.stamp(cfg, FIRST_REVISION)
    command.upgrade(cfg, "heads")


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
