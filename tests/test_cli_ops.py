"""The operations commands: ``idempotent db``, ``inspect``, ``purge``, ``stats``, in text
and ``--json``, on SQLite and PostgreSQL; and bad input (a bad URL, an unreachable
database, a missing table, an unknown namespace), which must give one line on stderr
and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _servers import free_port

from idempotent import Claimed, SqlStore, State, _migrate, idempotent
from idempotent._keys import MAX_KEY_LENGTH
from idempotent.cli import main

HEAD = "idempotent_0003"  # the newest revision


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


@pytest.fixture
def store(sql_url: str) -> Any:
    """A migrated store with payments (5 completed, 1 failed, 1 running) and an expired
    e-mail record."""
    s = SqlStore(sql_url)
    _migrate.upgrade(s.engine)

    @idempotent(s, key="id", namespace="payments", lease=60, keep_failures=(ValueError,))
    def pay(msg: dict[str, Any]) -> dict[str, Any]:
        if msg["cents"] < 0:
            raise ValueError("negative")
        return {"ok": msg["id"]}

    for i in range(5):
        pay({"id": f"pay_{i}", "cents": 100})
    with pytest.raises(ValueError):
        pay({"id": "pay_bad", "cents": -1})
    s.claim("payments", "pay_running", fingerprint=None, lease=60)
    s.claim("emails", "welcome", fingerprint=None, lease=0.001, ttl=0.001)
    yield s
    s.engine.dispose()


def test_db_upgrade_current_downgrade(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The db commands report the revisions before and after, in text and JSON."""
    code, out, _ = run(capsys, "db", "current", "--url", sql_url)
    assert code == 0 and out.endswith(f": (none) (head is {HEAD})\n")
    code, out, _ = run(capsys, "db", "upgrade", "--url", sql_url)
    assert code == 0 and out.endswith(f": upgraded (none) -> {HEAD}\n")
    doc = run_json(capsys, "db", "upgrade", "--url", sql_url)
    assert (doc["before"], doc["after"], doc["head"]) == (
        [HEAD], [HEAD], [HEAD])
    assert run_json(capsys, "db", "current", "--url", sql_url)["current"] == [HEAD]
    code, out, _ = run(capsys, "db", "downgrade", "base", "--url", sql_url)
    assert code == 0 and out.endswith(f": downgraded {HEAD} -> (none)\n")
    assert "password" not in out and "secret" not in out


def test_db_unknown_revision(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "db", "downgrade", "nope", "--url", sql_url)
    one_line_error(code, out, err, "Can't locate revision identified by 'nope'")
    assert code == 2


def test_db_upgrade_sql_prints_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "db", "upgrade", "--sql", "--url", "postgresql+psycopg://x@h/db")
    assert code == 0
    assert "CREATE TABLE idempotency_records" in out and "DOUBLE PRECISION" in out


