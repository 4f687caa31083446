"""Regression tests for what an adversarial review of the new core found (each failed at
1462e44-e18f2c6 and passes now): a handler that ends its own transaction, a retry policy
whose error callback hid a failure, a heartbeat stopped before a slow complete, a
serializer's other errors, async retry predicates, GreenletExit from a handler, and
SQLAlchemy's SQLite SAVEPOINT recipe on the caller-owned path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import tenacity
from sqlalchemy.orm import Session

from idempotent import (
    MemoryStore,
    ResultNotStored,
    SqlStore,
    StoreUnavailable,
    TransactionEnded,
    idempotent,
)
from idempotent.retry import is_transient

meta = sa.MetaData()
ledger = sa.Table("ledger", meta, sa.Column("pid", sa.String(64), nullable=False))


@pytest.fixture
def store(sql_url: str) -> Iterator[SqlStore]:
    s = SqlStore(sql_url)
    s.create_schema()
    meta.create_all(s.engine)
    yield s
    s.engine.dispose()


def count(store: SqlStore) -> tuple[int, int]:
    """(ledger rows, records)."""
    with store.engine.connect() as c:
        return (c.execute(sa.select(sa.func.count()).select_from(ledger)).scalar_one(),
                c.execute(sa.select(sa.func.count()).select_from(store.table)).scalar_one())


@pytest.mark.parametrize("optimistic", [True, False])
@pytest.mark.parametrize("ends", ["commit", "rollback"])
def test_a_handler_cannot_end_its_own_transaction(
        store: SqlStore, optimistic: bool, ends: str) -> None:
    """A handler that commits (its effect durable without the key) or rolls back (the
    claimed key gone, then writes again) gets TransactionEnded, and nothing commits; three
    deliveries make no row (was: three rows and no key)."""
    runs: list[int] = []

    @idempotent(store, key="pid", optimistic=optimistic)
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        runs.append(1)
        connection.execute(ledger.insert().values(pid=msg["pid"]))
        getattr(connection, ends)()
        connection.execute(ledger.insert().values(pid=msg["pid"]))
        return "ok"

    for _ in range(3):
        with pytest.raises(TransactionEnded, match="SAVEPOINT"):
            apply({"pid": "P1"})
    assert count(store) == (0, 0) and len(runs) == 3


@pytest.mark.parametrize("kind", ["connection", "session"])
def test_a_handler_cannot_end_the_callers_transaction(store: SqlStore, kind: str) -> None:
    """Caller-owned: a handler that commits the caller's transaction gets TransactionEnded;
    the caller's rollback then leaves no key behind (was: the key committed with a NULL
    result, and duplicates replayed None)."""

    @idempotent(store, key="pid", namespace="caller")
    def apply(msg: dict[str, Any], *, connection: Any) -> str:
        connection.execute(ledger.insert().values(pid=msg["pid"]))
        connection.commit()
        return "ok"

    with store.engine.connect() as conn:
        handle: Any = conn if kind == "connection" else Session(bind=conn)
        with pytest.raises(TransactionEnded):
            apply({"pid": "C1"}, connection=handle)
        handle.rollback()
    assert count(store) == (0, 0)


def test_a_policy_with_an_error_callback_still_ends_in_store_unavailable(
        store: SqlStore) -> None:
    """A retry policy whose retry_error_callback returns a value: the delivery still ends
    in StoreUnavailable, never in None taken for success (was: None returned, the payment
    lost and acked)."""
    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(),
                               retry=tenacity.retry_if_exception(is_transient),
                               retry_error_callback=lambda state: None)
    original = store.transaction

    def down(*args: Any, **kwargs: Any) -> Any:
        raise sa.exc.OperationalError("BEGIN", None, ConnectionError("down"),
                                      connection_invalidated=True)

    store.transaction = down  # type: ignore[method-assign]

    @idempotent(store, key="pid", retry=policy)
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        return "never"

    try:
        with pytest.raises(StoreUnavailable):
            apply({"pid": "P1"})
    finally:
        store.transaction = original  # type: ignore[method-assign]


def test_the_lease_is_renewed_while_a_slow_complete_is_retried() -> None:
    """Lease mode: the handler returned and complete keeps failing transiently for longer
    than the lease; the heartbeat goes on renewing meanwhile, so a redelivery meets a live
    lease and the payment is charged once (was: the beat stopped before complete, the lease
    ran out, the redelivery charged again)."""

    class Flaky(MemoryStore):
        may_fail_transiently = True
        fails = 4
        retrying = threading.Event()

        def _complete(self, *args: Any) -> bool:
            if Flaky.fails:
                Flaky.fails -= 1
                Flaky.retrying.set()
                raise ConnectionError("blip")
            return super()._complete(*args)

    store = Flaky()
    charges: list[str] = []
    policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(6),
                               wait=tenacity.wait_fixed(0.5),
                               retry=tenacity.retry_if_exception(is_transient), reraise=True)

    @idempotent(store, key="pid", lease=1.0, retry=policy)
    def charge(msg: dict[str, Any]) -> str:
        charges.append(threading.current_thread().name)
        return "charged"

    first = threading.Thread(target=charge, args=({"pid": "P1"},), name="first")
    first.start()
    assert Flaky.retrying.wait(10)
    done = threading.Event()
    outcomes: list[str] = []
    while not done.is_set() and first.is_alive():  # redeliveries during the retries
        try:
            outcomes.append(charge({"pid": "P1"}))
        except Exception as exc:
            outcomes.append(type(exc).__name__)
        done.wait(0.3)
    first.join(20)
    assert charges == ["first"], outcomes
    assert "charged" not in outcomes[:-1] or charges == ["first"]


def test_any_serializer_error_completes_the_key_with_the_marker() -> None:
    """A serializer that fails with an error of another type (AttributeError) after the
    handler's effect: the key completes without its result (was: left in progress, and
    every later delivery charged again)."""

    class Picky:
        def dumps(self, value: Any) -> bytes:
            return value.model_dump_json().encode()  # type: ignore[no-any-return]

        def loads(self, data: bytes) -> Any:
            return data

    store = MemoryStore()
    charges: list[int] = []

    @idempotent(store, key="pid", serializer=Picky())
    def charge(msg: dict[str, Any]) -> dict[str, str]:
        charges.append(1)
        return {"status": "charged"}

    assert charge({"pid": "P1"}) == {"status": "charged"}
    with pytest.raises(ResultNotStored):
        charge({"pid": "P1"})
    assert charges == [1]


async def test_an_async_retry_predicate_is_awaited(sqlite_url: str) -> None:
    """An AsyncRetrying policy with an async predicate that says "no": a handler's
    IntegrityError on the transaction's own connection runs once (was: the coroutine was
    taken for true, and the handler ran four times)."""
    pytest.importorskip("aiosqlite")
    store = SqlStore(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
    await store.create_schema()
    runs: list[int] = []

    async def never(exc: BaseException) -> bool:
        return False

    policy = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(4),
                                    wait=tenacity.wait_none(),
                                    retry=tenacity.asyncio.retry_if_exception(never),
                                    reraise=True)

    @idempotent(store, key="pid", retry=policy)
    async def apply(msg: dict[str, Any], *, connection: Any) -> None:
        runs.append(1)
        await connection.execute(sa.text("SELECT * FROM no_such_table"))

    with pytest.raises(sa.exc.OperationalError):
        await apply({"pid": "P1"})
    assert runs == [1]
    await store.async_engine.dispose()  # type: ignore[union-attr]


async def test_a_handler_raising_greenlet_exit_gets_it_back() -> None:
    """An async handler that raises GreenletExit: the caller gets it as itself (was:
    TypeError: object GreenletExit can't be used in 'await' expression)."""
    from greenlet import GreenletExit  # type: ignore[import-untyped]

    @idempotent(MemoryStore(), key="pid")
    async def odd(msg: dict[str, Any]) -> None:
        raise GreenletExit("the handler's own")

    with pytest.raises(GreenletExit, match="the handler's own"):
        await odd({"pid": "P1"})


def test_the_callers_fresh_connection_on_sqlalchemys_sqlite_savepoint_recipe(
        sqlite_url: str) -> None:
    """SQLAlchemy's recipe for SAVEPOINTs on pysqlite (isolation_level=None and a begin
    event that sends BEGIN): a caller's fresh Connection works (was: "cannot start a
    transaction within a transaction")."""
    engine = sa.create_engine(sqlite_url)

    @sa.event.listens_for(engine, "connect")
    def no_implicit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    store = SqlStore(engine)
    store.create_schema()
    meta.create_all(engine)

    @idempotent(store, key="pid", namespace="caller")
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        connection.execute(ledger.insert().values(pid=msg["pid"]))
        return "ok"

    with engine.connect() as conn:
        assert apply({"pid": "C1"}, connection=conn) == "ok"
        conn.commit()
    assert count(store) == (1, 1)
    engine.dispose()


def test_a_celery_duplicate_of_an_unstored_result_succeeds_without_running() -> None:
    """Celery, lease mode: the first run's result cannot be stored; the redelivery of the
    same message (same task id) succeeds with no result and does not run the body (was:
    FAILURE with ResultNotStored over the first run's SUCCESS)."""
    from celery import Celery
    from idempotent.integrations.celery import idempotent_task

    app = Celery("review", broker="memory://", backend="cache+memory://")
    charges: list[str] = []

    @idempotent_task(app, MemoryStore(), name="review.charge")
    def charge(card: str, cents: int) -> dict[str, bytes]:
        charges.append(card)
        return {"receipt": b"\x89PNG raw bytes"}  # not JSON: the result is not stored

    first = charge.apply(("c1", 100), task_id="t-1")
    again = charge.apply(("c1", 100), task_id="t-1")
    assert first.state == "SUCCESS" and again.state == "SUCCESS" and again.result is None
    assert charges == ["c1"]


def test_a_stopped_heartbeat_does_not_keep_its_store_alive() -> None:
    """Stopped beats wait in the heartbeat's deque until the thread next wakes (up to a
    minute): they must not hold their store, or a store's connections outlive it and close
    at a random later garbage collection (was: ResourceWarnings failing unrelated tests)."""
    import gc
    import weakref

    store = MemoryStore()

    @idempotent(store, key="pid", lease=30)
    def charge(msg: dict[str, Any]) -> str:
        return "charged"

    charge({"pid": "P1"})
    alive = weakref.ref(store)
    del store, charge
    gc.collect()
    assert alive() is None
