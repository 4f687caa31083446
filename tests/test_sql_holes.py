"""Regression tests for the SQL store's holes of issue 9, on the real servers.

* **store time** (rule STORE TIME, hole 8): on PostgreSQL a store without an injected
  clock decides lease liveness, takeovers, renewal deadlines, ``created_at`` /
  ``expires_at``, the transactional path's expiry check and the purge on the database's
  clock. A worker whose own clock runs ahead is simulated by moving ``time.time`` forward
  (whatever the library reads of the worker's clock is then wrong); every time the store
  returns is checked against the database's clock read before and after the call
  (an ordering, not a timing threshold). SQLite keeps the local clock.
* **a duplicate lease claim writes nothing** on PostgreSQL: no transaction id is assigned
  (the next transaction id, ``pg_snapshot_xmax(pg_current_snapshot())``, does not move)
  and the row is not locked (its ``xmax`` does not change); a takeover reports
  ``taken_over``;
* **an infinite ttl** works on every path (both databases, fast path and plain,
  optimistic and pessimistic);
* **a table name that needs quoting** (mixed case, a hyphen; a schema on PostgreSQL);
* **waits are bounded on the caller's own transaction** (`SqlStore.join`), without
  changing the caller's own ``lock_timeout``;
* **the fast paths run the Core statements' SQL** (one source for the SQL text).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from _servers import PostgresServer

from idempotent import (
    AlreadyInProgress,
    Claimed,
    Completed,
    InProgress,
    SqlStore,
    State,
    idempotent,
)

INF = float("inf")


# -- helpers ------------------------------------------------------------------------------
def _dbname(url: str) -> str:
    name = sa.make_url(url).database
    assert name
    return name


class PgClock:
    """Reads the PostgreSQL server's clock on a connection of its own (autocommit, so
    reading it assigns no transaction id)."""

    def __init__(self, server: PostgresServer, url: str) -> None:
        self.conn = server.connect(_dbname(url))

    def __call__(self) -> float:
        row = self.conn.execute(
            "SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert row is not None
        return float(row[0])

    def scalar(self, query: str, *params: Any) -> Any:
        row = self.conn.execute(query, params or None).fetchone()
        assert row is not None
        return row[0]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def pg_clock(pg_server: PostgresServer, pg_url: str) -> Iterator[PgClock]:
    clock = PgClock(pg_server, pg_url)
    yield clock
    clock.close()


@pytest.fixture
def stores() -> Iterator[list[SqlStore]]:
    """Stores a test makes; their engines are disposed at the end."""
    made: list[SqlStore] = []
    yield made
    for s in made:
        s.engine.dispose()


def _store(made: list[SqlStore], url: str, **options: Any) -> SqlStore:
    s = SqlStore(url, **options)
    made.append(s)
    return s


@pytest.fixture
def worker_clock_ahead(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``ahead(seconds)``: from now on the worker's clock (``time.time``) runs ahead."""
    real = time.time

    def ahead(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    return ahead


# -- 1. store time on PostgreSQL ---------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize(("lease", "skew", "elapsed"), [(30.0, 60.0, 0.0), (6.0, 5.0, 1.5)],
                         ids=["lease30-ahead60", "lease6-ahead5"])
def test_a_worker_whose_clock_runs_ahead_does_not_take_over_a_live_lease(
    pg_url: str, pg_clock: PgClock, stores: list[SqlStore], worker_clock_ahead: Any,
    lease: float, skew: float, elapsed: float,
) -> None:
    """The holder claimed ``elapsed`` seconds ago (its record is moved back that far on
    the database, rather than sleeping): its lease is live on the database's clock."""
    holder = _store(stores, pg_url)
    holder.create_schema()
    claimed = holder.claim("ns", "k", fingerprint=None, lease=lease)
    assert isinstance(claimed, Claimed)
    pg_clock.conn.execute(
        "UPDATE idempotency_records SET lease_until = lease_until - %s,"
        " created_at = created_at - %s, expires_at = expires_at - %s",
        [elapsed, elapsed, elapsed])
    first = holder.get("ns", "k")
    assert first is not None and first.lease_until is not None
    assert first.lease_until > pg_clock()  # live, on the database's clock

    worker_clock_ahead(skew)
    other = _store(stores, pg_url)
    before = pg_clock()
    got = other.claim("ns", "k", fingerprint=None, lease=lease)
    after = pg_clock()
    print(f"lease {lease}s, worker clock {skew}s ahead: {type(got).__name__}")
    assert isinstance(got, InProgress), f"took over a live lease: {got}"
    assert got.record.token == first.token and got.record.lease_until == first.lease_until
    assert before <= got.now <= after  # the store's now is the database's
    assert other.release("ns", "k", claimed.token) is True  # still the holder's key