def test_inspect_shows_a_completed_record(store: SqlStore,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    record = store.get("payments", "pay_1")
    assert record is not None and record.result is not None
    doc = run_json(capsys, "inspect", "payments", "pay_1", "--url", url)
    assert doc["state"] == "completed" and doc["expired"] is False
    assert doc["fingerprint"] == record.fingerprint
    assert doc["result_bytes"] == len(record.result)
    assert doc["lease"] is None
    assert doc["created_at"].endswith("Z") and doc["created_at"][:4] == time.strftime("%Y")
    code, out, _ = run(capsys, "inspect", "payments", "pay_1", "--url", url)
    assert code == 0
    assert f"result        {len(record.result)} bytes" in out
    assert "ok" not in out  # the result itself is never shown


def test_inspect_shows_the_lease_of_a_running_record(
    store: SqlStore, capsys: pytest.CaptureFixture[str]
) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    record = store.get("payments", "pay_running")
    assert record is not None
    doc = run_json(capsys, "inspect", "payments", "pay_running", "--url", url)
    assert doc["state"] == "in_progress"
    assert doc["lease"]["owner_token"] == record.token and doc["lease"]["live"] is True
    _, out, _ = run(capsys, "inspect", "payments", "pay_running", "--url", url)
    assert f"lease owner   {record.token}" in out and "s left)" in out
    failed = run_json(capsys, "inspect", "payments", "pay_bad", "--url", url)
    assert failed["state"] == State.FAILED.value


def test_inspect_finds_long_and_scoped_keys(sql_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The key is given as the handler saw it; the command hashes and scopes it alike."""
    s = SqlStore(sql_url)
    _migrate.upgrade(s.engine)
    long_key = "k" * (MAX_KEY_LENGTH + 1)

    @idempotent(s, key="id", namespace="n", scope=lambda m: m["tenant"])
    def handle(msg: dict[str, Any]) -> None:
        return None

    handle({"id": long_key, "tenant": "acme"})
    doc = run_json(capsys, "inspect", "n", long_key, "--scope", "acme", "--url", sql_url)
    assert doc["key"].startswith("sha256:")
    code, _, err = run(capsys, "inspect", "n", long_key, "--url", sql_url)
    assert code == 1 and "no record of key" in err
    s.engine.dispose()


def test_stats_matches_the_store(store: SqlStore, capsys: pytest.CaptureFixture[str]) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    doc = run_json(capsys, "stats", "--url", url)
    got = [(c["namespace"], c["state"], c["count"], c["expired"]) for c in doc["counts"]]
    assert got == [
        ("emails", "in_progress", 1, 1),
        ("payments", "completed", 5, 0),
        ("payments", "failed", 1, 0),
        ("payments", "in_progress", 1, 0),
    ]
    assert doc["total"] == 8
    assert (doc["oldest_in_progress"]["key"], doc["oldest_in_progress"]["lease"]["live"]) == (
        "pay_running", True)
    only = run_json(capsys, "stats", "--namespace", "emails", "--url", url)
    assert [c["namespace"] for c in only["counts"]] == ["emails"]
    code, out, _ = run(capsys, "stats", "--url", url)
    assert code == 0 and "oldest in progress: payments / pay_running" in out


def test_purge_deletes_expired_then_old(store: SqlStore, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The URL may come from IDEMPOTENT_URL; --older-than and --namespace narrow the purge;
    the running payment is kept throughout."""
    monkeypatch.setenv("IDEMPOTENT_URL", store.engine.url.render_as_string(hide_password=False))
    deadline = time.monotonic() + 10
    while store.stats("emails").counts[0].expired != 1:  # its 1 ms ttl has run out
        assert time.monotonic() < deadline
    doc = run_json(capsys, "purge", "--batch", "2")
    assert (doc["deleted"], doc["batch"], doc["older_than"]) == (1, 2, None)
    assert store.get("emails", "welcome") is None
    doc = run_json(capsys, "purge", "--older-than", "0s", "--namespace", "payments")
    assert doc["deleted"] == 6 and doc["older_than"] == 0
    assert [(r.key, r.state) for r in [store.get("payments", "pay_running")] if r] == [
        ("pay_running", State.IN_PROGRESS)]
    code, out, _ = run(capsys, "purge", "--older-than", "7d")
    assert code == 0 and out.startswith("deleted 0 records expired or created over 7d ago")


# -- bad input -------------------------------------------------------------------------------
def one_line_error(code: int, out: str, err: str, expected: str) -> None:
    assert code != 0, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert expected in err, err


@pytest.mark.parametrize(("argv", "status", "expected"), [
    (["stats", "--url", "not a url"], 2, "bad store URL"),
    (["stats", "--url", "nosuchdb://x/y"], 2, "bad store URL"),
    (["db", "upgrade", "--url", "::"], 2, "bad store URL"),
    (["stats"], 2, "pass --url URL or set IDEMPOTENT_URL"),
    (["db", "current", "--url", "redis://127.0.0.1:6379"], 2, "db commands are for SQL"),
])
def test_bad_urls(argv: list[str], status: int, expected: str,
                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDEMPOTENT_URL", raising=False)
    code, out, err = run(capsys, *argv)
    one_line_error(code, out, err, expected)
    assert code == status


@pytest.mark.parametrize("argv", [
    ["inspect", "nope", "k"], ["purge", "--namespace", "nope"], ["stats", "--namespace", "nope"],
])
def test_unknown_namespace(store: SqlStore, argv: list[str],
                           capsys: pytest.CaptureFixture[str]) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    one_line_error(*run(capsys, *argv, "--url", url), "unknown namespace 'nope'")


@pytest.mark.parametrize("kind", ["postgresql+psycopg", "redis"])
def test_unreachable_store(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A closed port on 127.0.0.1 fails at once, in one line."""
    url = f"{kind}://user@127.0.0.1:{free_port()}/" + ("0" if kind == "redis" else "db")
    for argv in (["stats"], ["inspect", "ns", "k"], ["purge"]):
        one_line_error(*run(capsys, *argv, "--url", url), "cannot reach")
    if kind != "redis":
        one_line_error(*run(capsys, "db", "upgrade", "--url", url), "cannot reach the database")


def test_missing_table_and_missing_file(sql_url: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An empty database names the command that creates the table; a SQLite path that
    does not exist is not created."""
    if sql_url.startswith("sqlite"):
        Path(sql_url.removeprefix("sqlite:///")).touch()
    one_line_error(*run(capsys, "stats", "--url", sql_url), "run `idempotent db upgrade")
    missing = tmp_path / "typo.db"
    one_line_error(*run(capsys, "stats", "--url", f"sqlite:///{missing}"), "no SQLite database")
    assert not missing.exists()


def test_console_script_bad_input_has_no_traceback() -> None:
    """The installed entry point, as a process: one stderr line, exit status 1."""
    url = f"postgresql+psycopg://user@127.0.0.1:{free_port()}/db"
    proc = subprocess.run([sys.executable, "-m", "idempotent.cli", "stats", "--url", url],
                          capture_output=True, text=True, timeout=120)
    one_line_error(proc.returncode, proc.stdout, proc.stderr, "cannot reach the database")
    assert proc.returncode == 1


def test_lease_record_made_by_claim_is_seen(store: SqlStore,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A record claimed after the fixture shows up in the next stats (no caching)."""
    url = store.engine.url.render_as_string(hide_password=False)
    got = store.claim("later", "k", fingerprint=None)
    assert isinstance(got, Claimed)
    doc = run_json(capsys, "stats", "--namespace", "later", "--url", url)
    assert doc["total"] == 1


def test_the_commands_on_redis(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect, stats and purge go through the same store interface on Redis."""
    from idempotent.stores import open_store

    store = open_store(redis_url)
    got = store.claim("payments", "pay_1", fingerprint="f" * 64, lease=60)
    assert isinstance(got, Claimed)
    store.complete("payments", "pay_1", got.token, b'{"ok":1}')
    running = store.claim("payments", "pay_2", fingerprint=None, lease=60)
    assert isinstance(running, Claimed)
    doc = run_json(capsys, "inspect", "payments", "pay_1", "--url", redis_url)
    assert (doc["state"], doc["fingerprint"], doc["result_bytes"]) == ("completed", "f" * 64, 8)
    doc = run_json(capsys, "inspect", "payments", "pay_2", "--url", redis_url)
    assert doc["lease"]["owner_token"] == running.token
    stats = run_json(capsys, "stats", "--url", redis_url)
    assert [(c["state"], c["count"]) for c in stats["counts"]] == [
        ("completed", 1), ("in_progress", 1)]
    assert run_json(capsys, "purge", "--older-than", "0", "--url", redis_url)["deleted"] == 1
    assert store.get("payments", "pay_1") is None and store.get("payments", "pay_2")
    one_line_error(*run(capsys, "stats", "--namespace", "nope", "--url", redis_url),
                   "unknown namespace")


def test_an_async_driver_url_is_used_through_its_sync_twin(
    store: SqlStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """The application's async URL (aiosqlite, psycopg_async) works as it is."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        url = url.set(drivername="postgresql+psycopg_async")
    text = url.render_as_string(hide_password=False)
    assert run_json(capsys, "stats", "--url", text)["total"] == 8
    assert run_json(capsys, "db", "current", "--url", text)["current"] == [HEAD]


def test_a_table_of_another_name(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--table reaches a store made with SqlStore(table=...); a wrong name is reported as
    a missing table; Redis refuses the option."""
    s = SqlStore(sql_url, table="payment_keys")
    s.create_schema()
    with s.engine.begin() as conn:
        s.record(conn, "payments", "pay_1", ttl=-1)
    assert run_json(capsys, "stats", "--table", "payment_keys", "--url", sql_url)["total"] == 1
    doc = run_json(capsys, "purge", "--table", "payment_keys", "--url", sql_url)
    assert doc["deleted"] == 1
    one_line_error(*run(capsys, "stats", "--url", sql_url), "run `idempotent db upgrade")
    one_line_error(*run(capsys, "stats", "--table", "x", "--url", "redis://127.0.0.1:1/0"),
                   "--table and --schema are for SQL stores")
    s.engine.dispose()
