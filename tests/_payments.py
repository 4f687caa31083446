"""Shared by the PostgreSQL and SQLite integration tests: the payment ledger, the handler,
the worker processes, and the test bodies that are the same on both databases.

The ledger has **no** unique constraint on ``payment_id``: only the dedup store stands
between a redelivery and a second row. Every handler result names who applied the
payment (``by``), so a duplicate that returned its own result instead of the first one
would show.

Worker processes use the ``spawn`` start method: each child builds its own engine and
inherits nothing from pytest. The test modules register this module for pytest's assert
rewriting, so the ``check_*`` bodies below report their failures in full.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from idempotent import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    MissingIdempotencyKey,
    ResultNotSerializable,
    SqlStore,
    State,
    idempotent,
)

NS = "tests.apply_payment"
SPAWN = mp.get_context("spawn")
CHILD_TIMEOUT = 60.0  # seconds for a spawned child to import, connect and signal
WORKERS_TIMEOUT = 150.0  # seconds for a whole concurrent run

ledger_metadata = sa.MetaData()
ledger = sa.Table(
    "ledger",
    ledger_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(400), nullable=False),  # deliberately NOT unique
    sa.Column("cents", sa.BigInteger, nullable=False),
    sa.Column("applied_by", sa.String(64), nullable=False),
)


# ------------------------------------------------------------------------- the handler

AfterWrite = Callable[[dict[str, Any], Any], None]


def make_handler(
    store: SqlStore,
    *,
    by: str,
    tx: str = "connection",
    namespace: str = NS,
    after_write: AfterWrite | None = None,
    result_of: Callable[[dict[str, Any]], Any] | None = None,
    **options: Any,
) -> Any:
    """``@idempotent(store, key="payment_id")`` over a handler that inserts one ledger row.

    ``tx`` names the handler's transaction parameter (``connection`` or ``session``).
    ``after_write(msg, handle)`` runs after the insert, inside the transaction.
    The returned callable has ``.calls``: the payment ids the handler body ran for.
    """
    calls: list[str] = []

    def effect(msg: dict[str, Any], handle: Any) -> Any:
        calls.append(msg["payment_id"])
        handle.execute(sa.insert(ledger).values(
            payment_id=msg["payment_id"], cents=msg["cents"], applied_by=by))
        if after_write is not None:
            after_write(msg, handle)
        if result_of is not None:
            return result_of(msg)
        return {"applied": msg["payment_id"], "cents": msg["cents"], "by": by}

    if tx == "connection":
        def apply_payment(msg: dict[str, Any], *, connection: Any) -> Any:
            return effect(msg, connection)
    elif tx == "session":
        def apply_payment(msg: dict[str, Any], *, session: Any) -> Any:  # type: ignore[misc]
            return effect(msg, session)
    else:
        raise ValueError(tx)

    handler: Any = idempotent(store, key="payment_id", namespace=namespace, **options)(
        apply_payment)
    handler.calls = calls
    return handler


def first_result(msg: dict[str, Any], by: str) -> dict[str, Any]:
    return {"applied": msg["payment_id"], "cents": msg["cents"], "by": by}


# ------------------------------------------------------------------------- the database


@dataclass
class Db:
    """One test database: its URL, an engine for the test's own reads, and the stores
    the test made (all disposed at the end)."""

    url: str
    engine: sa.Engine
    engines: list[sa.Engine] = field(default_factory=list)

    @classmethod
    def create(cls, url: str) -> Db:
        db = cls(url, sa.create_engine(url))
        schema_store = db.store()
        schema_store.create_schema()
        ledger_metadata.create_all(db.engine)
        return db

    @classmethod
    def opened(cls, url: str) -> Iterator[Db]:
        """A fixture body: the database for one test, disposed afterwards."""
        db = cls.create(url)
        try:
            yield db
        finally:
            db.close()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def store(self, **options: Any) -> SqlStore:
        store = SqlStore(self.url, **options)
        self.engines.append(store.engine)
        return store

    def close(self) -> None:
        for engine in [*self.engines, self.engine]:
            engine.dispose()

    # the test's view, through its own connection (committed data only)
    def ledger(self) -> list[tuple[str, int, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ledger.c.payment_id, ledger.c.cents,
                                          ledger.c.applied_by).order_by(ledger.c.id))
            return [(r[0], r[1], r[2]) for r in rows]

    def ledger_totals(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            count, total = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.cents), 0))
            ).one()
            return int(count), int(total)

    def records(self, namespace: str | None = None) -> list[tuple[str, str, str]]:
        """(namespace, key, state) of the committed records, sorted."""
        table = sa.table("idempotency_records", sa.column("namespace"), sa.column("key"),
                         sa.column("state"))
        query = sa.select(table.c.namespace, table.c.key, table.c.state)
        if namespace is not None:
            query = query.where(table.c.namespace == namespace)
        with self.engine.connect() as conn:
            return sorted((r[0], r[1], r[2]) for r in conn.execute(query))


# ------------------------------------------------------------------------- processes


@contextmanager
def reaped(procs: Sequence[Any]) -> Iterator[None]:
    """Whatever happens in the block, no process of ``procs`` outlives it."""
    try:
        yield
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)


def make_payments(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"payment_id": f"pay-{i:05d}", "cents": rng.randint(1, 1_000_000)} for i in range(n)]


def deal_deliveries(
    payments: list[dict[str, Any]], workers: int, seed: int
) -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    """Each payment delivered 1-3 times, in shuffled order; the copies of one payment go
    to different workers, at about the same position of their queues (each copy joins one
    of the currently shortest queues), so duplicates run at the same time."""
    rng = random.Random(seed)
    order = payments[:]
    rng.shuffle(order)
    queues: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    copies: dict[str, int] = {}
    for p in order:
        k = rng.randint(1, 3)
        copies[p["payment_id"]] = k
        shortest = sorted(range(workers), key=lambda w: (len(queues[w]), rng.random()))
        for w in shortest[:k]:
            queues[w].append(p)
    return queues, copies


def delivery_worker(
    url: str, worker: int, deliveries: list[dict[str, Any]], out: str, start: Any,
    optimistic: bool = True,
) -> None:
    """A worker process: deliver its queue; AlreadyInProgress means "redeliver later"."""
    store = SqlStore(url)
    try:
        handler = make_handler(store, by=f"w{worker}", optimistic=optimistic)
        with store.engine.connect():  # connect before the start line, not in the race
            pass
        start.wait(CHILD_TIMEOUT)  # all workers begin together (BrokenBarrierError if not)
        pending = deque(deliveries)
        results: list[tuple[str, Any]] = []
        in_progress = 0
        deadline = time.monotonic() + WORKERS_TIMEOUT
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker}: {len(pending)} deliveries left")
            msg = pending.popleft()
            try:
                results.append((msg["payment_id"], handler(msg)))
            except AlreadyInProgress as exc:
                assert exc.key == msg["payment_id"], exc
                in_progress += 1
                pending.append(msg)
        data = {"results": results, "in_progress": in_progress, "runs": handler.calls}
    finally:
        store.engine.dispose()
    tmp = out + ".tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, out)


def crash_worker(
    url: str, msg: dict[str, Any], written: Any, release: Any, optimistic: bool
) -> None:
    """Writes the ledger row, says so, then blocks inside the open transaction until it
    is SIGKILLed."""
    store = SqlStore(url)

    def block(_msg: dict[str, Any], _conn: Any) -> None:
        written.set()
        release.wait()  # never set: the parent kills us here

    make_handler(store, by=f"crashed-{os.getpid()}", after_write=block,
                 optimistic=optimistic)(msg)


# ------------------------------------------------------------------------- test bodies


@dataclass
class ConcurrentRun:
    deliveries: int
    in_progress: int  # AlreadyInProgress raised (and redelivered later)
    handler_runs: int
    seconds: float


def check_concurrent_deliveries(db: Db, tmp_path: Path, *, workers: int, payments: int,
                                seed: int, optimistic: bool = True) -> ConcurrentRun:
    """Workers deliver the same payments concurrently. Pessimistic: the handler runs once
    per payment. Optimistic: a concurrent duplicate may run the handler too, and is rolled
    back at the key. Either way: one ledger row per payment, and every delivery gets the
    result of the delivery that applied it."""
    pays = make_payments(payments, seed)
    queues, copies = deal_deliveries(pays, workers, seed)
    assert sum(copies.values()) > payments  # there are duplicates to catch
    assert max(copies.values()) == 3
    start = SPAWN.Barrier(workers)
    outs = [str(tmp_path / f"worker-{w}.json") for w in range(workers)]
    procs = [
        SPAWN.Process(target=delivery_worker,
                      args=(db.url, w, queues[w], outs[w], start, optimistic),
                      name=f"delivery-worker-{w}", daemon=True)
        for w in range(workers)
    ]
    began = time.monotonic()
    with reaped(procs):
        for p in procs:
            p.start()
        deadline = began + WORKERS_TIMEOUT + CHILD_TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0] * workers, "a worker failed (see stderr)"
    seconds = time.monotonic() - began

    cents = {p["payment_id"]: p["cents"] for p in pays}
    rows = db.ledger()
    assert len(rows) == payments
    count, total = db.ledger_totals()
    assert (count, total) == (payments, sum(cents.values()))
    per_payment = Counter(r[0] for r in rows)
    assert set(per_payment) == set(cents) and set(per_payment.values()) == {1}
    applied_by = {r[0]: r[2] for r in rows}
    assert all(r[1] == cents[r[0]] for r in rows)

    delivered: Counter[str] = Counter()
    runs: list[str] = []
    in_progress = 0
    for out in outs:
        data = json.loads(Path(out).read_text())
        in_progress += data["in_progress"]
        runs += data["runs"]
        for pid, result in data["results"]:
            delivered[pid] += 1
            # first delivery or duplicate: the result of the delivery that applied it
            assert result == {"applied": pid, "cents": cents[pid], "by": applied_by[pid]}
    assert delivered == Counter(copies)  # every delivery answered, exactly once
    ran = Counter(runs)
    assert set(ran) == set(cents)
    if not optimistic:  # a concurrent duplicate waited for the key instead of running
        assert ran == Counter({pid: 1 for pid in cents})
    assert db.records(NS) == sorted((NS, pid, "completed") for pid in cents)
    return ConcurrentRun(sum(copies.values()), in_progress, len(runs), seconds)


def check_crash_inside_transaction(
    db: Db,
    *,
    busy_errors: tuple[type[BaseException], ...] = (AlreadyInProgress,),
    waiter_store: Callable[[], SqlStore] | None = None,
    wait_until_blocked: Callable[[], None] | None = None,
    optimistic: bool = False,
) -> None:
    """A worker SIGKILLed between its write and its commit leaves nothing; a concurrent
    delivery meanwhile does not apply the payment a second time (pessimistic: it gives up
    with one of ``busy_errors``; optimistic: it applies the payment, once, and the crashed
    worker's write is gone with its transaction); the redelivery applies it once; the
    next delivery is a duplicate.

    With ``waiter_store``/``wait_until_blocked`` the redelivery is a patient concurrent
    delivery, started (and seen blocked on the key) before the kill; else it comes after.
    """
    pid = "pay-crash"
    msg: dict[str, Any] = {"payment_id": pid, "cents": 4242}
    written, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=crash_worker, args=(db.url, msg, written, release, optimistic),
                          name="crash-worker", daemon=True)
    # the child is reaped first, so a patient waiter blocked on its key is released
    with ThreadPoolExecutor(1) as pool, reaped([child]):
        child.start()
        assert written.wait(CHILD_TIMEOUT), "the worker never wrote its ledger row"
        assert child.is_alive()
        # the worker's write and claim are uncommitted: invisible to everyone else
        assert db.ledger() == []
        assert db.records() == []

        # a concurrent delivery with a short lock timeout: no second effect
        impatient = make_handler(db.store(lock_timeout=0.5), by="impatient",
                                 optimistic=optimistic)
        if optimistic:  # it does not wait for the key: it applies the payment, once
            assert impatient(msg) == first_result(msg, "impatient")
            assert db.ledger() == [(pid, 4242, "impatient")]
        else:
            with pytest.raises(busy_errors) as caught:
                impatient(msg)
            busy = caught.value
            assert isinstance(busy, IdempotencyError)
            assert busy.key == pid and busy.namespace == NS
            assert impatient.calls == []  # the handler did not run...
            assert db.ledger() == []  # ...and nothing was applied

        patient_result = None
        if waiter_store is not None and not optimistic:
            patient = make_handler(waiter_store(), by="patient", optimistic=False)
            patient_result = pool.submit(patient, msg)
            assert wait_until_blocked is not None
            wait_until_blocked()  # it waits on the crashed worker's key
            assert not patient_result.done()

        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == -signal.SIGKILL

        if optimistic:
            by = "impatient"
        elif patient_result is not None:
            by = "patient"
            assert patient_result.result(timeout=30) == first_result(msg, by)
            assert patient.calls == [pid]
        else:
            by = "redelivery"
            redelivery = make_handler(db.store(), by=by, optimistic=False)
            assert redelivery(msg) == first_result(msg, by)
            assert redelivery.calls == [pid]

    assert db.ledger() == [(pid, 4242, by)]  # nothing of the crashed worker's
    store = db.store()
    record = store.get(NS, pid)
    assert record is not None and record.state is State.COMPLETED
    assert record.result is not None and json.loads(record.result) == first_result(msg, by)

    third = make_handler(store, by="third")
    assert third(msg) == first_result(msg, by)  # a duplicate: the first result
    assert third.calls == []
    assert db.ledger() == [(pid, 4242, by)]


def check_held_key_gives_up(
    db: Db, expected: type[Exception] = AlreadyInProgress, max_wait: float = 2.5
) -> None:
    """While a delivery holds a key in its open transaction, a delivery of the same key on
    a store with ``lock_timeout=0.5`` waits, then gives up with ``expected`` without
    running the handler (PostgreSQL: `AlreadyInProgress` after lock_timeout; SQLite, whose
    lock is the whole database's: a busy store, retried, then `StoreUnavailable`); once the
    holder commits, it is a duplicate."""
    msg = {"payment_id": "pay-held", "cents": 55}
    written, release = threading.Event(), threading.Event()

    def hold(_msg: dict[str, Any], _conn: Any) -> None:
        written.set()
        assert release.wait(30), "the test never released the holder"

    holder = make_handler(db.store(), by="holder", after_write=hold, optimistic=False)
    impatient = make_handler(db.store(lock_timeout=0.5), by="impatient", optimistic=False)
    error: BaseException | None = None
    with ThreadPoolExecutor(1) as pool:
        try:
            held = pool.submit(holder, msg)
            assert written.wait(30), "the holder never wrote"
            began = time.monotonic()
            try:
                impatient(msg)
            except Exception as exc:
                error = exc
            waited = time.monotonic() - began
        finally:
            release.set()
        assert held.result(timeout=30) == first_result(msg, "holder")

    assert impatient.calls == []
    assert isinstance(error, expected), (
        f"expected {expected.__name__} after lock_timeout=0.5s; after {waited:.1f}s got "
        f"{error!r}")
    assert isinstance(error, IdempotencyError)
    assert error.key == "pay-held" and error.namespace == NS
    assert 0.4 <= waited < max_wait, f"lock_timeout=0.5; the delivery gave up after {waited:.2f}s"
    assert impatient(msg) == first_result(msg, "holder")  # the holder committed: a duplicate
    assert impatient.calls == []
    assert db.ledger() == [("pay-held", 55, "holder")]


MISSING_KEYS = [
    pytest.param({"cents": 100}, id="absent"),
    pytest.param({"payment_id": None, "cents": 100}, id="none"),
    pytest.param({"payment_id": "", "cents": 100}, id="empty"),
]


def check_missing_key(db: Db, msg: dict[str, Any]) -> None:
    handler = make_handler(db.store(), by="h")
    with pytest.raises(MissingIdempotencyKey) as caught:
        handler(msg)
    assert caught.value.namespace == NS
    assert handler.calls == []
    assert db.records() == []
    assert db.ledger() == []


def check_key_conflict(db: Db) -> None:
    handler = make_handler(db.store(), by="first")
    first = {"payment_id": "pay-1", "cents": 100}
    assert handler(first) == first_result(first, "first")

    other = make_handler(db.store(), by="other")
    with pytest.raises(IdempotencyKeyConflict) as caught:
        other({"payment_id": "pay-1", "cents": 999})
    exc = caught.value
    assert exc.key == "pay-1" and exc.namespace == NS
    assert exc.record.key == "pay-1" and exc.record.namespace == NS
    assert exc.record.state is State.COMPLETED
    assert exc.record.result is not None
    assert json.loads(exc.record.result) == first_result(first, "first")
    assert exc.fingerprint is not None and exc.record.fingerprint is not None
    assert exc.fingerprint != exc.record.fingerprint
    assert other.calls == []
    assert db.ledger() == [("pay-1", 100, "first")]
    # the real duplicate still gets the first result
    assert other(first) == first_result(first, "first")
    assert other.calls == []
    assert db.ledger() == [("pay-1", 100, "first")]


def check_result_not_serializable(db: Db) -> None:
    msg = {"payment_id": "pay-1", "cents": 100}
    broken = make_handler(db.store(), by="broken", result_of=lambda m: {"receipt": object()})
    with pytest.raises(ResultNotSerializable) as caught:
        broken(msg)
    assert caught.value.key == "pay-1" and caught.value.namespace == NS
    assert isinstance(caught.value.__cause__, TypeError)
    assert broken.calls == ["pay-1"]  # ran once: not a transient fault, not retried
    assert db.records() == []  # the transaction rolled back: no key...
    assert db.ledger() == []  # ...and no ledger row

    fixed = make_handler(db.store(), by="fixed")
    assert fixed(msg) == first_result(msg, "fixed")
    assert fixed.calls == ["pay-1"]
    assert db.ledger() == [("pay-1", 100, "fixed")]
    assert db.records() == [(NS, "pay-1", "completed")]


@contextmanager
def caller_transaction(engine: sa.Engine, kind: str) -> Iterator[tuple[Any, Callable[[], bool],
                                                                         Any]]:
    """The caller's own transaction: (handle to pass, is-it-still-open, the transaction)."""
    with engine.connect() as conn:
        if kind == "connection":
            trans = conn.begin()
            yield conn, conn.in_transaction, trans
        else:
            with Session(bind=conn) as session:
                session_trans = session.begin()
                yield session, session.in_transaction, session_trans


def check_caller_controlled_transaction(db: Db, kind: str) -> None:
    store = db.store()
    msg = {"payment_id": "pay-1", "cents": 100}
    handler = make_handler(store, by="caller", tx=kind)
    in_ledger = sa.select(sa.func.count()).select_from(ledger)

    # 1. the caller rolls back: the ledger row and the key are both forgotten
    with caller_transaction(store.engine, kind) as (handle, is_open, trans):
        assert handler(msg, **{kind: handle}) == first_result(msg, "caller")
        assert is_open()  # the decorator did not commit (or end) the caller's transaction
        assert handle.execute(in_ledger).scalar_one() == 1  # visible inside...
        assert db.ledger() == [] and db.records() == []  # ...not outside: uncommitted
        # a duplicate inside the same transaction sees the key
        assert handler(msg, **{kind: handle}) == first_result(msg, "caller")
        assert handler.calls == ["pay-1"]
        trans.rollback()
    assert db.ledger() == []
    assert db.records() == []
    assert store.get(NS, "pay-1") is None

    # 2. the caller commits: both become durable together
    with caller_transaction(store.engine, kind) as (handle, is_open, trans):
        assert handler(msg, **{kind: handle}) == first_result(msg, "caller")
        assert is_open()
        assert db.records() == []
        trans.commit()
    assert handler.calls == ["pay-1", "pay-1"]
    assert db.ledger() == [("pay-1", 100, "caller")]
    assert db.records() == [(NS, "pay-1", "completed")]

    # 3. a later delivery in the decorator's own transaction is a duplicate
    again = make_handler(store, by="again", tx=kind)
    assert again(msg) == first_result(msg, "caller")
    assert again.calls == []
    assert db.ledger() == [("pay-1", 100, "caller")]


def check_record_primitives(db: Db) -> None:
    store = db.store()
    with store.engine.connect() as conn:
        with conn.begin():
            assert store.record(conn, "batch", "k1") is True
            assert store.record(conn, "batch", "k1") is False  # our own transaction's key
            assert store.record(conn, "other", "k1") is True  # another namespace
            assert store.record_many(conn, "batch", ["k1", "k2", "k3", "k2"]) == {"k2", "k3"}
            assert store.record_many(conn, "batch", []) == set()
        # the block committed them
        assert [k for _, k, _ in db.records("batch")] == ["k1", "k2", "k3"]

        trans = conn.begin()
        assert store.record(conn, "batch", "k4") is True
        assert store.record_many(conn, "batch", ["k5", "k6", "k1"]) == {"k5", "k6"}
        assert db.records("batch") == [("batch", k, "completed") for k in ("k1", "k2", "k3")]
        trans.rollback()  # forgets k4, k5, k6
        assert [k for _, k, _ in db.records("batch")] == ["k1", "k2", "k3"]

        with conn.begin():
            assert store.record_many(conn, "batch", [f"k{i}" for i in range(1, 8)]) == {
                "k4", "k5", "k6", "k7"}
            assert store.record(conn, "batch", "k4") is False

        # a fingerprint makes a reused key with another payload a conflict
        with conn.begin():
            assert store.record(conn, "fp", "k", fingerprint="f1") is True
            assert store.record(conn, "fp", "k", fingerprint="f1") is False
            with pytest.raises(IdempotencyKeyConflict) as caught:
                store.record(conn, "fp", "k", fingerprint="f2")
            assert caught.value.key == "k" and caught.value.record.fingerprint == "f1"

    # an ORM Session works the same, and a rolled-back session forgets too
    with Session(store.engine) as session:
        with session.begin():
            assert store.record(session, "orm", "s1") is True
            assert store.record_many(session, "orm", ["s1", "s2"]) == {"s2"}
        session.begin()
        assert store.record(session, "orm", "s3") is True
        session.rollback()
        with session.begin():
            assert store.record_many(session, "orm", ["s1", "s2", "s3"]) == {"s3"}


def check_long_keys(db: Db) -> None:
    """Keys over 128 characters are hashed, never truncated: 300-character keys that
    share their first 200 characters stay different keys."""
    prefix = "x" * 200
    a, b, c = (prefix + ch * 100 for ch in "abc")
    store = db.store()
    with store.engine.connect() as conn, conn.begin():
        assert store.record(conn, "long", a) is True
        assert store.record(conn, "long", b) is True
        assert store.record(conn, "long", a) is False
        assert store.record_many(conn, "long", [a, b, c]) == {c}  # the original keys back
    stored = [k for _, k, _ in db.records("long")]
    assert len(stored) == 3
    assert all(k.startswith("sha256:") and len(k) == len("sha256:") + 64 for k in stored)

    # through the decorator (the handler's own transaction)
    handler = make_handler(store, by="h")
    m1, m2 = {"payment_id": a, "cents": 1}, {"payment_id": b, "cents": 2}
    assert handler(m1) == first_result(m1, "h")
    assert handler(m2) == first_result(m2, "h")
    assert handler(m1) == first_result(m1, "h")
    assert handler.calls == [a, b]
    assert db.ledger() == [(a, 1, "h"), (b, 2, "h")]
    assert len(db.records(NS)) == 2


def check_ttl(db: Db) -> None:
    now = [1_700_000_000.0]
    store = db.store(clock=lambda: now[0])
    msg = {"payment_id": "pay-1", "cents": 100}
    handler = make_handler(store, by="h", ttl=60,
                           result_of=lambda m: {"applied": m["payment_id"], "at": now[0]})
    t0 = now[0]
    assert handler(msg) == {"applied": "pay-1", "at": t0}
    now[0] = t0 + 59.5
    assert handler(msg) == {"applied": "pay-1", "at": t0}  # remembered
    assert handler.calls == ["pay-1"]
    now[0] = t0 + 61  # expired: the key is forgotten, the message is processed again
    assert handler(msg) == {"applied": "pay-1", "at": t0 + 61}
    assert handler.calls == ["pay-1", "pay-1"]
    assert db.ledger() == [("pay-1", 100, "h"), ("pay-1", 100, "h")]
    record = store.get(NS, "pay-1")
    assert record is not None and record.state is State.COMPLETED
    assert (record.created_at, record.expires_at) == (t0 + 61, t0 + 121)
    now[0] = t0 + 100
    assert handler(msg) == {"applied": "pay-1", "at": t0 + 61}  # the new record holds
    assert handler.calls == ["pay-1", "pay-1"]

    # the primitives honour ttl too
    with store.engine.connect() as conn:
        with conn.begin():
            assert store.record(conn, "ttl", "k", ttl=10) is True
            assert store.record_many(conn, "ttl", ["m1", "m2"], ttl=10) == {"m1", "m2"}
        now[0] += 9
        with conn.begin():
            assert store.record(conn, "ttl", "k", ttl=10) is False
            assert store.record_many(conn, "ttl", ["m1", "m2"], ttl=10) == set()
        now[0] += 2
        with conn.begin():
            assert store.record(conn, "ttl", "k", ttl=10) is True
            assert store.record_many(conn, "ttl", ["m1", "m2"], ttl=10) == {"m1", "m2"}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


__all__ = [
    "MISSING_KEYS", "NS", "Db", "check_caller_controlled_transaction",
    "check_concurrent_deliveries", "check_crash_inside_transaction",
    "check_held_key_gives_up", "check_key_conflict",
    "check_long_keys", "check_missing_key", "check_record_primitives",
    "check_result_not_serializable", "check_ttl", "first_result", "make_handler", "wait_for",
]