@pytest.mark.postgres
def test_lease_times_are_the_databases(
    pg_url: str, pg_clock: PgClock, stores: list[SqlStore], worker_clock_ahead: Any
) -> None:
    """Claim, renew and complete put the database's time in the record, whatever the
    worker's clock says; a claim's lease_until comes back from the database."""
    store = _store(stores, pg_url)
    store.create_schema()
    worker_clock_ahead(3600.0)
    before = pg_clock()
    got = store.claim("ns", "k", fingerprint="f" * 64, lease=30, ttl=100)
    after = pg_clock()
    assert isinstance(got, Claimed)
    assert before + 30 <= got.lease_until <= after + 30, (before, got.lease_until, after)
    rec = store.get("ns", "k")
    assert rec is not None and rec.lease_until == got.lease_until
    assert before <= rec.created_at <= after and rec.expires_at == rec.created_at + 100

    before = pg_clock()
    until = store.renew("ns", "k", got.token, 20)
    after = pg_clock()
    assert before + 20 <= until <= after + 20
    rec = store.get("ns", "k")
    assert rec is not None and rec.lease_until == until

    before = pg_clock()
    store.complete("ns", "k", got.token, b"1", ttl=50)
    after = pg_clock()
    rec = store.get("ns", "k")
    assert rec is not None and rec.completed_at is not None
    assert before <= rec.completed_at <= after and rec.expires_at == rec.completed_at + 50


@pytest.mark.postgres
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("optimistic", [True, False], ids=["optimistic", "pessimistic"])
def test_transactional_expiry_is_decided_on_the_databases_clock(
    pg_url: str, pg_clock: PgClock, stores: list[SqlStore], worker_clock_ahead: Any,
    fast_path: bool, optimistic: bool,
) -> None:
    """A record with 30 s left on the database's clock is live for a worker whose clock
    runs 60 s ahead: it replays instead of running again; a new record's times are the
    database's."""
    seed = _store(stores, pg_url, fast_path=fast_path)
    seed.create_schema()
    with seed.transaction("ns", "live", None, 30, optimistic=optimistic) as tx:
        assert tx.existing is None
        assert tx.commit(b'"first"') is None

    worker_clock_ahead(60.0)
    store = _store(stores, pg_url, fast_path=fast_path)
    with store.transaction("ns", "live", None, 30, optimistic=optimistic) as tx:
        print(f"existing: {tx.existing}")
        assert tx.existing is not None, "a live record was treated as expired"
        assert tx.existing.result == b'"first"'

    before = pg_clock()
    with store.transaction("ns", "new", None, 100, optimistic=optimistic) as tx:
        assert tx.existing is None
        assert tx.commit(b'"new"') is None
    after = pg_clock()
    rec = store.get("ns", "new")
    assert rec is not None and before <= rec.created_at <= after
    assert rec.expires_at == rec.created_at + 100


@pytest.mark.postgres
def test_the_primitives_decide_expiry_on_the_databases_clock(
    pg_url: str, stores: list[SqlStore], worker_clock_ahead: Any
) -> None:
    seed = _store(stores, pg_url)
    seed.create_schema()
    with seed.engine.begin() as conn:
        assert seed.record(conn, "ns", "one", ttl=30) is True
        assert seed.record_many(conn, "ns", ["m1", "m2"], ttl=30) == {"m1", "m2"}
    worker_clock_ahead(60.0)
    store = _store(stores, pg_url)
    with store.engine.begin() as conn:
        assert store.record(conn, "ns", "one", ttl=30) is False
        assert store.record_many(conn, "ns", ["m1", "m2", "m3"], ttl=30) == {"m3"}


