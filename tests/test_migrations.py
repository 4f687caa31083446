"""The Alembic history in ``idempotent.migrations``: it builds exactly the schema of
``SqlStore.create_schema()``, runs up and down, and lives beside an application's own
Alembic history without disturbing it, on SQLite and PostgreSQL."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from idempotent.migrations import VERSION_LOCATION, VERSION_TABLE, include_object

from idempotent import SqlStore, _migrate

RECORDS = "idempotency_records"
POSITIONS = "idempotency_positions"
HEAD = "idempotent_0003"
OUTBOX = "idempotency_outbox"


def schema_of(engine: sa.Engine) -> dict[str, Any]:
    """Everything the inspector knows about each table, version tables left out."""
    insp = sa.inspect(engine)
    tables: dict[str, Any] = {}
    for name in sorted(insp.get_table_names()):
        if name in (VERSION_TABLE, "alembic_version"):
            continue
        tables[name] = {
            "columns": [
                (c["name"], repr(c["type"]), c["nullable"], c.get("default"))
                for c in insp.get_columns(name)
            ],
            "pk": insp.get_pk_constraint(name),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(name)
            ),
            "checks": sorted(
                (c["name"], " ".join(c["sqltext"].split()))
                for c in insp.get_check_constraints(name)
            ),
            "uniques": insp.get_unique_constraints(name),
            "foreign_keys": insp.get_foreign_keys(name),
        }
        if engine.dialect.name == "sqlite":  # WITHOUT ROWID is only in the DDL text
            with engine.connect() as conn:
                ddl = conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
                ).scalar_one()
            tables[name]["ddl"] = " ".join(ddl.split())
    return tables


def fresh_engine(url: str, tmp_path: Path, suffix: str) -> sa.Engine:
    """A second, empty database of the same kind as ``url``."""
    if url.startswith("sqlite"):
        return sa.create_engine(f"sqlite:///{tmp_path}/{suffix}.db", poolclass=sa.NullPool)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"{sa.make_url(url).database}_{suffix}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return sa.create_engine(sa.make_url(url).set(database=name), poolclass=sa.NullPool)


def drop(engine: sa.Engine, url: str) -> None:
    engine.dispose()
    if not url.startswith("sqlite"):
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {engine.url.database} WITH (FORCE)")
        admin.dispose()


def test_migrated_schema_equals_create_schema(sql_url: str, tmp_path: Path) -> None:
    """Tables, columns, types, nullability, primary key, indexes and constraints match."""
    migrated = sa.create_engine(sql_url, poolclass=sa.NullPool)
    assert _migrate.upgrade(migrated) == _migrate.Migration((), (HEAD,))
    modelled = fresh_engine(sql_url, tmp_path, "model")
    try:
        SqlStore(modelled).create_schema()
        expected = schema_of(modelled)
        assert list(expected) == [OUTBOX, POSITIONS, RECORDS]
        assert [i[0] for i in expected[OUTBOX]["indexes"]] == [f"ix_{OUTBOX}_next_at"]
        assert expected[POSITIONS]["pk"]["constrained_columns"] == [
            "consumer_group", "topic", "partition"]
        assert expected[RECORDS]["checks"], "the inspector should see the state check"
        assert [i[0] for i in expected[RECORDS]["indexes"]] == [f"ix_{RECORDS}_expires_at"]
        assert schema_of(migrated) == expected
    finally:
        drop(modelled, sql_url)
        migrated.dispose()


def test_upgrade_downgrade_upgrade(sql_url: str) -> None:
    """The history runs down to nothing and up again; the store works on the result."""
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        _migrate.upgrade(engine)
        once = schema_of(engine)
        # one step down removes the outbox table alone, the next the positions table
        one = _migrate.downgrade(engine, "idempotent_0002")
        assert one == _migrate.Migration((HEAD,), ("idempotent_0002",))
        tables = set(sa.inspect(engine).get_table_names())
        assert {RECORDS, POSITIONS} <= tables and OUTBOX not in tables
        two = _migrate.downgrade(engine, "idempotent_0001")
        assert two == _migrate.Migration(("idempotent_0002",), ("idempotent_0001",))
        tables = set(sa.inspect(engine).get_table_names())
        assert RECORDS in tables and not {POSITIONS, OUTBOX} & tables
        _migrate.upgrade(engine)
        assert schema_of(engine) == once
        down = _migrate.downgrade(engine, "base")
        assert down == _migrate.Migration((HEAD,), ())
        assert not {RECORDS, POSITIONS, OUTBOX} & set(sa.inspect(engine).get_table_names())
        assert _migrate.current(engine) == ()
        _migrate.upgrade(engine)
        assert schema_of(engine) == once
        assert _migrate.current(engine) == _migrate.heads() == (HEAD,)
        # upgrading again is a no-op, and the table serves the store
        assert _migrate.upgrade(engine).before == (HEAD,)
        store = SqlStore(engine)
        claimed = store.claim("ns", "k", fingerprint=None)
        store.complete("ns", "k", claimed.token, b"1")  # type: ignore[union-attr]
        record = store.get("ns", "k")
        assert record is not None and record.result == b"1"
    finally:
        engine.dispose()


def _app_project(tmp_path: Path, url: str, *, with_ours: bool) -> Config:
    """An application's Alembic project with its own env.py and one revision (orders)."""
    root = tmp_path / "app"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(textwrap.dedent("""
        from alembic import context
        import sqlalchemy as sa

        config = context.config
        engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.NullPool)
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
    """))
    (root / "script.py.mako").write_text("")
    (root / "versions" / "a1_orders.py").write_text(textwrap.dedent("""
        import sqlalchemy as sa
        from alembic import op

        revision = "a1"
        down_revision = None
        branch_labels = ("app",)
        depends_on = None

        def upgrade():
            op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True))

        def downgrade():
            op.drop_table("orders")
    """))
    cfg = Config()
    cfg.set_main_option("script_location", str(root))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # as the README says: the package-resource form, with a separator that is not ":"
    locations = [str(root / "versions")] + (["idempotent.migrations:versions"] if with_ours
                                            else [])
    cfg.set_main_option("path_separator", "space")
    cfg.set_main_option("version_locations", " ".join(locations))
    return cfg


