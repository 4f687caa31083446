"""Issue 15, item 6: the CLI's holes, each reproduced on a real database (SQLite files,
and the suite's PostgreSQL where the behaviour depends on the server).

* a namespace over 128 characters is hashed by ``stats --namespace`` and ``purge
  --namespace`` as by the decorator and ``inspect``;
* the read-only ``stats`` and ``inspect`` leave a SQLite database's journal mode alone;
* ``demo --db PATH`` writes to exactly PATH (``?`` and ``%41`` are file-name characters);
* ``purge --batch`` is bounded, a clear error with exit status 2;
* ``db upgrade`` adopts a records table made by ``create_schema()`` when it matches the
  model, refuses one that does not (naming the differences), and ``db stamp`` records a
  revision without running it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from idempotent.migrations import VERSION_TABLE

from idempotent import SqlStore, _migrate, demo, idempotent
from idempotent._keys import MAX_KEY_LENGTH, fit
from idempotent.cli import main

LONG_NS = "orders." + "n" * MAX_KEY_LENGTH  # over the column: the decorator hashes it

HEAD = "idempotent_0003"  # the newest revision


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, ""), (code, out, err)
    return json.loads(out)


def url_of(store: SqlStore) -> str:
    return store.engine.url.render_as_string(hide_password=False)


# -- a long namespace, treated alike by every command ---------------------------------------
def test_long_namespace_in_stats_and_purge(sql_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = SqlStore(sql_url)
    _migrate.upgrade(store.engine)
    try:
        @idempotent(store, key="id", namespace=LONG_NS)
        def handle(msg: dict[str, Any]) -> int:
            return 1

        handle({"id": "a"})
        handle({"id": "b"})
        with store.engine.begin() as conn:  # one expired record, for the purge
            store.record(conn, fit(LONG_NS), "old", ttl=-1)
        url = url_of(store)
        assert run_json(capsys, "inspect", LONG_NS, "a", "--url", url)["state"] == "completed"

        doc = run_json(capsys, "stats", "--namespace", LONG_NS, "--url", url)
        assert doc["total"] == 3
        assert {c["namespace"] for c in doc["counts"]} == {fit(LONG_NS)}

        doc = run_json(capsys, "purge", "--namespace", LONG_NS, "--url", url)
        assert doc["deleted"] == 1 and doc["namespace"] == fit(LONG_NS)
        assert store.get(fit(LONG_NS), "old") is None
        assert store.get(fit(LONG_NS), "a") is not None
        doc = run_json(capsys, "purge", "--namespace", LONG_NS, "--older-than", "0",
                       "--url", url)
        assert doc["deleted"] == 2
    finally:
        store.engine.dispose()


# -- the read-only commands leave the journal mode alone ------------------------------------
def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        mode: str = conn.execute("PRAGMA journal_mode").fetchone()[0]
        return mode
    finally:
        conn.close()


def _delete_mode_app_db(path: Path, *, with_table: bool) -> str:
    """An application's own SQLite file in the default rollback journal (DELETE)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    if with_table:
        engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool)
        SqlStore(engine).create_schema()  # an engine of the app's: its pragmas, not ours
        engine.dispose()
    assert _journal_mode(path) == "delete"
    return f"sqlite:///{path}"


