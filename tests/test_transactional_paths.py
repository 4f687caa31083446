"""Transactional mode on both PostgreSQL paths (the libpq fast path and plain SQLAlchemy)
and on SQLite: replay, conflict, rollback, a held key, isolation levels."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from idempotent import (
    AlreadyInProgress,
    IdempotencyKeyConflict,
    SqlStore,
    StoreUnavailable,
    TransactionEnded,
    idempotent,
)

md = sa.MetaData()
ledger = sa.Table(
    "ledger", md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("cents", sa.Integer, nullable=False),
)


@pytest.fixture(params=["pg-fast", "pg-plain", "sqlite-fast", "sqlite-plain"])
def store(request: pytest.FixtureRequest) -> Iterator[SqlStore]:
    """A SqlStore with a ledger table, on each transactional path."""
    if request.param.startswith("sqlite"):
        s = SqlStore(request.getfixturevalue("sqlite_url"), lock_timeout=0.5,
                     fast_path=request.param == "sqlite-fast")
        assert s._fast_sqlite is (request.param == "sqlite-fast")
    else:
        s = SqlStore(request.getfixturevalue("pg_url"), lock_timeout=0.5,
                     fast_path=request.param == "pg-fast")
        assert s._fast_pg is (request.param == "pg-fast")
    s.create_schema()
    md.create_all(s.engine)
    yield s
    s.engine.dispose()


def ledger_totals(store: SqlStore) -> tuple[int, int]:
    with store.engine.connect() as c:
        n, total = c.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.cents), 0))
        ).one()
    return int(n), int(total)


def payer(store: SqlStore, **options: Any) -> Any:
    @idempotent(store, key="payment_id", namespace="pay", **options)
    def pay(msg: dict[str, Any], *, connection: sa.Connection) -> dict[str, Any]:
        connection.execute(ledger.insert().values(payment_id=msg["payment_id"],
                                                  cents=msg["cents"]))
        if msg.get("explode"):
            raise RuntimeError("after the write, before commit")
        return {"applied": msg["payment_id"], "cents": msg["cents"]}

    return pay


def test_first_result_is_replayed_and_written_once(store: SqlStore) -> None:
    """Three deliveries, one ledger row, three equal results; the record holds the result."""
    pay = payer(store)
    msg = {"payment_id": "p1", "cents": 250}
    assert [pay(msg) for _ in range(3)] == [{"applied": "p1", "cents": 250}] * 3
    assert ledger_totals(store) == (1, 250)
    rec = store.get("pay", "p1")
    assert rec is not None and rec.result == b'{"applied":"p1","cents":250}'


def test_none_result_and_session_handlers(store: SqlStore) -> None:
    """A handler returning None through an ORM Session: recorded, replayed as None."""
    runs: list[int] = []

    @idempotent(store, key="payment_id", namespace="orm")
    def pay(msg: dict[str, Any], *, session: Session) -> None:
        runs.append(1)
        session.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=1))

    assert pay({"payment_id": "n"}) is None
    assert pay({"payment_id": "n"}) is None
    assert runs == [1] and ledger_totals(store) == (1, 1)


def test_error_after_write_rolls_back_everything(store: SqlStore) -> None:
    """An exception after the handler's write leaves no row and no key; the retry applies."""
    pay = payer(store)
    with pytest.raises(RuntimeError):
        pay({"payment_id": "e", "cents": 5, "explode": True})
    assert ledger_totals(store) == (0, 0) and store.get("pay", "e") is None
    pay({"payment_id": "e", "cents": 5})
    assert ledger_totals(store) == (1, 5)


def test_conflict_rolls_back(store: SqlStore) -> None:
    """Same key, other amount: IdempotencyKeyConflict with the key and first record."""
    pay = payer(store)
    pay({"payment_id": "c", "cents": 5})
    with pytest.raises(IdempotencyKeyConflict) as info:
        pay({"payment_id": "c", "cents": 6})
    assert info.value.key == "c" and info.value.record.result is not None
    assert ledger_totals(store) == (1, 5)