def _versions(engine: sa.Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.exec_driver_sql(f"SELECT version_num FROM {table}").scalars())


def test_inside_the_apps_version_locations(sql_url: str, tmp_path: Path) -> None:
    """Added to the app's version_locations, our branch runs in the app's own env.py and
    version table beside the app's branch, and goes away alone."""
    cfg = _app_project(tmp_path, sql_url, with_ours=True)
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        command.upgrade(cfg, "heads")
        assert {"orders", RECORDS, POSITIONS, OUTBOX} <= set(
            sa.inspect(engine).get_table_names())
        assert _versions(engine, "alembic_version") == {"a1", HEAD}
        assert VERSION_TABLE not in sa.inspect(engine).get_table_names()

        command.downgrade(cfg, "idempotent@base")
        assert RECORDS not in sa.inspect(engine).get_table_names()
        assert "orders" in sa.inspect(engine).get_table_names()
        assert _versions(engine, "alembic_version") == {"a1"}

        command.upgrade(cfg, "idempotent@head")
        assert _versions(engine, "alembic_version") == {"a1", HEAD}
        command.downgrade(cfg, "app@base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version", RECORDS,
                                                             POSITIONS, OUTBOX}
        assert _versions(engine, "alembic_version") == {HEAD}
    finally:
        engine.dispose()


