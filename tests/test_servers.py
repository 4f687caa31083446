"""Tests of the test harness itself (tests/_servers.py and the conftest fixtures)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import _servers
import psycopg
import pytest
import sqlalchemy as sa
from _servers import PostgresServer, RedisServer


def _dbname(url: str) -> str:
    name = sa.make_url(url).database
    assert name
    return name


def _tables(pg: PostgresServer, dbname: str) -> list[str]:
    rows = pg.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", dbname=dbname
    )
    return [r[0] for r in rows]


def test_server_answers_select_1(pg_server: PostgresServer) -> None:
    assert pg_server.running
    assert pg_server.execute("select 1") == [(1,)]
    with psycopg.connect(pg_server.dsn) as conn:
        assert conn.execute("select 1, current_database()").fetchone() == (1, "idem")


def test_bound_to_loopback_on_reported_port(pg_server: PostgresServer) -> None:
    assert pg_server.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg_server.port}/idem"
    with psycopg.connect(pg_server.dsn) as conn:
        row = conn.execute(
            "SELECT host(inet_server_addr()), inet_server_port(),"
            " current_setting('listen_addresses'), current_setting('fsync')"
        ).fetchone()
    assert row == ("127.0.0.1", pg_server.port, "127.0.0.1", "on")
    # The postmaster we own (by PID) is the one holding this data dir and port.
    lock = (pg_server.datadir / "postmaster.pid").read_text().splitlines()
    assert int(lock[0]) == pg_server.pid
    assert int(lock[3]) == pg_server.port
    # The port is really taken on 127.0.0.1.
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", pg_server.port))
    # The unix socket works too.
    with psycopg.connect(
        host=str(pg_server.sockdir), port=pg_server.port, user="postgres", dbname="idem"
    ) as conn:
        assert conn.execute("select inet_server_addr()").fetchone() == (None,)


@pytest.mark.parametrize("round_", [1, 2])
def test_pg_url_database_starts_empty(pg_server: PostgresServer, pg_url: str, round_: int) -> None:
    # Whichever of the two rounds runs second would see the other's table if
    # the database were shared or not dropped.
    assert pg_url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{pg_server.port}/test_")
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            assert sa.inspect(conn).get_table_names() == []
            conn.execute(sa.text("CREATE TABLE leftover (round int)"))
            conn.execute(sa.text("INSERT INTO leftover VALUES (:r)"), {"r": round_})
    finally:
        engine.dispose()
    assert _tables(pg_server, _dbname(pg_url)) == ["leftover"]


def test_databases_are_isolated(pg_server: PostgresServer, pg_url: str) -> None:
    mine = _dbname(pg_url)
    pg_server.execute("CREATE TABLE only_here (x int)", dbname=mine)
    other = f"{mine}_other"
    pg_server.create_database(other)
    try:
        assert _tables(pg_server, mine) == ["only_here"]
        assert _tables(pg_server, other) == []
    finally:
        pg_server.drop_database(other)


def test_drop_database_forces_out_open_sessions(pg_server: PostgresServer) -> None:
    pg_server.create_database("doomed")
    with pg_server.connect("doomed") as conn:
        conn.execute("select 1")
        pg_server.drop_database("doomed")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    assert pg_server.execute("SELECT 1 FROM pg_database WHERE datname = 'doomed'") == []


def test_terminate_backends_kills_only_the_victim(pg_server: PostgresServer, pg_url: str) -> None:
    dbname = _dbname(pg_url)
    with (
        pg_server.connect(dbname, application_name="idem-victim") as victim,
        pg_server.connect(dbname, application_name="idem-bystander") as bystander,
    ):
        assert victim.execute("select 1").fetchone() == (1,)
        killed = pg_server.terminate_backends(application_name="idem-victim")
        assert killed == [victim.info.backend_pid]
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        assert victim.broken
        assert bystander.execute("select 1").fetchone() == (1,)

        killed = pg_server.terminate_backends(pid=bystander.info.backend_pid)
        assert killed == [bystander.info.backend_pid]
        with pytest.raises(psycopg.OperationalError):
            bystander.execute("select 1")
    assert pg_server.terminate_backends(application_name="idem-victim") == []
    with pytest.raises(ValueError):
        pg_server.terminate_backends()


@pytest.fixture
def taken_port_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Make the servers' first port pick one that is already listened on."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        picks = iter([taken])
        real = _servers.free_port
        monkeypatch.setattr(_servers, "free_port", lambda: next(picks, None) or real())
        yield taken


def test_postgres_server_retries_taken_port_and_cleans_up(taken_port_first: int) -> None:
    with PostgresServer({"fsync": "off"}, dbname="other") as pg:
        assert pg.port != taken_port_first
        assert "Address already in use" in pg.log_path.read_text()
        proc_dir = Path(f"/proc/{pg.pid}")
        tmpdir = pg.tmpdir
        assert pg.execute("SHOW fsync") == [("off",)]
        assert pg.execute("select current_database()", dbname="other") == [("other",)]
    assert not pg.running
    assert not tmpdir.exists()
    if proc_dir.parent.exists():  # Linux: the postmaster is reaped, not even a zombie
        assert not proc_dir.exists()


def test_redis_server_retries_taken_port_and_cleans_up(taken_port_first: int) -> None:
    with RedisServer() as redis:
        assert redis.port != taken_port_first
        assert "Address already in use" in redis.log_path.read_text()
        assert redis.command("PING") == b"+PONG\r\n"
        tmpdir = redis.tmpdir
    assert not redis.running
    assert not tmpdir.exists()


def test_redis_server_answers_on_loopback(redis_server: RedisServer) -> None:
    assert redis_server.command("PING") == b"+PONG\r\n"
    info = redis_server.command("INFO", "server").decode()
    assert f"process_id:{redis_server.pid}\r\n" in info
    assert f"tcp_port:{redis_server.port}\r\n" in info
    assert (
        redis_server.command("CONFIG", "GET", "bind") == b"*2\r\n$4\r\nbind\r\n$9\r\n127.0.0.1\r\n"
    )
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_redis_restart_keeps_the_port_and_drops_the_data() -> None:
    """restart() (clean or SIGKILL) brings a new process up on the same port, bind checked."""
    with RedisServer() as server:
        port, pid = server.port, server.pid
        assert server.command("SET", "k", "v") == b"+OK\r\n"
        server.restart(kill=True)
        assert (server.port, server.running) == (port, True) and server.pid != pid
        assert server.command("GET", "k") == b"$-1\r\n"
        server.restart()
        assert server.command("PING") == b"+PONG\r\n"