@pytest.mark.postgres
def test_a_purge_by_a_worker_whose_clock_runs_ahead_keeps_a_live_lease(
    pg_url: str, stores: list[SqlStore], worker_clock_ahead: Any
) -> None:
    """Rule PURGEABLE on the store's time: a 30 s lease is live for the database, so a
    purge run where the clock is a minute ahead must not delete it."""
    holder = _store(stores, pg_url)
    holder.create_schema()
    got = holder.claim("ns", "k", fingerprint=None, lease=30, ttl=40)
    assert isinstance(got, Claimed)
    worker_clock_ahead(60.0)
    purger = _store(stores, pg_url)
    deleted = purger.purge()
    print(f"deleted: {deleted}")
    assert deleted == 0
    rec = holder.get("ns", "k")
    assert rec is not None and rec.token == got.token


def test_sqlite_keeps_the_local_clock(
    sqlite_url: str, stores: list[SqlStore], worker_clock_ahead: Any
) -> None:
    """SQLite is embedded (one host): its time is the local clock."""
    store = _store(stores, sqlite_url)
    store.create_schema()
    worker_clock_ahead(1000.0)
    before = time.time()
    got = store.claim("ns", "k", fingerprint=None, lease=30)
    after = time.time()
    assert isinstance(got, Claimed) and before + 30 <= got.lease_until <= after + 30


# -- 2. a duplicate lease claim writes nothing; takeovers say so ------------------------------
def _row_xmax(clock: PgClock, key: str) -> str:
    return str(clock.scalar("SELECT xmax::text FROM idempotency_records WHERE key = %s", key))