def test_beside_the_apps_history_with_its_own_version_table(
    sql_url: str, tmp_path: Path
) -> None:
    """``idempotent db upgrade`` and the app's ``alembic upgrade`` share a database, each
    with its own version table; downgrading ours leaves the app's untouched."""
    cfg = _app_project(tmp_path, sql_url, with_ours=False)
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        command.upgrade(cfg, "heads")
        _migrate.upgrade(engine)
        assert {"orders", RECORDS} <= set(sa.inspect(engine).get_table_names())
        assert _versions(engine, "alembic_version") == {"a1"}
        assert _versions(engine, VERSION_TABLE) == {HEAD}

        _migrate.downgrade(engine, "base")
        assert "orders" in sa.inspect(engine).get_table_names()
        assert RECORDS not in sa.inspect(engine).get_table_names()
        assert _versions(engine, "alembic_version") == {"a1"}
        assert _versions(engine, VERSION_TABLE) == set()

        _migrate.upgrade(engine)
        command.downgrade(cfg, "base")
        assert RECORDS in sa.inspect(engine).get_table_names()
        assert _versions(engine, VERSION_TABLE) == {HEAD}
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite:///ignored.db"])
def test_offline_sql_names_our_version_table(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--sql`` prints the DDL, recording the revision in idempotent's version table."""
    _migrate.sql(url, "heads")
    out = capsys.readouterr().out
    assert f"CREATE TABLE {VERSION_TABLE}" in out
    assert f"CREATE TABLE {RECORDS}" in out
    assert "WITHOUT ROWID" in out
    assert f"CREATE TABLE {POSITIONS}" in out
    assert f"CREATE TABLE {OUTBOX}" in out
    assert f"INSERT INTO {VERSION_TABLE} (version_num) VALUES ('idempotent_0001')" in out
    assert f"UPDATE {VERSION_TABLE} SET version_num='{HEAD}'" in out


def test_version_location_is_the_installed_versions_dir() -> None:
    assert Path(VERSION_LOCATION, "0001_records_table.py").is_file()
    assert Path(VERSION_LOCATION, "0002_positions_table.py").is_file()
    assert Path(VERSION_LOCATION, "0003_outbox_table.py").is_file()


def test_include_object_hides_our_tables_from_the_apps_autogenerate(sql_url: str) -> None:
    """With ``include_object``, comparing the app's models to a database that also holds
    idempotent's tables proposes nothing; without it, Alembic would drop them."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    app = sa.MetaData()
    sa.Table("orders", app, sa.Column("id", sa.Integer, primary_key=True))
    try:
        _migrate.upgrade(engine)
        app.create_all(engine)
        with engine.connect() as conn:
            plain = compare_metadata(MigrationContext.configure(conn), app)
            filtered = compare_metadata(
                MigrationContext.configure(conn, opts={"include_object": include_object}), app)
        assert {d[1].name for d in plain if d[0] == "remove_table"} == {
            RECORDS, POSITIONS, OUTBOX, VERSION_TABLE}
        assert filtered == []
    finally:
        engine.dispose()


def test_0002_keeps_a_positions_table_create_schema_made(sql_url: str) -> None:
    """A database made by create_schema() (records, positions and outbox tables) and
    stamped at 0001 upgrades to the head without error; the schema stays
    create_schema()'s."""
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        SqlStore(engine).create_schema()
        made = schema_of(engine)
        assert POSITIONS in made
        _migrate.stamp(engine, "idempotent_0001")
        assert _migrate.upgrade(engine) == _migrate.Migration(("idempotent_0001",), (HEAD,))
        assert schema_of(engine) == made
        _migrate.downgrade(engine, "idempotent_0001")
        assert not {POSITIONS, OUTBOX} & set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_adopting_an_older_create_schema_database_creates_the_new_tables(
        sql_url: str) -> None:
    """A database whose create_schema() ran under 0.1 (the records table only) is adopted
    by `upgrade`: its records are untouched and the positions and outbox tables created,
    as the migrations make them."""
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        store = SqlStore(engine)
        store.table.create(engine)  # what 0.1's create_schema() made
        claimed = store.claim("ns", "k", fingerprint=None)
        store.complete("ns", "k", claimed.token, b"1")  # type: ignore[union-attr]
        done = _migrate.upgrade(engine)
        assert done == _migrate.Migration((), (HEAD,), True)
        assert {RECORDS, POSITIONS, OUTBOX} <= set(sa.inspect(engine).get_table_names())
        record = store.get("ns", "k")
        assert record is not None and record.result == b"1"
    finally:
        engine.dispose()
