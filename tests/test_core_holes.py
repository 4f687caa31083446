"""Regression tests for the holes of issue 9 that live in the delivery flow: each failed on
main at 70b75f3 and passes now. Real SQLite and PostgreSQL (the suite's own server)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from idempotent import (
    InvalidIdempotencyKey,
    MemoryStore,
    ResultNotStored,
    SqlStore,
    State,
    StoreUnavailable,
    idempotent,
)
from idempotent.stores.base import Store

meta = sa.MetaData()
ledger = sa.Table(
    "ledger", meta,
    sa.Column("payment_id", sa.String(200), primary_key=True),
    sa.Column("cents", sa.Integer, nullable=False),
)


@pytest.fixture
def store(sql_url: str) -> Iterator[SqlStore]:
    """A SqlStore with the ledger beside the records (SQLite, then PostgreSQL)."""
    s = SqlStore(sql_url)
    s.create_schema()
    meta.create_all(s.engine)
    yield s
    s.engine.dispose()


def rows(store: SqlStore) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(ledger).order_by(ledger.c.payment_id))]


def records(store: SqlStore) -> list[tuple[str, str, str]]:
    t = store.table
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            sa.select(t.c.namespace, t.c.key, t.c.state).order_by(t.c.key))]


# -- hole 1: a caller-owned transaction whose handler raises ------------------------------
@pytest.mark.parametrize("kind", ["connection", "session"])
def test_caller_transaction_handler_error_leaves_no_key_behind(
        store: SqlStore, kind: str) -> None:
    """A batch consumer that catches one handler's error and commits the rest: the failed
    message leaves neither its key nor its writes, so its redelivery runs (was: the key
    committed as completed with a NULL result, and the redelivery replayed None)."""
    from sqlalchemy.orm import Session

    calls: list[str] = []

    def body(msg: dict[str, Any], handle: Any) -> str:
        calls.append(msg["payment_id"])
        handle.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=msg["cents"]))
        if msg.get("boom"):
            raise RuntimeError("card declined by a bug")
        return "applied"

    if kind == "connection":
        @idempotent(store, key="payment_id", namespace="batch")
        def apply(msg: dict[str, Any], *, connection: Any) -> str:
            return body(msg, connection)
    else:
        @idempotent(store, key="payment_id", namespace="batch")
        def apply(msg: dict[str, Any], *, session: Any) -> str:
            return body(msg, session)

    batch = [{"payment_id": "p1", "cents": 1}, {"payment_id": "p2", "cents": 2, "boom": True},
             {"payment_id": "p3", "cents": 3}]
    with store.engine.connect() as conn, conn.begin():
        handle: Any = conn if kind == "connection" else Session(bind=conn)
        for msg in batch:
            with contextlib.suppress(RuntimeError):  # the consumer moves on, commits the rest
                apply(msg, **{kind: handle})
        if kind == "session":
            handle.flush()
    assert rows(store) == [("p1", 1), ("p3", 3)]
    assert [r[1] for r in records(store)] == ["p1", "p3"]
    # the redelivery of p2 runs (fixed now) and commits
    with store.engine.connect() as conn, conn.begin():
        handle = conn if kind == "connection" else Session(bind=conn)
        assert apply({"payment_id": "p2", "cents": 2}, **{kind: handle}) == "applied"
        if kind == "session":
            handle.flush()
    assert rows(store) == [("p1", 1), ("p2", 2), ("p3", 3)]
    assert calls == ["p1", "p2", "p3", "p2"]


# -- hole 2: the handler's own errors are not store faults -------------------------------
@pytest.mark.parametrize("error", [TimeoutError("webhook timed out"),
                                   ConnectionError("payment API refused"),
                                   OSError("disk full")])
def test_transactional_handler_errors_surface_as_themselves_unretried(
        store: SqlStore, error: Exception) -> None:
    """A handler raising TimeoutError/ConnectionError/OSError runs once and surfaces as
    itself (was: run 6 times, then StoreUnavailable), leaving no row and no key."""
    calls: list[int] = []

    @idempotent(store, key="payment_id")
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> None:
        calls.append(1)
        connection.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=1))
        raise error

    with pytest.raises(type(error)) as info:
        apply({"payment_id": "p1"})
    assert info.value is error
    assert calls == [1]
    assert rows(store) == [] and records(store) == []


def test_a_driver_error_of_the_handler_s_own_client_is_not_retried(
        store: SqlStore, pg_url: str) -> None:
    """A psycopg/SQLAlchemy error from another database client of the handler's (here: a
    second engine on a closed port) is the handler's, not the store's: one run, raised
    as itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    other = sa.create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{port}/x",
                             connect_args={"connect_timeout": 2})
    calls: list[int] = []

    @idempotent(store, key="payment_id")
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> None:
        calls.append(1)
        with other.connect():
            pass

    with pytest.raises(sa.exc.OperationalError):
        apply({"payment_id": "p1"})
    assert calls == [1]
    assert records(store) == []