def _next_xid(clock: PgClock) -> int:
    """The first transaction id not yet completed: it moves with every transaction that
    wrote anything (a row, a row lock), and with nothing else."""
    return int(clock.scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


@pytest.mark.postgres
@pytest.mark.parametrize("held", ["completed", "in_progress"])
def test_duplicate_lease_claims_write_nothing(
    pg_url: str, pg_clock: PgClock, stores: list[SqlStore], held: str
) -> None:
    store = _store(stores, pg_url)
    store.create_schema()
    first = store.claim("ns", "k", fingerprint=None, lease=30)
    assert isinstance(first, Claimed)
    if held == "completed":
        store.complete("ns", "k", first.token, b'"done"')
    xmax, xid, lsn = _row_xmax(pg_clock, "k"), _next_xid(pg_clock), pg_clock.scalar(
        "SELECT pg_current_wal_insert_lsn()::text")

    outcomes = {type(store.claim("ns", "k", fingerprint=None, lease=30)).__name__
                for _ in range(20)}

    assert outcomes == {"Completed" if held == "completed" else "InProgress"}
    moved = _next_xid(pg_clock) - xid
    wal = pg_clock.scalar("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", lsn)
    print(f"{held}: 20 duplicate claims; transaction ids assigned: {moved}; row xmax "
          f"{xmax} -> {_row_xmax(pg_clock, 'k')}; WAL bytes meanwhile (any process): {wal}")
    assert moved == 0, f"20 duplicate claims assigned {moved} transaction ids"
    assert _row_xmax(pg_clock, "k") == xmax, "a duplicate claim locked the row"
    # the instrument sees writes: a new key's claim does assign one
    assert isinstance(store.claim("ns", "k2", fingerprint=None), Claimed)
    assert _next_xid(pg_clock) - xid == 1


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def test_takeovers_report_taken_over(sql_url: str, stores: list[SqlStore]) -> None:
    """Only a claim that took another worker's run-out lease says ``taken_over``: not a
    new key, not an expired record, not a live lease (InProgress)."""
    clock = Clock()
    store = _store(stores, sql_url, clock=clock)
    store.create_schema()
    first = store.claim("ns", "k", fingerprint=None, lease=10, ttl=100)
    assert isinstance(first, Claimed) and first.taken_over is False
    assert isinstance(store.claim("ns", "k", fingerprint=None, lease=10), InProgress)
    clock.now += 10.5
    second = store.claim("ns", "k", fingerprint=None, lease=10, ttl=100)
    print(f"takeover: {second}")
    assert isinstance(second, Claimed) and second.token != first.token
    assert second.taken_over is True
    assert second.lease_until == clock.now + 10
    store.complete("ns", "k", second.token, b"1", ttl=5)
    clock.now += 6  # the completed record expired: a fresh claim, not a takeover
    third = store.claim("ns", "k", fingerprint=None, lease=10)
    assert isinstance(third, Claimed) and third.taken_over is False


@pytest.mark.postgres
def test_a_takeover_on_the_databases_clock(
    pg_url: str, pg_clock: PgClock, stores: list[SqlStore]
) -> None:
    """No injected clock: the lease ran out on the database's clock (moved back there)."""
    store = _store(stores, pg_url)
    store.create_schema()
    first = store.claim("ns", "k", fingerprint=None, lease=30)
    assert isinstance(first, Claimed)
    pg_clock.conn.execute("UPDATE idempotency_records SET lease_until = lease_until - 31")
    before = pg_clock()
    second = store.claim("ns", "k", fingerprint=None, lease=30)
    after = pg_clock()
    assert isinstance(second, Claimed) and second.taken_over is True
    assert before + 30 <= second.lease_until <= after + 30


@pytest.mark.parametrize("race", ["new-key", "takeover"])
def test_concurrent_claims_of_one_key_have_one_winner(
    sql_url: str, stores: list[SqlStore], race: str
) -> None:
    """Four threads (four connections) claim one key at once, ten times: a new key, or
    a lease that ran out. Exactly one gets it; the others see its live lease."""
    clock = Clock()
    store = _store(stores, sql_url, clock=clock)
    store.create_schema()
    for round_ in range(10):
        key = f"k{round_}"
        if race == "takeover":
            assert isinstance(store.claim("ns", key, fingerprint=None, lease=10), Claimed)
            clock.now += 11
        barrier = threading.Barrier(4)
        got: list[Any] = []

        def take(key: str = key, barrier: threading.Barrier = barrier,
                 got: list[Any] = got) -> None:
            barrier.wait(10)
            got.append(store.claim("ns", key, fingerprint=None, lease=10))

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 4
        winners = [g for g in got if isinstance(g, Claimed)]
        assert len(winners) == 1, got
        assert winners[0].taken_over is (race == "takeover")
        assert all(isinstance(g, InProgress) and g.record.token == winners[0].token
                   for g in got if g is not winners[0])


# -- 3. an infinite ttl -----------------------------------------------------------------------
@pytest.fixture(params=["sqlite-fast", "sqlite-plain", "pg-fast", "pg-plain"])
def any_path_store(request: pytest.FixtureRequest, stores: list[SqlStore]) -> SqlStore:
    db, path = request.param.split("-")
    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    store = _store(stores, url, fast_path=path == "fast")
    assert (store._fast_sqlite or store._fast_pg) is (path == "fast")
    store.create_schema()
    return store


@pytest.mark.parametrize("optimistic", [True, False], ids=["optimistic", "pessimistic"])
def test_an_infinite_ttl_works_in_transactions(any_path_store: SqlStore,
                                               optimistic: bool) -> None:
    store = any_path_store
    store.record_many(store.engine.connect(), "ns", [], ttl=INF)
    with store.engine.begin() as conn:  # an expired record: the new one replaces it
        assert store.record_many(conn, "ns", ["old"], ttl=-1) == {"old"}
    for key in ("new", "old"):
        with store.transaction("ns", key, "f" * 64, INF, optimistic=optimistic) as tx:
            assert tx.existing is None
            assert tx.commit(b'"r"') is None
        rec = store.get("ns", key)
        assert rec is not None and rec.expires_at == INF and rec.result == b'"r"'
        with store.transaction("ns", key, "f" * 64, INF, optimistic=optimistic) as tx:
            assert tx.existing is not None and tx.existing.expires_at == INF
    assert store.purge(older_than=None) == 0


def test_an_infinite_ttl_works_in_lease_mode_and_the_primitives(any_path_store: SqlStore
                                                                ) -> None:
    store = any_path_store
    got = store.claim("ns", "lease", fingerprint=None, ttl=INF)
    assert isinstance(got, Claimed)
    store.complete("ns", "lease", got.token, b"1", ttl=INF)
    again = store.claim("ns", "lease", fingerprint=None, ttl=INF)
    assert isinstance(again, Completed) and again.record.expires_at == INF
    with store.engine.begin() as conn:
        assert store.record(conn, "ns", "one", ttl=INF) is True
        assert store.record_many(conn, "ns", ["m1", "m2"], ttl=INF) == {"m1", "m2"}
    with store.engine.begin() as conn:
        assert store.record(conn, "ns", "one", ttl=INF) is False
        assert store.record_many(conn, "ns", ["m1", "m2"], ttl=INF) == set()
    assert store.purge() == 0


# -- 4. table names that need quoting -----------------------------------------------------------
@pytest.fixture(params=["sqlite-IdemRecords", "sqlite-idem-records", "pg-IdemRecords",
                        "pg-idem-records", "pg-schema"])
def quoted_store(request: pytest.FixtureRequest, stores: list[SqlStore]) -> SqlStore:
    db, _, table = request.param.partition("-")
    schema = None
    if db == "pg":
        url = request.getfixturevalue("pg_url")
        if table == "schema":
            table, schema = "IdemRecords", "Idem Schema"
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                conn.exec_driver_sql('CREATE SCHEMA "Idem Schema"')
            engine.dispose()
    else:
        url = request.getfixturevalue("sqlite_url")
    store = _store(stores, url, table=table, schema=schema)
    store.create_schema()
    return store


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
def test_a_table_name_that_needs_quoting(quoted_store: SqlStore, fast_path: bool,
                                         stores: list[SqlStore]) -> None:
    store = quoted_store
    if not fast_path:
        store = _store(stores, store.engine.url.render_as_string(hide_password=False),
                       table=store.table.name, schema=store.table.schema, fast_path=False)
    with store.engine.begin() as conn:
        assert store.record(conn, "ns", "r1") is True
        assert store.record_many(conn, "ns", ["m1", "m2", "r1"]) == {"m1", "m2"}
    with store.engine.begin() as conn:
        assert store.record(conn, "ns", "r1") is False
        assert store.record_many(conn, "ns", ["m1", "m3"]) == {"m3"}
    for optimistic in (True, False):
        key = f"tx-{optimistic}"
        with store.engine.begin() as conn:  # an expired record first: it is replaced
            assert store.record_many(conn, "ns", [key], ttl=-1) == {key}
        with store.transaction("ns", key, None, optimistic=optimistic) as tx:
            assert tx.existing is None
            assert tx.commit(b'"r"') is None
        with store.transaction("ns", key, None, optimistic=optimistic) as tx:
            assert tx.existing is not None and tx.existing.result == b'"r"'
    got = store.claim("ns", "lease", fingerprint=None)
    assert isinstance(got, Claimed)
    assert isinstance(store.claim("ns", "lease", fingerprint=None), InProgress)
    assert store.renew("ns", "lease", got.token, 10) > 0
    store.complete("ns", "lease", got.token, b"1")
    assert isinstance(store.claim("ns", "lease", fingerprint=None), Completed)
    # r1 m1 m2 m3 tx-True tx-False lease
    assert {(c.state, c.count) for c in store.stats("ns").counts} == {(State.COMPLETED, 7)}
    assert store.purge(older_than=0) == 7


# -- 5. waits are bounded in the caller's own transaction -----------------------------------------
@pytest.fixture
def pg_store(pg_url: str, stores: list[SqlStore]) -> SqlStore:
    store = _store(stores, pg_url, lock_timeout=0.5)
    store.create_schema()
    return store


def _show_lock_timeout(conn: sa.Connection) -> str:
    return str(conn.exec_driver_sql("SHOW lock_timeout").scalar_one())


@pytest.mark.postgres
@pytest.mark.parametrize("via", ["join", "record", "decorator"])
def test_a_held_key_in_the_callers_transaction_gives_up_after_lock_timeout(
    pg_store: SqlStore, via: str
) -> None:
    """Connection A holds the key uncommitted; connection B, in its own transaction with
    no lock_timeout of its own, claims it: B gives up after the store's lock_timeout with
    AlreadyInProgress instead of waiting for A. (B's statement_timeout of 20 s is only a
    guard against hanging the suite.)"""
    store = pg_store
    with store.engine.connect() as a, store.engine.connect() as b:
        a.begin()
        assert store.record(a, "ns", "held") is True  # uncommitted: A holds the key
        b.begin()
        b.exec_driver_sql("SET LOCAL statement_timeout = '20s'")
        assert _show_lock_timeout(b) == "0"
        started = time.monotonic()
        with pytest.raises(AlreadyInProgress) as caught:
            if via == "join":
                store.join(b, "ns", "held", None)
            elif via == "record":
                store.record(b, "ns", "held")
            else:
                @idempotent(store, key="id", namespace="ns", retry=None)
                def handler(msg: dict[str, Any], *, connection: sa.Connection) -> int:
                    return 1

                handler({"id": "held"}, connection=b)
        waited = time.monotonic() - started
        print(f"{via}: gave up after {waited:.2f}s with {caught.value!r}")
        assert caught.value.key == "held"
        b.rollback()
        a.rollback()  # A gives the key up: B may now record it
        b.begin()
        assert store.record(b, "ns", "held") is True
        b.commit()


@pytest.mark.postgres
@pytest.mark.parametrize("scope", ["local", "session"])
def test_joining_keeps_the_callers_lock_timeout(pg_store: SqlStore, scope: str) -> None:
    """The bound is for the claim only: before and after it the caller's transaction has
    its own lock_timeout, for a new key, a duplicate and an expired record alike."""
    store = pg_store
    with store.engine.connect() as conn:
        if scope == "session":
            conn.exec_driver_sql("SET lock_timeout = '3s'")
            conn.commit()
        conn.begin()
        if scope == "local":
            conn.exec_driver_sql("SET LOCAL lock_timeout = '42s'")
        own = _show_lock_timeout(conn)
        assert own == ("42s" if scope == "local" else "3s")
        assert store.record_many(conn, "ns", ["expired"], ttl=-1) == {"expired"}
        assert _show_lock_timeout(conn) == own
        assert store.record(conn, "ns", "new") is True
        assert _show_lock_timeout(conn) == own
        assert store.record(conn, "ns", "new") is False
        assert _show_lock_timeout(conn) == own
        assert store.record(conn, "ns", "expired") is True
        assert _show_lock_timeout(conn) == own
        conn.commit()
        assert _show_lock_timeout(conn) == ("0" if scope == "local" else "3s")


# -- 6. one source for the SQL text ------------------------------------------------------------
@pytest.mark.postgres
def test_the_postgresql_fast_path_prepares_the_core_statements(pg_store: SqlStore) -> None:
    from sqlalchemy.dialects import postgresql

    store = pg_store
    assert store._fast_pg
    with store.transaction("ns", "k", None, optimistic=True) as tx:
        tx.commit(b"1")
    with store.engine.connect() as conn:
        prepared = dict(conn.execute(sa.text(
            "SELECT name, statement FROM pg_prepared_statements WHERE name LIKE 'idem_%'")
        ).all())
    dialect = postgresql.dialect(paramstyle="numeric_dollar")
    core = {"claim": store._st.claim_tx, "read": store._st.read, "done": store._st.insert_done}
    assert len(prepared) == len(core)
    for what, stmt in core.items():
        # the statement column holds the whole query string that carried the PREPARE
        (name,) = [n for n in prepared if n.startswith(f"idem_{what}_")]
        sql = str(stmt.compile(dialect=dialect)).strip()
        assert re.search(rf"PREPARE {name} \([^)]*\) AS {re.escape(sql)};", prepared[name]), (
            what, sql, prepared[name])


def test_the_sqlite_fast_path_runs_the_core_statements(sqlite_url: str,
                                                       stores: list[SqlStore]) -> None:
    from sqlalchemy.dialects import sqlite

    store = _store(stores, sqlite_url)
    seen: list[str] = []
    sa.event.listen(store.engine, "connect",
                    lambda dbapi_conn, _rec: dbapi_conn.set_trace_callback(seen.append))
    store.create_schema()
    assert store._fast_sqlite
    with store.transaction("ns", "k", None, optimistic=True) as tx:
        assert tx.existing is None
        tx.commit(b"1")
    dialect = sqlite.dialect(paramstyle="qmark")
    for stmt in (store._st.read, store._st.insert_done):
        sql = str(stmt.compile(dialect=dialect))
        pattern = re.compile(".+?".join(re.escape(part) for part in sql.split("?")) + "$",
                             re.DOTALL)
        assert any(pattern.match(s) for s in seen), (sql, seen)