def test_a_held_key_waits_then_gives_up_when_pessimistic(store: SqlStore) -> None:
    """While another transaction holds the key uncommitted, a delivery waits lock_timeout,
    then gives up (AlreadyInProgress on PostgreSQL, StoreUnavailable for SQLite's busy
    database); once the holder rolls back, the delivery runs."""
    pay = payer(store, retry=None, optimistic=False)
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    @idempotent(store, key="payment_id", namespace="pay", retry=None, optimistic=False)
    def hold(msg: dict[str, Any], *, connection: sa.Connection) -> None:
        connection.execute(ledger.insert().values(payment_id="h", cents=99))
        holding.set()
        assert release.wait(30)
        raise RuntimeError("the holder crashes")

    def holder() -> None:
        try:
            hold({"payment_id": "h", "cents": 1})
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(30)
    try:
        # PostgreSQL waits on the key's index entry; SQLite on the database write lock,
        # which is not the key's own, so there it is a store that is busy
        expected = AlreadyInProgress if store.dialect == "postgresql" else StoreUnavailable
        with pytest.raises(expected) as info:
            pay({"payment_id": "h", "cents": 1})
        assert info.value.key == "h"
    finally:
        release.set()
        t.join(30)
    assert [type(e) for e in errors] == [RuntimeError]
    assert pay({"payment_id": "h", "cents": 1}) == {"applied": "h", "cents": 1}
    assert ledger_totals(store) == (1, 1)


def test_optimistic_race_the_later_commit_rolls_back(pg_url: str) -> None:
    """Optimistic: while a first delivery sits between its write and its commit, a second
    one runs and commits; the first, resumed, fails on the key at commit, rolls back its
    write and returns the second's result. One ledger row: the winner's."""
    store = SqlStore(pg_url)
    store.create_schema()
    md.create_all(store.engine)
    written, release = threading.Event(), threading.Event()
    outcome: list[Any] = []

    @idempotent(store, key="payment_id", namespace="race")
    def slow(msg: dict[str, Any], *, connection: sa.Connection) -> dict[str, str]:
        connection.execute(ledger.insert().values(payment_id="r", cents=1))
        written.set()
        assert release.wait(30)
        return {"by": "slow"}

    @idempotent(store, key="payment_id", namespace="race")
    def fast(msg: dict[str, Any], *, connection: sa.Connection) -> dict[str, str]:
        connection.execute(ledger.insert().values(payment_id="r", cents=2))
        return {"by": "fast"}

    t = threading.Thread(target=lambda: outcome.append(slow({"payment_id": "r"})))
    t.start()
    try:
        assert written.wait(30)
        assert fast({"payment_id": "r"}) == {"by": "fast"}
    finally:
        release.set()
        t.join(30)
    assert outcome == [{"by": "fast"}]
    assert ledger_totals(store) == (1, 2)
    store.engine.dispose()


def test_caller_transaction_is_not_committed(store: SqlStore) -> None:
    """With the caller's own connection, the decorator never commits: a rollback forgets
    both the ledger row and the key."""
    pay = payer(store)
    with store.engine.connect() as conn, conn.begin() as tx:
        pay({"payment_id": "own", "cents": 3}, connection=conn)
        assert pay({"payment_id": "own", "cents": 3}, connection=conn)["cents"] == 3
        tx.rollback()
    assert ledger_totals(store) == (0, 0) and store.get("pay", "own") is None
    with store.engine.begin() as conn:
        pay({"payment_id": "own", "cents": 3}, connection=conn)
    assert ledger_totals(store) == (1, 3) and store.get("pay", "own") is not None


def test_handler_that_ends_the_transaction_is_refused(store: SqlStore) -> None:
    """A handler that rolls back the decorator's transaction is refused (TransactionEnded),
    nothing recorded."""

    @idempotent(store, key="payment_id", namespace="rude", retry=None)
    def rude(msg: dict[str, Any], *, connection: sa.Connection) -> int:
        connection.execute(ledger.insert().values(payment_id="r", cents=1))
        tx = connection.get_transaction()
        assert tx is not None
        tx.rollback()
        return 1

    with pytest.raises(TransactionEnded, match="tried to end the transaction"):
        rude({"payment_id": "r"})
    assert ledger_totals(store) == (0, 0) and store.get("rude", "r") is None