def test_a_transient_fault_on_the_transaction_s_own_connection_is_retried(
        pg_url: str) -> None:
    """A transient fault raised by a statement on the transaction's own connection (its
    backend terminated under the handler) rolled the attempt back: it is retried whole,
    and the payment commits once."""
    store = SqlStore(pg_url)
    store.create_schema()
    meta.create_all(store.engine)
    calls: list[int] = []

    @idempotent(store, key="payment_id")
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        calls.append(1)
        connection.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=5))
        if len(calls) == 1:
            connection.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return "ok"

    try:
        assert apply({"payment_id": "p1"}) == "ok"
        assert len(calls) == 2
        assert rows(store) == [("p1", 5)]
    finally:
        store.engine.dispose()


def test_lease_handler_errors_are_not_retried_and_release_the_key() -> None:
    """Lease mode on a store that can fail: a handler's ConnectionError runs once, is
    raised as itself and releases the key."""

    class FlakyKindOfStore(MemoryStore):
        may_fail_transiently = True  # as a server store: the retry policy is on

    store = FlakyKindOfStore()
    calls: list[int] = []

    @idempotent(store, key="id")
    def charge(msg: dict[str, Any]) -> None:
        calls.append(1)
        raise ConnectionError("payment API refused")

    with pytest.raises(ConnectionError):
        charge({"id": "k"})
    assert calls == [1] and len(store) == 0


def test_a_store_fault_is_still_retried_then_store_unavailable() -> None:
    """The other side of the rule: a transient fault of the store itself is retried by
    the policy and ends in StoreUnavailable, and the handler never ran."""

    class DownStore(MemoryStore):
        may_fail_transiently = True
        claims = 0

        def _claim(self, *args: Any) -> Any:
            DownStore.claims += 1
            raise ConnectionError("store is down")

    from idempotent import transient_retry

    calls: list[int] = []

    @idempotent(DownStore(), key="id", retry=transient_retry(3, initial=0.001))
    def charge(msg: dict[str, Any]) -> None:
        calls.append(1)

    with pytest.raises(StoreUnavailable):
        charge({"id": "k"})
    assert DownStore.claims == 3 and calls == []


# -- hole 3: lease mode never releases after the effect ----------------------------------
def test_a_result_over_the_store_s_limit_completes_the_key() -> None:
    """A result larger than the store holds: the handler ran, so the key is completed with
    a marker; three deliveries make one charge (was: released each time, three charges)."""
    store = MemoryStore()
    store.max_result_bytes = 16
    charges: list[int] = []

    @idempotent(store, key="id")
    def charge(msg: dict[str, Any]) -> str:
        charges.append(1)
        return "x" * 100

    assert charge({"id": "big"}) == "x" * 100
    for _ in range(2):
        with pytest.raises(ResultNotStored, match="max_result_bytes"):
            charge({"id": "big"})
    assert charges == [1]
    record = store.get(charge.namespace, "big")  # type: ignore[attr-defined]
    assert record is not None and record.state is State.COMPLETED


def test_transactional_unserialisable_result_rolls_back_and_runs_again(
        store: SqlStore) -> None:
    """In transactional mode nothing happened yet: the writes roll back with the key, and
    the redelivery runs again."""
    from idempotent import ResultNotSerializable

    results: list[Any] = [object(), "fine"]

    @idempotent(store, key="payment_id")
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> Any:
        connection.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=1))
        return results.pop(0)

    with pytest.raises(ResultNotSerializable):
        apply({"payment_id": "p1"})
    assert rows(store) == [] and records(store) == []
    assert apply({"payment_id": "p1"}) == "fine"
    assert rows(store) == [("p1", 1)]


