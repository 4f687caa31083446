"""Integration tests on the private PostgreSQL server the suite starts: concurrent worker
processes, a worker SIGKILLed inside its transaction, a backend terminated mid-transaction,
a database that is down, bad input, the caller's own transaction, the record/record_many
primitives, TTL. The bodies shared with SQLite live in ``_payments.py``.

The stores here take the psycopg fast path (`PgFastPath`) for the decorator's own
transactions; ``connection=``/``session=`` passed by the caller and the primitives take
the portable SQLAlchemy path."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _servers import PostgresServer, free_port

from idempotent import SqlStore, State, StoreUnavailable
from idempotent.retry import transient_retry

if "_payments" not in sys.modules:  # rewrite the asserts of the shared test bodies
    pytest.register_assert_rewrite("_payments")
import _payments
from _payments import NS, Db, first_result, make_handler, wait_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def db(pg_url: str) -> Iterator[Db]:
    yield from Db.opened(pg_url)


def _dbname(db: Db) -> str:
    name = sa.make_url(db.url).database
    assert name
    return name


@contextmanager
def lock_waits_sampled(pg_server: PostgresServer, dbname: str) -> Iterator[list[int]]:
    """Sample, every 20 ms, whether some transaction waits for another's uncommitted key
    (a transactionid lock: only a concurrent claim of the same key waits on one here).
    Yields [samples, samples that saw a waiter]."""
    seen = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        with pg_server.connect(dbname) as conn:
            while not stop.wait(0.02):
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND locktype = 'transactionid'").fetchone()
                seen[0] += 1
                seen[1] += bool(waiting and waiting[0])

    sampler = threading.Thread(target=sample, name="lock-wait-sampler", daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join(10)


@pytest.mark.slow
@pytest.mark.parametrize("optimistic", [True, False], ids=["optimistic", "pessimistic"])
def test_concurrent_duplicate_deliveries_apply_each_payment_once(
    db: Db, tmp_path: Path, pg_server: PostgresServer, optimistic: bool
) -> None:
    assert SqlStore(db.engine)._fast_pg  # the workers' stores take the psycopg fast path
    with lock_waits_sampled(pg_server, _dbname(db)) as seen:
        run = _payments.check_concurrent_deliveries(db, tmp_path, workers=8, payments=2000,
                                                    seed=11, optimistic=optimistic)
    print(f"postgresql: {run}; lock waits seen in {seen[1]} of {seen[0]} samples")
    # the run did exercise the hard case: concurrent duplicates of one payment
    if optimistic:  # both ran; the later one was rolled back at the key
        assert run.handler_runs > 2000, "no concurrent duplicate ever raced"
    else:  # the later one blocked on the uncommitted claim
        assert seen[1] > 0, "no delivery was ever seen waiting for a concurrent duplicate"


def test_duplicates_keep_the_fast_path_prepared(db: Db) -> None:
    """Found by the concurrency test: once psycopg has auto-prepared a handler statement
    (prepare_threshold=5), a ROLLBACK sent through psycopg makes it DEALLOCATE ALL, which
    also dropped the fast path's prepared claim. A duplicate now ends its transaction
    through libpq, so the claim stays prepared, and new deliveries keep working."""
    engine = sa.create_engine(db.url, pool_size=1, max_overflow=0)  # one connection
    db.engines.append(engine)
    store = SqlStore(engine)
    handler = make_handler(store, by="h")
    for i in range(10):  # the ledger INSERT runs 10 times: psycopg prepares it
        handler({"payment_id": f"pay-{i}", "cents": i})
    assert handler({"payment_id": "pay-0", "cents": 0}) == first_result(
        {"payment_id": "pay-0", "cents": 0}, "h")  # a duplicate: rolled back
    with engine.connect() as conn:
        left = conn.execute(sa.text(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'idem_claim_%'"))
        assert left.scalar_one() == 1
    msg = {"payment_id": "pay-new", "cents": 100}
    assert handler(msg) == first_result(msg, "h")
    assert handler(msg) == first_result(msg, "h")
    assert db.ledger_totals() == (11, sum(range(10)) + 100)
    assert handler.calls == [f"pay-{i}" for i in range(10)] + ["pay-new"]


def test_worker_killed_inside_transaction_leaves_nothing(db: Db, pg_server: PostgresServer) -> None:
    app = "idem-patient-waiter"

    def blocked() -> bool:
        rows = pg_server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'", [app], dbname=_dbname(db))
        return bool(rows[0][0] == 1)

    _payments.check_crash_inside_transaction(
        db,
        waiter_store=lambda: db.store(lock_timeout=30,
                                      connect_args={"application_name": app}),
        wait_until_blocked=lambda: wait_for(blocked, 30, "the waiter to block on the key"),
    )


def test_worker_killed_inside_an_optimistic_transaction_leaves_nothing(db: Db) -> None:
    _payments.check_crash_inside_transaction(db, optimistic=True)


def test_delivery_of_a_held_key_gives_up_with_already_in_progress(db: Db) -> None:
    _payments.check_held_key_gives_up(db)


@pytest.mark.parametrize("fails_at", ["next statement", "commit"])
def test_backend_terminated_mid_transaction_is_retried_once(
    db: Db, pg_server: PostgresServer, fails_at: str
) -> None:
    app = "idem-lost-connection"
    engine = sa.create_engine(db.url, pool_pre_ping=False,
                              connect_args={"application_name": app})
    db.engines.append(engine)
    store = SqlStore(engine)
    msg = {"payment_id": "pay-lost", "cents": 777}
    written, release = threading.Event(), threading.Event()
    backends: list[int] = []

    def after_write(_msg: dict[str, Any], conn: Any) -> None:
        backends.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        if len(backends) > 1:
            return  # the retry: run straight through
        written.set()
        assert release.wait(30), "the test never released the handler"
        if fails_at == "next statement":
            conn.execute(sa.text("SELECT 1"))  # on a terminated backend

    handler = make_handler(store, by="lost", after_write=after_write)
    with ThreadPoolExecutor(1) as pool:
        try:
            call = pool.submit(handler, msg)
            assert written.wait(30), "the handler never wrote"
            killed = pg_server.terminate_backends(application_name=app)
            assert killed == [backends[0]]
        finally:
            release.set()
        result = call.result(timeout=60)

    assert result == first_result(msg, "lost")  # returned normally
    assert handler.calls == ["pay-lost", "pay-lost"]  # re-run once, by the retry policy...
    assert len(backends) == 2 and backends[1] != backends[0]  # ...on a new connection
    assert db.ledger() == [("pay-lost", 777, "lost")]  # applied once
    record = store.get(NS, "pay-lost")
    assert record is not None and record.state is State.COMPLETED
    assert record.result is not None and json.loads(record.result) == result
    again = make_handler(store, by="again")
    assert again(msg) == result and again.calls == []


def test_database_down_raises_store_unavailable_with_the_cause(db: Db) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{_dbname(db)}"
    store = SqlStore(url)
    db.engines.append(store.engine)
    connects: list[int] = []
    sa.event.listen(store.engine, "do_connect", lambda *a: connects.append(1))
    handler = make_handler(store, by="h",
                           retry=transient_retry(attempts=3, initial=0.01, max_wait=0.02))

    with pytest.raises(StoreUnavailable) as caught:
        handler({"payment_id": "pay-1", "cents": 100})

    exc = caught.value
    assert exc.key == "pay-1" and exc.namespace == NS
    assert exc.__cause__ is exc.cause
    assert isinstance(exc.cause, sa.exc.OperationalError)
    assert isinstance(exc.cause.orig, psycopg.OperationalError)
    assert "refused" in str(exc.cause.orig).lower()
    assert len(connects) == 3  # the policy's three attempts
    assert handler.calls == []  # the handler never ran
    assert db.ledger() == [] and db.records() == []