@pytest.mark.parametrize("argv", [
    ["stats"], ["stats", "--namespace", "nope"], ["inspect", "ns", "k"],
    ["inspect", "nope", "k", "--json"], ["purge"],
])
@pytest.mark.parametrize("with_table", [True, False])
def test_read_only_commands_keep_the_journal_mode(
    argv: list[str], with_table: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found, not found, or no table at all: the file stays in DELETE mode (purge, which
    writes, does not change it either)."""
    path = tmp_path / "app.db"
    url = _delete_mode_app_db(path, with_table=with_table)
    run(capsys, *argv, "--url", url)
    assert _journal_mode(path) == "delete"
    assert not Path(f"{path}-wal").exists()


def test_read_only_commands_still_read_a_wal_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database the store made (WAL) is read as it is, and stays WAL."""
    path = tmp_path / "idem.db"
    store = SqlStore(f"sqlite:///{path}")
    store.create_schema()
    store.claim("ns", "k", fingerprint=None)
    store.engine.dispose()
    assert _journal_mode(path) == "wal"
    assert run_json(capsys, "stats", "--url", f"sqlite:///{path}")["total"] == 1
    assert run_json(capsys, "inspect", "ns", "k", "--url", f"sqlite:///{path}")["state"] == (
        "in_progress")
    assert _journal_mode(path) == "wal"


# -- demo --db is a file path ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["run?1.db", "%41.db", "a#b.db", "with space.db"])
def test_demo_db_is_exactly_the_path_given(name: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--payments", "20", "--progress", "none", "--db", name]) == 0
    out = capsys.readouterr().out
    assert f"database: SQLite file {tmp_path / name}" in out
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(
        (f"{name}-",))) == [name]
    conn = sqlite3.connect(tmp_path / name)
    try:
        rows = conn.execute(f"SELECT count(*) FROM {demo.LEDGER_TABLE}").fetchone()[0]
    finally:
        conn.close()
    assert rows == 20


# -- purge --batch is bounded ---------------------------------------------------------------
@pytest.mark.parametrize("batch", ["99999999999999999999", "1000001", "0", "-3", "ten"])
def test_purge_batch_out_of_range_is_a_usage_error(
    batch: str, sql_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SqlStore(sql_url)
    _migrate.upgrade(store.engine)
    store.engine.dispose()
    with pytest.raises(SystemExit) as exc:
        main(["purge", "--batch", batch, "--url", sql_url])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OverflowError" not in err
    assert err.splitlines()[-1].startswith("idempotent purge: error: argument --batch")
    assert "1,000,000" in err.splitlines()[-1] or "1000000" in err.splitlines()[-1]


def test_purge_batch_at_the_bound_works(sql_url: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    store = SqlStore(sql_url)
    _migrate.upgrade(store.engine)
    try:
        with store.engine.begin() as conn:
            store.record(conn, "ns", "k", ttl=-1)
        doc = run_json(capsys, "purge", "--batch", "1000000", "--url", url_of(store))
        assert (doc["deleted"], doc["batch"]) == (1, 1_000_000)
    finally:
        store.engine.dispose()


# -- db upgrade on a create_schema() table; db stamp ---------------------------------------
def _versions(engine: sa.Engine) -> tuple[str, ...]:
    return _migrate.current(engine)


def test_upgrade_adopts_a_matching_create_schema_table(
    sql_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SqlStore(sql_url)
    store.create_schema()
    got = store.claim("ns", "k", fingerprint=None)
    store.complete("ns", "k", got.token, b"1")  # type: ignore[union-attr]
    try:
        code, out, err = run(capsys, "db", "upgrade", "--url", sql_url)
        assert (code, err) == (0, ""), (out, err)
        assert "adopted the existing table idempotency_records" in out
        assert f"stamped idempotent_0001, then upgraded to {HEAD}" in out
        assert _versions(store.engine) == (HEAD,)
        record = store.get("ns", "k")  # the data is untouched
        assert record is not None and record.result == b"1"
        # now an ordinary migrated database
        code, out, _ = run(capsys, "db", "upgrade", "--url", sql_url)
        assert code == 0 and out.endswith(f"already at {HEAD}; nothing to do\n")
        doc = run_json(capsys, "db", "current", "--url", sql_url)
        assert doc["current"] == [HEAD]
    finally:
        store.engine.dispose()


def test_upgrade_adopt_in_json(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = SqlStore(sql_url)
    store.create_schema()
    store.engine.dispose()
    doc = run_json(capsys, "db", "upgrade", "--url", sql_url)
    assert (doc["before"], doc["after"], doc["adopted"]) == ([], [HEAD], True)


def test_upgrade_refuses_a_table_that_differs(sql_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A table of the same name but another shape: one line naming the differences and
    pointing at `db stamp`; nothing is recorded."""
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE idempotency_records (namespace VARCHAR(200) NOT NULL, "
                "key VARCHAR(200) NOT NULL, state VARCHAR(16) NOT NULL, note TEXT, "
                "PRIMARY KEY (namespace, key))")
        code, out, err = run(capsys, "db", "upgrade", "--url", sql_url)
        assert code == 1 and out == "", (out, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "idempotency_records" in err and "does not match" in err
        assert "missing column expires_at" in err
        assert "unexpected column note" in err
        assert "missing index ix_idempotency_records_expires_at" in err
        assert "idempotent db stamp" in err
        assert _versions(engine) == ()
        assert VERSION_TABLE not in sa.inspect(engine).get_table_names() or (
            _versions(engine) == ())
    finally:
        engine.dispose()


def test_db_stamp_records_without_running(sql_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    engine = sa.create_engine(sql_url, poolclass=sa.NullPool)
    try:
        code, out, err = run(capsys, "db", "stamp", "--url", sql_url)
        assert (code, err) == (0, "")
        assert out.endswith(f": stamped (none) -> {HEAD}\n")
        assert _versions(engine) == (HEAD,)
        assert "idempotency_records" not in sa.inspect(engine).get_table_names()
        doc = run_json(capsys, "db", "stamp", "base", "--url", sql_url)
        assert (doc["before"], doc["after"]) == ([HEAD], [])
        code, _, err = run(capsys, "db", "stamp", "nope", "--url", sql_url)
        assert code == 2 and "Can't locate revision identified by 'nope'" in err
    finally:
        engine.dispose()


def test_db_stamp_then_upgrade_on_a_create_schema_table(
    sql_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented way for a table that does not match: stamp, then upgrade."""
    store = SqlStore(sql_url)
    store.create_schema()
    try:
        assert run(capsys, "db", "stamp", "idempotent_0001", "--url", sql_url)[0] == 0
        code, out, _ = run(capsys, "db", "upgrade", "--url", sql_url)
        # the later revisions keep the tables create_schema() made
        assert code == 0 and out.endswith(f"upgraded idempotent_0001 -> {HEAD}\n")
    finally:
        store.engine.dispose()