def test_serializable_engine(request: pytest.FixtureRequest, pg_url: str) -> None:
    """The fast path opens its transaction at the engine's isolation level."""
    engine = sa.create_engine(pg_url, isolation_level="SERIALIZABLE")
    store = SqlStore(engine)
    store.create_schema()

    @idempotent(store, key="k", namespace="iso")
    def level(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        return str(connection.exec_driver_sql("SHOW transaction_isolation").scalar())

    assert level({"k": 1}) == "serializable"
    engine.dispose()


def test_fast_path_survives_psycopg_deallocate_all(pg_url: str) -> None:
    """psycopg sends DEALLOCATE ALL after a DROP on a connection where it prepared
    statements; the claim's own prepared statement is then prepared again, not lost."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    store = SqlStore(engine)
    store.create_schema()
    md.create_all(engine)
    pay = payer(store)
    pay({"payment_id": "before", "cents": 1})  # prepares the claim on the one connection
    with engine.begin() as conn:
        for _ in range(8):  # past psycopg's prepare_threshold: it prepares this one
            conn.exec_driver_sql("SELECT 1").scalar()
        conn.exec_driver_sql("CREATE TABLE scratch (x int)")
        conn.exec_driver_sql("DROP TABLE scratch")  # → psycopg: DEALLOCATE ALL
        conn.exec_driver_sql("SELECT 1").scalar()
    with engine.connect() as conn:  # the premise: our statement was deallocated
        left = conn.execute(sa.text(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'idem_claim_%'"))
        assert left.scalar() == 0
    assert pay({"payment_id": "after", "cents": 2}) == {"applied": "after", "cents": 2}
    assert pay({"payment_id": "after", "cents": 2}) == {"applied": "after", "cents": 2}
    assert ledger_totals(store) == (2, 3)
    engine.dispose()


def test_handler_that_makes_psycopg_deallocate_still_commits_once(pg_url: str) -> None:
    """A handler whose savepoint rollback makes psycopg DEALLOCATE ALL (it does once it has
    prepared statements of its own) drops the fast path's prepared insert mid-transaction:
    that attempt is retried, and from then on the store inserts without it. Each payment
    is applied once."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    store = SqlStore(engine)
    store.create_schema()
    md.create_all(engine)
    runs: list[str] = []

    @idempotent(store, key="payment_id", namespace="sp")
    def pay(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        runs.append(msg["payment_id"])
        for _ in range(6):  # past psycopg's prepare_threshold
            connection.exec_driver_sql("SELECT 1").scalar()
        try:
            with connection.begin_nested():  # ROLLBACK TO SAVEPOINT → DEALLOCATE ALL
                connection.exec_driver_sql("SELECT 1/0")
        except sa.exc.DataError:
            pass
        connection.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=1))
        return "ok"

    assert store._pg.done_prepared
    assert pay({"payment_id": "a"}) == "ok"
    assert not store._pg.done_prepared  # it happened, and the store gave up preparing
    assert runs == ["a", "a"]  # the lost attempt, then the one that committed
    assert pay({"payment_id": "b"}) == "ok" and pay({"payment_id": "b"}) == "ok"
    assert runs == ["a", "a", "b"]
    assert ledger_totals(store) == (2, 2)
    engine.dispose()


@pytest.mark.parametrize("fast_path", [True, False], ids=["pg-fast", "pg-plain"])
def test_optimistic_insert_waits_at_most_lock_timeout(pg_url: str, fast_path: bool) -> None:
    """An optimistic delivery whose record insert meets another transaction's uncommitted
    row for the same key waits lock_timeout, then raises AlreadyInProgress: its handler's
    write is rolled back with it."""
    store = SqlStore(pg_url, lock_timeout=0.3, fast_path=fast_path)
    store.create_schema()
    md.create_all(store.engine)
    pay = payer(store, retry=None)  # optimistic
    with store.transaction("pay", "w", None, optimistic=False) as holder:  # holds the key
        assert holder.existing is None
        with pytest.raises(AlreadyInProgress) as info:
            pay({"payment_id": "w", "cents": 4})
        assert info.value.key == "w"
    # the holder rolled back on leaving the block: the delivery now goes through
    assert ledger_totals(store) == (0, 0)
    assert pay({"payment_id": "w", "cents": 4}) == {"applied": "w", "cents": 4}
    assert ledger_totals(store) == (1, 4)
    store.engine.dispose()


def test_lease_options_are_refused_in_transactional_mode(sqlite_url: str) -> None:
    """lease= and keep_failures= mean nothing to a transactional handler: refused at once."""
    store = SqlStore(sqlite_url)
    for options in ({"lease": 10.0}, {"keep_failures": (ValueError,)}):
        with pytest.raises(TypeError, match="lease mode"):

            @idempotent(store, key="k", **options)  # type: ignore[arg-type]
            def h(msg: dict[str, Any], *, connection: sa.Connection) -> None: ...
    store.engine.dispose()