# -- hole 4: keys a store cannot hold exactly ---------------------------------------------
BAD_TEXT = ["order-1\x00evil", "order-\ud800", "\x00"]


@pytest.mark.parametrize("optimistic", [True, False])
@pytest.mark.parametrize("bad", BAD_TEXT)
def test_transactional_bad_keys_are_refused_before_anything_is_written(
        store: SqlStore, bad: str, optimistic: bool) -> None:
    """A NUL or a lone surrogate in a key is refused with InvalidIdempotencyKey before the
    handler runs (was, on the PostgreSQL fast path: "order-1\\x00evil" stored as
    "order-1", so the real order-1 never ran and got the other message's result)."""
    calls: list[str] = []

    @idempotent(store, key="payment_id", optimistic=optimistic)
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        calls.append(msg["payment_id"])
        connection.execute(ledger.insert().values(payment_id=msg["payment_id"][:7], cents=1))
        return msg["payment_id"]

    with pytest.raises(InvalidIdempotencyKey):
        apply({"payment_id": bad})
    assert calls == [] and records(store) == []
    assert apply({"payment_id": "order-1"}) == "order-1"
    assert calls == ["order-1"]


@pytest.mark.parametrize("bad", BAD_TEXT)
def test_bad_keys_namespaces_and_scopes_are_refused_on_every_path(
        store: SqlStore, bad: str) -> None:
    """The same refusal for a scope, a namespace, the record primitives and a direct
    lease-mode claim."""
    with pytest.raises(InvalidIdempotencyKey):
        @idempotent(store, key="id", namespace=bad)
        def h(msg: dict[str, Any]) -> None: ...

    @idempotent(MemoryStore(), key="id", scope=lambda m: m["tenant"])
    def scoped(msg: dict[str, Any]) -> None: ...

    with pytest.raises(InvalidIdempotencyKey):
        scoped({"id": "k", "tenant": bad})
    with store.engine.connect() as conn, conn.begin():
        with pytest.raises(InvalidIdempotencyKey):
            store.record(conn, "ns", bad)
        with pytest.raises(InvalidIdempotencyKey):
            store.record_many(conn, "ns", ["fine", bad])
    with pytest.raises(InvalidIdempotencyKey):
        store.claim("ns", bad, fingerprint=None)
    assert records(store) == []


@pytest.mark.parametrize("make", ["memory", "sql"])
def test_lease_mode_bad_keys_are_refused(store: SqlStore, make: str) -> None:
    """Lease mode, on memory and SQL: the handler never runs for a key with a NUL."""
    target: Store = MemoryStore() if make == "memory" else store
    calls: list[str] = []

    @idempotent(target, key="id")
    def charge(msg: dict[str, Any]) -> None:
        calls.append(msg["id"])

    with pytest.raises(InvalidIdempotencyKey):
        charge({"id": "a\x00b"})
    assert calls == []


def test_a_ttl_shorter_than_the_lease_is_refused_in_lease_mode() -> None:
    """An in-progress key past its ttl is claimable (rule CLAIMABLE) even while its lease
    is live: with ttl < lease a redelivery would run a handler that still runs. Refused
    when the handler is declared; transactional mode has no lease and is not concerned."""
    store = MemoryStore()
    with pytest.raises(ValueError, match=r"ttl \(10 s\) is shorter than the lease \(60 s\)"):
        idempotent(store, key="id", ttl=10, lease=60)(lambda msg: None)
    with pytest.raises(ValueError, match=r"shorter than the lease \(30.0 s\)"):
        idempotent(store, key="id", ttl=5)(lambda msg: None)  # the default lease
    idempotent(store, key="id", ttl=60, lease=60)(lambda msg: None)
    sql = SqlStore("sqlite://")

    @idempotent(sql, key="id", ttl=5)
    def tx(msg: dict, *, connection: object) -> None: ...
