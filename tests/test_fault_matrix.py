"""The fault matrix of issue 9: store x mode x point x fault, on the real servers.

Each cell is one payment delivered once and then redelivered three times, as a broker
does after a failure (every delivery catches what it raised; a delivery that finds the
key in progress makes the broker wait out ``retry_after``, which here moves the lease
stores' clock forward instead of sleeping). After every delivery the invariant is
checked, and at the end the cell's outcome is compared, as one value, with what the
contract says:

* **transactional** (own transaction, optimistic and pessimistic; the caller's
  transaction): the ledger holds at most one row of the payment, and the key's record is
  committed if and only if that row is; the caller, a batch consumer, commits the rest of
  its transaction whatever the handler raised;
* **lease**: the handler's effect (an append to an external list) repeats only when an
  earlier run died before ``complete`` (the handler raised after its effect and was
  released, as documented, or the complete never succeeded); never because of a
  misclassified error, an unstorable result or a failing renewal. A completed key's
  later duplicates get the first stored result, `ResultNotStored`, or the kept failure;
* the handler's own exceptions surface as themselves (the same object), are never
  retried by the library (the runs of each delivery are counted) and never become
  `StoreUnavailable`;
* a transient store fault the policy can cure ends in exactly-once; one that outlasts it
  ends in `StoreUnavailable` with nothing recorded as completed (unless the store did
  complete it and only its reply was lost: then the redelivery is a duplicate).

Store faults are injected by wrapping the store's public operations (``claim``,
``complete``, ``release``, ``renew``, ``transaction``, ``join``, ``Transaction.commit``):
``before`` fails the call without running it (the request was lost), ``after`` runs it
and then fails (its reply was lost); on Redis ``mid`` interrupts a script call between
its send and its reply, left unread on the connection. Faults are a builtin
``ConnectionError``, the store's own driver error for a dropped connection, or an
asynchronous ``KeyboardInterrupt``; the memory store, which cannot fail transiently, gets
only the last. A few cells use real faults instead: a PostgreSQL backend terminated under
the handler's transaction, every backend terminated while the store's pool holds idle
connections (a server restart), a lock wait that hits ``lock_timeout``, a SQLite database
locked by another connection. The cells read what was recorded through engines of their
own, which no fault touches.

Clock skew has its own tests at the end: workers whose clocks disagree never take over
each other's live lease.

Cells that fail because of a library bug are marked ``xfail(strict=True)`` with the bug
in one line; see `KNOWN_BUGS`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from idempotent import (
    AlreadyInProgress,
    MemoryStore,
    PreviousAttemptFailed,
    ResultNotSerializable,
    ResultNotStored,
    SqlStore,
    State,
    StoreUnavailable,
    current_key,
    idempotent,
    transient_retry,
)
from idempotent._rules import NOT_STORED_PREFIX
from idempotent.stores.redis import RedisStore

NS = "fault_matrix"
DELIVERIES = 4  # the first delivery and three redeliveries
FAST = transient_retry(3, initial=0.001)  # three attempts in all
LEASE = 30.0  # lease of the cells without a renewal (no heartbeat fires in them)
RENEW_LEASE = 1.0  # the shortest lease: a renewal every third of a second
DEADLINE = 10.0  # the longest wait on a condition (never reached when things work)
_real_time = time.time
_ids = itertools.count(1)

meta = sa.MetaData()
ledger = sa.Table(
    "ledger", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(100), nullable=False),  # no unique index: count them
    sa.Column("cents", sa.Integer, nullable=False),
)
rest = sa.Table(  # the rest of a batch consumer's transaction
    "batch_rest", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(100), nullable=False),
    sa.Column("part", sa.String(10), nullable=False),
)
locks = sa.Table("locks", meta, sa.Column("id", sa.Integer, primary_key=True))


# -- the servers: one database (and one redis db) for the whole module ----------------------
class Backends:
    """Lazily made, module-wide, on the suite's session servers (``pg_server``,
    ``redis_server``): the SQLite file and a PostgreSQL database with the schema, a Redis
    database. (The per-test ``pg_url`` would create a database for each of the hundreds
    of cells.) Each cell makes its own store objects on them, with its own clock and
    faults, and its own payment id."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path) -> None:
        self._request, self._tmp = request, tmp
        self._bases: dict[str, SqlStore] = {}
        self._readers: dict[str, SqlStore] = {}
        self._redis_url: str | None = None
        self._pg_name: str | None = None

    def sqlite_path(self) -> Path:
        return self._tmp / "matrix.db"

    def base(self, kind: str) -> SqlStore:
        """The module's SqlStore of ``kind`` (records, ledger, rest and locks tables)."""
        if kind not in self._bases:
            if kind == "sqlite":
                url = f"sqlite:///{self.sqlite_path()}"
            else:
                server = self._request.getfixturevalue("pg_server")
                self._pg_name = f"fault_matrix_{next(_ids)}_{id(self) % 10_000}"
                server.create_database(self._pg_name)
                url = server.url_for(self._pg_name)
            store = SqlStore(url)
            store.create_schema()
            meta.create_all(store.engine)
            with store.engine.begin() as conn:
                conn.execute(locks.insert().values(id=1))
            self._bases[kind] = store
            # what the cells read with: an engine of its own, whatever faults do to theirs
            self._readers[kind] = SqlStore(url, pool_pre_ping=True)
        return self._bases[kind]

    def reader(self, kind: str) -> SqlStore:
        self.base(kind)
        return self._readers[kind]

    def pg_server(self) -> Any:
        return self._request.getfixturevalue("pg_server")

    def redis_url(self) -> str:
        if self._redis_url is None:
            server = self._request.getfixturevalue("redis_server")
            self._redis_url = server.url_for(12)  # not the conftest's db 9
            with redis.Redis.from_url(self._redis_url) as client:
                client.flushdb()
        return self._redis_url

    def close(self) -> None:
        for store in (*self._bases.values(), *self._readers.values()):
            store.engine.dispose()
        if self._pg_name is not None:
            self.pg_server().drop_database(self._pg_name)
        if self._redis_url is not None:
            with redis.Redis.from_url(self._redis_url) as client:
                client.flushdb()


@pytest.fixture(scope="module")
def backends(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    b = Backends(request, tmp_path_factory.mktemp("fault_matrix"))
    yield b
    b.close()


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


class Clock:
    """A lease store's clock: the real one plus an offset that a cell moves forward when
    the broker would wait for a lease to run out."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return _real_time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


# -- the faults ------------------------------------------------------------------------------
HANDLER_KINDS = ("ValueError", "RuntimeError", "TimeoutError", "ConnectionError", "OSError",
                 "KeyError", "KeyboardInterrupt", "ForeignDBError", "ForeignRedisError",
                 "NestedStoreUnavailable")
POINTS = ("handler_start", "before_effect", "after_effect")
TRANSIENT = ("ConnectionError", "driver")


def handler_exception(kind: str, where: str) -> BaseException:
    """What a handler raises: a builtin of each kind, a driver error of one of the
    handler's own clients (another database, its own Redis), which looks transient, or the
    StoreUnavailable of another idempotent handler it calls."""
    msg = f"the handler's own {kind} at {where}"
    if kind == "ForeignDBError":
        return sa.exc.OperationalError("SELECT 1 -- the handler's other database", None,
                                       ConnectionResetError(msg), connection_invalidated=True)
    if kind == "ForeignRedisError":
        return redis.exceptions.ConnectionError(msg)
    if kind == "NestedStoreUnavailable":  # from an idempotent call the handler makes
        return StoreUnavailable(msg, cause=ConnectionError(msg), namespace="other", key="k")
    builtin: type[BaseException] = {
        "ValueError": ValueError, "RuntimeError": RuntimeError, "TimeoutError": TimeoutError,
        "ConnectionError": ConnectionError, "OSError": OSError, "KeyError": KeyError,
        "KeyboardInterrupt": KeyboardInterrupt,
    }[kind]
    return builtin(msg)


def store_exception(kind: str, store: str, op: str) -> BaseException:
    """What a failing store operation raises: a builtin ConnectionError, the store's own
    driver error for a dropped connection, or an asynchronous KeyboardInterrupt."""
    msg = f"injected {kind} in {op}"
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt(msg)
    if kind == "ConnectionError":
        return ConnectionError(msg)
    if store == "redis":
        return redis.exceptions.ConnectionError(msg)
    return sa.exc.OperationalError(f"-- {op}", None, ConnectionResetError(msg),
                                   connection_invalidated=True)


@dataclass(frozen=True)
class HandlerFault:
    kind: str
    point: str
    always: bool = False  # a poison message: every run raises (else only the first run)
    keep: bool = False  # the kind is in keep_failures


@dataclass(frozen=True)
class StoreFault:
    op: str  # claim complete release renew | transaction commit join
    kind: str  # ConnectionError | driver | KeyboardInterrupt
    when: str  # before (the call fails, not run) | after (it ran, its reply is lost) | mid
    #            (Redis: the interrupt comes between the script's send and its reply, which
    #            is left unread on the connection)
    times: int  # how many calls fail, then the operation works again


@dataclass(frozen=True)
class ConnFault:
    """A real transient fault, in the handler's first run: killed (the PostgreSQL backend
    of the transaction's own connection terminated), lock_timeout (a row lock held by
    another session, PostgreSQL pessimistic), locked (SQLite, another connection writing),
    pool_killed (every backend of the database terminated while the store's pool holds
    five idle connections: a server restart or failover; before the claim, or in the
    handler after its effect)."""
    kind: str
    point: str


@dataclass(frozen=True)
class Case:
    store: str  # memory sqlite postgres redis
    mode: str  # lease own own-pess caller
    point: str
    fault: str
    outcomes: tuple[str, ...]  # expected per delivery
    runs: tuple[int, ...]  # expected handler runs per delivery
    effects: int  # lease: effect count at the end; transactional: ledger rows at the end
    final: str  # completed | not_stored | failed | none
    handler_fault: HandlerFault | None = None
    store_fault: StoreFault | None = None
    conn_fault: ConnFault | None = None
    unstorable: str | None = None
    policy: str = "fast"  # fast (3 attempts, 1 ms) | default (the decorator's own)
    max_result_bytes: int | None = None
    fast_path: bool = True  # SqlStore(fast_path=...)

    @property
    def id(self) -> str:
        return f"{self.store}-{self.mode}-{self.point}-{self.fault}"


# -- the matrix --------------------------------------------------------------------------------
def lease_cases(store: str) -> Iterator[Case]:
    base = {"store": store, "mode": "lease"}
    for kind in HANDLER_KINDS:
        for point in POINTS:
            # released on the error; the redelivery runs again (so an effect made before
            # the error repeats: the documented lease-mode limit)
            yield Case(**base, point=point, fault=kind, handler_fault=HandlerFault(kind, point),
                       outcomes=("F", "ok", "dup", "dup"), runs=(1, 1, 0, 0),
                       effects=2 if point == "after_effect" else 1, final="completed")
    for point in ("before_effect", "after_effect"):
        yield Case(**base, point=point, fault="kept-ValueError",
                   handler_fault=HandlerFault("ValueError", point, always=True, keep=True),
                   outcomes=("F", "PAF", "PAF", "PAF"), runs=(1, 0, 0, 0),
                   effects=int(point == "after_effect"), final="failed")
    transient = TRANSIENT if store != "memory" else ()  # memory cannot fail transiently
    for kind in transient:
        for when, times, outcomes, runs in (
            ("before", 2, ("ok", "dup", "dup", "dup"), (1, 0, 0, 0)),
            ("before", 3, ("SU", "ok", "dup", "dup"), (0, 1, 0, 0)),
            ("after", 2, ("ok", "dup", "dup", "dup"), (1, 0, 0, 0)),  # same token again
            ("after", 3, ("SU", "AIP", "ok", "dup"), (0, 0, 1, 0)),  # held until it ends
        ):
            yield Case(**base, point="before_claim", fault=f"{kind}-{when}-x{times}",
                       store_fault=StoreFault("claim", kind, when, times),
                       outcomes=outcomes, runs=runs, effects=1, final="completed")
    for when, outcomes, runs in (("before", ("KI", "ok", "dup", "dup"), (0, 1, 0, 0)),
                                 ("after", ("KI", "AIP", "ok", "dup"), (0, 0, 1, 0))):
        yield Case(**base, point="before_claim", fault=f"KeyboardInterrupt-{when}",
                   store_fault=StoreFault("claim", "KeyboardInterrupt", when, 1),
                   outcomes=outcomes, runs=runs, effects=1, final="completed")
    for kind in transient:
        for when, times, outcomes, runs, effects in (
            ("before", 2, ("ok", "dup", "dup", "dup"), (1, 0, 0, 0), 1),
            # the complete never succeeded: the lease runs out, the effect repeats (the
            # one case the contract allows)
            ("before", 3, ("SU", "AIP", "ok", "dup"), (1, 0, 1, 0), 2),
            ("after", 2, ("ok", "dup", "dup", "dup"), (1, 0, 0, 0), 1),
            ("after", 3, ("SU", "dup", "dup", "dup"), (1, 0, 0, 0), 1),  # it did complete
        ):
            yield Case(**base, point="at_complete", fault=f"{kind}-{when}-x{times}",
                       store_fault=StoreFault("complete", kind, when, times),
                       outcomes=outcomes, runs=runs, effects=effects, final="completed")
    for when, outcomes, runs, effects in (
        ("before", ("KI", "AIP", "ok", "dup"), (1, 0, 1, 0), 2),
        ("after", ("KI", "dup", "dup", "dup"), (1, 0, 0, 0), 1),
    ):
        yield Case(**base, point="at_complete", fault=f"KeyboardInterrupt-{when}",
                   store_fault=StoreFault("complete", "KeyboardInterrupt", when, 1),
                   outcomes=outcomes, runs=runs, effects=effects, final="completed")
    if store == "redis":  # interrupted between the send and the reply
        for op, point, outcomes, runs in (
            ("claim", "before_claim", ("KI", "AIP", "ok", "dup"), (0, 0, 1, 0)),
            ("complete", "at_complete", ("KI", "dup", "dup", "dup"), (1, 0, 0, 0)),
        ):
            yield Case(**base, point=point, fault="KeyboardInterrupt-mid-round-trip",
                       store_fault=StoreFault(op, "KeyboardInterrupt", "mid", 1),
                       outcomes=outcomes, runs=runs, effects=1, final="completed")
    # the release after a handler error (RuntimeError before its effect, first run only)
    error = HandlerFault("RuntimeError", "before_effect")
    for kind in transient:
        for when, times, outcomes, runs in (
            ("before", 2, ("F", "ok", "dup", "dup"), (1, 1, 0, 0)),
            ("before", 3, ("F", "AIP", "ok", "dup"), (1, 0, 1, 0)),  # freed when it ends
            ("after", 2, ("F", "ok", "dup", "dup"), (1, 1, 0, 0)),
        ):
            yield Case(**base, point="at_release", fault=f"{kind}-{when}-x{times}",
                       handler_fault=error, store_fault=StoreFault("release", kind, when, times),
                       outcomes=outcomes, runs=runs, effects=1, final="completed")
    release_ki = [("before", ("KI", "AIP", "ok", "dup"), (1, 0, 1, 0)),
                  ("after", ("KI", "ok", "dup", "dup"), (1, 1, 0, 0))]
    if store == "redis":
        release_ki.append(("mid", ("KI", "ok", "dup", "dup"), (1, 1, 0, 0)))
    for when, outcomes, runs in release_ki:
        yield Case(**base, point="at_release", fault=f"KeyboardInterrupt-{when}",
                   handler_fault=error,
                   store_fault=StoreFault("release", "KeyboardInterrupt", when, 1),
                   outcomes=outcomes, runs=runs, effects=1, final="completed")
    # keeping a failure (complete with state failed) while the store fails
    poison = HandlerFault("ValueError", "after_effect", always=True, keep=True)
    for kind in transient:
        for times, outcomes, runs, effects in (
            (2, ("F", "PAF", "PAF", "PAF"), (1, 0, 0, 0), 1),
            # not kept: the key stays held until its lease ends; the handler's own error
            # still surfaces as itself
            (3, ("F", "AIP", "F", "PAF"), (1, 0, 1, 0), 2),
        ):
            yield Case(**base, point="at_keep", fault=f"{kind}-before-x{times}",
                       handler_fault=poison, store_fault=StoreFault("complete", kind, "before",
                                                                    times),
                       outcomes=outcomes, runs=runs, effects=effects, final="failed")
    # a renewal that raises, while the handler runs: nothing changes for the delivery
    renewals = [(k, t) for k in transient for t in (1, 99)] + [("KeyboardInterrupt", 1)]
    for kind, times in renewals:
        yield Case(**base, point="renewal", fault=f"{kind}-x{times}",
                   store_fault=StoreFault("renew", kind, "before", times),
                   outcomes=("ok", "dup", "dup", "dup"), runs=(1, 0, 0, 0), effects=1,
                   final="completed")
    # a result that cannot be stored: completed with the marker, never run again
    unstorable = ["object", "nan", "surrogate", "deep"]
    for what in unstorable:
        yield Case(**base, point="result", fault=f"unstorable-{what}", unstorable=what,
                   outcomes=("ok", "RNS", "RNS", "RNS"), runs=(1, 0, 0, 0), effects=1,
                   final="not_stored")
    if store == "redis":
        for limit in (1024, 64):
            yield Case(**base, point="result", fault=f"too-big-max{limit}", unstorable="big",
                       max_result_bytes=limit, outcomes=("ok", "RNS", "RNS", "RNS"),
                       runs=(1, 0, 0, 0), effects=1, final="not_stored")
    if store == "postgres":  # a server restart: the store's pooled connections die
        for point in ("before_claim", "after_effect"):
            yield Case(**base, point=point, fault="pool-killed",
                       conn_fault=ConnFault("pool_killed", point),
                       outcomes=("ok", "dup", "dup", "dup"), runs=(1, 0, 0, 0), effects=1,
                       final="completed")
    # the decorator's default policy cures one fault
    for op, point in (("claim", "before_claim"), ("complete", "at_complete")):
        if transient:
            yield Case(**base, point=point, fault="ConnectionError-before-x1-default-policy",
                       store_fault=StoreFault(op, "ConnectionError", "before", 1),
                       policy="default", outcomes=("ok", "dup", "dup", "dup"),
                       runs=(1, 0, 0, 0), effects=1, final="completed")


def tx_cases(store: str, mode: str) -> Iterator[Case]:
    base = {"store": store, "mode": mode}
    # OwnConnectionError: a statement of the handler's fails on the transaction's own
    # connection, not transiently (no such table): the transaction's, yet not retried
    for kind in (*HANDLER_KINDS, "OwnConnectionError"):
        for point in POINTS:
            yield Case(**base, point=point, fault=kind, handler_fault=HandlerFault(kind, point),
                       outcomes=("F", "ok", "dup", "dup"), runs=(1, 1, 0, 0), effects=1,
                       final="completed")
    own = mode != "caller"
    ki_outcomes = ("KI", "ok", "dup", "dup")
    if own:
        for kind in TRANSIENT:
            for times, outcomes, runs in ((2, ("ok", "dup", "dup", "dup"), (1, 0, 0, 0)),
                                          (3, ("SU", "ok", "dup", "dup"), (0, 1, 0, 0))):
                yield Case(**base, point="before_claim", fault=f"{kind}-before-x{times}",
                           store_fault=StoreFault("transaction", kind, "before", times),
                           outcomes=outcomes, runs=runs, effects=1, final="completed")
        yield Case(**base, point="before_claim", fault="KeyboardInterrupt-before",
                   store_fault=StoreFault("transaction", "KeyboardInterrupt", "before", 1),
                   outcomes=ki_outcomes, runs=(0, 1, 0, 0), effects=1, final="completed")
        for kind in TRANSIENT:
            for when, times, outcomes, runs in (
                ("before", 2, ("ok", "dup", "dup", "dup"), (3, 0, 0, 0)),  # whole attempts
                ("before", 3, ("SU", "ok", "dup", "dup"), (3, 1, 0, 0)),
                ("after", 3, ("ok", "dup", "dup", "dup"), (1, 0, 0, 0)),  # ambiguous commit
            ):
                yield Case(**base, point="at_commit", fault=f"{kind}-{when}-x{times}",
                           store_fault=StoreFault("commit", kind, when, times),
                           outcomes=outcomes, runs=runs, effects=1, final="completed")
        for when, outcomes, runs in (("before", ki_outcomes, (1, 1, 0, 0)),
                                     ("after", ("KI", "dup", "dup", "dup"), (1, 0, 0, 0))):
            yield Case(**base, point="at_commit", fault=f"KeyboardInterrupt-{when}",
                       store_fault=StoreFault("commit", "KeyboardInterrupt", when, 1),
                       outcomes=outcomes, runs=runs, effects=1, final="completed")
        for op, point in (("transaction", "before_claim"), ("commit", "at_commit")):
            yield Case(**base, point=point, fault="ConnectionError-before-x1-default-policy",
                       store_fault=StoreFault(op, "ConnectionError", "before", 1),
                       policy="default", outcomes=("ok", "dup", "dup", "dup"),
                       runs=(2 if op == "commit" else 1, 0, 0, 0), effects=1,
                       final="completed")
        # real faults of the transaction's own connection: the attempt is retried whole
        real: list[tuple[str, str]] = []
        if store == "postgres":
            real += [("killed", "before_effect"), ("killed", "after_effect")]
            for fast_path in (True, False):  # a server restart, on both PostgreSQL paths
                yield Case(**base, point="before_claim",
                           fault="pool-killed" + ("" if fast_path else "-plain-path"),
                           conn_fault=ConnFault("pool_killed", "before_claim"),
                           fast_path=fast_path, outcomes=("ok", "dup", "dup", "dup"),
                           runs=(1, 0, 0, 0), effects=1, final="completed")
            if mode == "own-pess":
                real.append(("lock_timeout", "before_effect"))
        elif mode == "own":
            real.append(("locked", "before_effect"))
        for kind, point in real:
            yield Case(**base, point=point, fault=f"own-connection-{kind}",
                       conn_fault=ConnFault(kind, point), outcomes=("ok", "dup", "dup", "dup"),
                       runs=(2, 0, 0, 0), effects=1, final="completed")
    else:
        # the caller's transaction is not retried by us: the store's error surfaces as it
        # is, the SAVEPOINT leaves nothing, the caller commits the rest
        for op, point in (("join", "before_claim"), ("commit", "at_commit")):
            ran = 1 if op == "commit" else 0
            for kind in (*TRANSIENT, "KeyboardInterrupt"):
                for when in ("before", "after"):
                    yield Case(**base, point=point, fault=f"{kind}-{when}",
                               store_fault=StoreFault(op, kind, when, 1),
                               outcomes=("KI" if kind == "KeyboardInterrupt" else "inj", "ok",
                                         "dup", "dup"),
                               runs=(ran, 1, 0, 0), effects=1, final="completed")
    # a result that cannot be stored: nothing is recorded, every delivery runs and says so
    for what in ("object", "nan", "surrogate", "deep"):
        yield Case(**base, point="result", fault=f"unstorable-{what}", unstorable=what,
                   outcomes=("RNSer",) * 4, runs=(1, 1, 1, 1), effects=0, final="none")


#: Cells that fail because of a library bug, by id: the bug in one line.
KNOWN_BUGS: dict[str, str] = {}  # none open: each bug found here was fixed


def all_cases() -> list[Any]:
    """Every cell, each once, with the known bugs marked."""
    cases: list[Case] = []
    for store in ("memory", "sqlite", "postgres", "redis"):
        cases += lease_cases(store)
    for store in ("sqlite", "postgres"):
        for mode in ("own", "own-pess", "caller"):
            cases += tx_cases(store, mode)
    ids = {c.id for c in cases}
    assert set(KNOWN_BUGS) <= ids, set(KNOWN_BUGS) - ids
    params = []
    for case in cases:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case.id])] \
            if case.id in KNOWN_BUGS else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


CASES = all_cases()


# -- one cell ------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One cell's world: its stores, its handler's runs, effects and exceptions."""

    case: Case
    backends: Backends
    pid: str
    clock: Clock = field(default_factory=Clock)
    delivery: int = 0
    runs: list[int] = field(default_factory=list)  # the delivery of each handler run
    returned: list[Any] = field(default_factory=list)  # what runs returned, in order
    raised: list[tuple[int, BaseException]] = field(default_factory=list)  # (delivery, exc)
    effects: list[int] = field(default_factory=list)  # lease: the delivery of each effect
    injected: list[BaseException] = field(default_factory=list)
    renew_failed: int = 0
    renew_ok_after_failure: int = 0
    renewal_seen: bool | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    store: Any = None
    base: SqlStore | None = None

    # the stores --------------------------------------------------------------------------
    def make_store(self) -> Any:
        c = self.case
        if c.store == "memory":
            store: Any = MemoryStore(clock=self.clock)
        elif c.store == "redis":
            store = RedisStore(self.backends.redis_url(), clock=self.clock,
                               **({} if c.max_result_bytes is None
                                  else {"max_result_bytes": c.max_result_bytes}))
            self.cleanups.append(store.close)
        else:
            self.base = self.backends.base(c.store)
            if c.conn_fault is not None and c.conn_fault.kind == "locked":
                # a busy timeout short enough for a lock held by another connection
                store = SqlStore(f"sqlite:///{self.backends.sqlite_path()}", lock_timeout=0.05)
                self.cleanups.append(store.engine.dispose)
            elif c.conn_fault is not None and c.conn_fault.kind == "lock_timeout":
                store = SqlStore(self.base.engine, lock_timeout=0.05)
            elif c.mode == "lease":
                store = SqlStore(self.base.engine, clock=self.clock)
            else:
                store = SqlStore(self.base.engine, fast_path=c.fast_path)
            if c.conn_fault is not None and c.conn_fault.kind == "pool_killed":
                self.cleanups.append(self.base.engine.dispose)  # no dead ones for others
        if c.store_fault is not None:
            self.install(store, c.store_fault)
        self.store = store
        return store

    def install(self, store: Any, spec: StoreFault) -> None:
        """Wrap ``spec.op`` of ``store`` so that ``spec.times`` calls fail."""
        left = [spec.times]

        def fail() -> None:
            exc = store_exception(spec.kind, self.case.store, spec.op)
            with self.lock:
                self.injected.append(exc)
                if spec.op == "renew":
                    self.renew_failed += 1
            raise exc

        def due() -> bool:
            with self.lock:
                if left[0] <= 0:
                    return False
                left[0] -= 1
                return True

        armed = threading.local()
        if spec.when == "mid":
            import idempotent.stores.redis as redis_module

            assert store._direct is not None  # the store's own kept connections
            store.load_scripts()  # so the interrupted EVALSHA is the script run, no NOSCRIPT
            real_roundtrip = redis_module._roundtrip

            def roundtrip(conn: Any, args: tuple[Any, ...]) -> Any:
                if not getattr(armed, "on", False) or not due():
                    return real_roundtrip(conn, args)
                conn.send_command(*args)
                assert conn.can_read(timeout=DEADLINE)  # the reply is there, unread
                fail()

            redis_module._roundtrip = roundtrip
            self.cleanups.append(lambda: setattr(redis_module, "_roundtrip", real_roundtrip))

        def faulty(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                if spec.when == "before" and due():
                    fail()
                armed.on = True
                try:
                    out = fn(*args, **kwargs)
                finally:
                    armed.on = False
                if spec.when == "after" and due():
                    fail()
                if spec.op == "renew":
                    with self.lock:
                        self.renew_ok_after_failure += self.renew_failed > 0
                return out
            return call

        if spec.op in ("claim", "complete", "release", "renew", "transaction", "join"):
            setattr(store, spec.op, faulty(getattr(store, spec.op)))
            return
        assert spec.op == "commit"
        if self.case.mode == "caller":
            real_join = store.join

            def join(*args: Any, **kwargs: Any) -> Any:
                tx = real_join(*args, **kwargs)
                tx.commit = faulty(tx.commit)
                return tx
            store.join = join
            return
        real_transaction = store.transaction

        @contextlib.contextmanager
        def transaction(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with real_transaction(*args, **kwargs) as tx:
                tx.commit = faulty(tx.commit)
                yield tx
        store.transaction = transaction

    # the handler -----------------------------------------------------------------------------
    def fire(self, run: int, point: str, conn: sa.Connection | None) -> None:
        hf = self.case.handler_fault
        if hf is None or hf.point != point or not (hf.always or run == 1):
            return
        if hf.kind == "OwnConnectionError":
            assert conn is not None
            try:
                conn.exec_driver_sql("SELECT * FROM no_such_table_in_the_matrix")
            except sa.exc.DBAPIError as exc:
                self.raised.append((self.delivery, exc))
                raise
            raise AssertionError("a missing table was found")
        exc = handler_exception(hf.kind, point)
        self.raised.append((self.delivery, exc))
        raise exc

    def connection_fault(self, run: int, point: str, conn: sa.Connection | None) -> None:
        cf = self.case.conn_fault
        if cf is None or cf.point != point or run != 1:
            return
        if cf.kind == "pool_killed":
            self.kill_pool()
            return
        assert conn is not None
        if cf.kind == "killed":  # the backend under the handler's connection goes away
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            # before the effect its statement meets the dead connection, after it the
            # commit does
            assert self.backends.pg_server().terminate_backends(pid=pid) == [pid]
            return
        if cf.kind == "lock_timeout":  # a row another session holds: lock_timeout
            blocker = self.backends.pg_server().connect(_dbname(self.base), autocommit=False)
            try:
                blocker.execute("SELECT id FROM locks WHERE id = 1 FOR UPDATE")
                conn.execute(sa.select(locks.c.id).where(locks.c.id == 1).with_for_update())
            finally:
                blocker.rollback()
                blocker.close()
            raise AssertionError("the locked row was not waited for")
        assert cf.kind == "locked"  # another connection writes: SQLITE_BUSY
        blocker_db = sqlite3.connect(self.backends.sqlite_path(), timeout=0,
                                     isolation_level=None)
        try:
            blocker_db.execute("BEGIN IMMEDIATE")
            conn.execute(ledger.insert().values(payment_id=self.pid, cents=-1))
        finally:
            blocker_db.execute("ROLLBACK")
            blocker_db.close()
        raise AssertionError("the write was not blocked")

    def warm_pool(self) -> None:
        """Five idle connections in the store's pool (a worker that has been busy)."""
        assert self.base is not None
        engine = self.base.engine
        engine.dispose()
        conns = [engine.connect() for _ in range(5)]
        for conn in conns:
            conn.exec_driver_sql("SELECT 1")
        for conn in conns:
            conn.close()

    def kill_pool(self) -> None:
        """Every backend of the database terminated (and gone), as a restart does."""
        assert len(self.backends.pg_server().terminate_backends(
            dbname=_dbname(self.base))) >= 5

    def before_delivery(self) -> None:
        cf = self.case.conn_fault
        if cf is None or cf.kind != "pool_killed" or self.delivery != 0:
            return
        self.warm_pool()
        if cf.point == "before_claim":
            self.kill_pool()

    def result_of(self, run: int) -> Any:
        what = self.case.unstorable
        if what is None:
            return {"paid": self.pid, "cents": 500, "run": run}
        if what == "object":
            return object()
        if what == "nan":
            return {"amount": float("nan")}
        if what == "surrogate":
            return {"memo": "\ud800"}
        if what == "big":
            return "x" * 2000
        assert what == "deep"
        value: Any = []
        for _ in range(50_000):
            value = [value]
        return value

    def body(self, msg: dict[str, Any], conn: sa.Connection | None) -> Any:
        self.runs.append(self.delivery)
        run = len(self.runs)
        self.fire(run, "handler_start", conn)
        assert current_key() == msg["payment_id"]
        if conn is not None:  # some work on the transaction before the effect
            conn.execute(sa.select(sa.func.count()).select_from(ledger)
                         .where(ledger.c.payment_id == self.pid)).scalar()
        self.connection_fault(run, "before_effect", conn)
        self.fire(run, "before_effect", conn)
        if conn is None:
            self.effects.append(self.delivery)  # the external effect (a PSP charge)
        else:
            conn.execute(ledger.insert().values(payment_id=self.pid, cents=msg["cents"]))
        self.connection_fault(run, "after_effect", conn)
        self.fire(run, "after_effect", conn)
        sf = self.case.store_fault
        if sf is not None and sf.op == "renew" and run == 1:
            # run until the heartbeat has met the fault (and, once it is cured, renewed)
            need_ok = sf.times < 99
            self.renewal_seen = wait_until(
                lambda: self.renew_failed >= (1 if need_ok else 2)
                and (not need_ok or self.renew_ok_after_failure >= 1))
        value = self.result_of(run)
        self.returned.append(value)
        return value

    def handler(self) -> Callable[..., Any]:
        c = self.case
        options: dict[str, Any] = {"key": "payment_id", "namespace": NS}
        if c.policy == "fast":
            options["retry"] = FAST
        if c.mode == "lease":
            options["lease"] = RENEW_LEASE if c.point == "renewal" else LEASE
            if c.handler_fault is not None and c.handler_fault.keep:
                options["keep_failures"] = (ValueError,)
        else:
            options["optimistic"] = c.mode != "own-pess"
        store = self.make_store()
        if c.mode == "lease":
            @idempotent(store, **options)
            def pay(msg: dict[str, Any]) -> Any:
                return self.body(msg, None)
        else:
            @idempotent(store, **options)
            def pay(msg: dict[str, Any], *, connection: sa.Connection) -> Any:
                return self.body(msg, connection)
        return pay

    # deliveries -----------------------------------------------------------------------------
    def deliver(self, pay: Callable[..., Any], msg: dict[str, Any]) -> Any:
        if self.case.mode != "caller":
            return pay(msg)
        assert self.base is not None
        caught: BaseException | None = None
        with self.base.engine.connect() as conn, conn.begin():  # a batch consumer
            conn.execute(rest.insert().values(payment_id=self.pid, part="before"))
            try:
                value = pay(msg, connection=conn)
            except BaseException as exc:  # it moves on and commits the rest of the batch
                caught = exc
            conn.execute(rest.insert().values(payment_id=self.pid, part="after"))
        if caught is not None:
            raise caught
        return value

    def classify_value(self, value: Any, ran: int) -> str:
        if not self.returned:
            return "returned-without-a-run"
        last = self.returned[-1]
        if self.case.unstorable is not None:
            return "ok" if ran and value is last else "unexpected-value"
        if value != json.loads(json.dumps(last)):
            return f"wrong-value:{value!r}"
        return "ok" if ran else "dup"

    def classify_error(self, exc: BaseException) -> str:
        if any(e is exc for d, e in self.raised if d == self.delivery):
            return "F"
        if any(e is exc for e in self.injected):
            return "KI" if isinstance(exc, KeyboardInterrupt) else "inj"
        if isinstance(exc, StoreUnavailable):
            if any(e is exc.cause for e in self.injected):
                return "SU"
            return f"SU(cause={exc.cause!r})"
        if isinstance(exc, AlreadyInProgress):
            return "AIP"
        if isinstance(exc, ResultNotStored):
            return "RNS"
        if isinstance(exc, PreviousAttemptFailed):
            return "PAF"
        if isinstance(exc, ResultNotSerializable):
            return "RNSer"
        return f"{type(exc).__name__}({exc})"

    # what is recorded ---------------------------------------------------------------------------
    def record(self) -> Any:
        if self.base is None:
            return self.store.get(NS, self.pid)
        return self.backends.reader(self.case.store).get(NS, self.pid)

    def rows(self, table: sa.Table = ledger) -> int:
        with self.backends.reader(self.case.store).engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                    .where(table.c.payment_id == self.pid)).scalar_one())

    def final_state(self) -> str:
        rec = self.record()
        if rec is None:
            return "none"
        if rec.state is State.COMPLETED and rec.result is not None \
                and rec.result.startswith(NOT_STORED_PREFIX):
            return "not_stored"
        return str(rec.state.value)

    def check(self, outcome: str, violations: list[str]) -> None:
        """The invariant, after each delivery."""
        i, rec = self.delivery, self.record()
        completed = rec is not None and rec.state is State.COMPLETED
        lost_reply = self.case.store_fault is not None and self.case.store_fault.when == "after"
        if outcome == "SU" and completed and not lost_reply:
            violations.append(f"delivery {i}: StoreUnavailable, yet the key is completed")
        if self.case.mode == "lease":
            if completed and not self.effects:
                violations.append(f"delivery {i}: completed without an effect")
            return
        n = self.rows()
        if n > 1:
            violations.append(f"delivery {i}: {n} ledger rows")
        if completed != (n == 1):
            violations.append(f"delivery {i}: record {rec and rec.state} but {n} ledger rows")
        if rec is not None and rec.state is not State.COMPLETED:
            violations.append(f"delivery {i}: a transactional record in state {rec.state}")
        if self.case.mode == "caller" and self.rows(rest) != 2 * (i + 1):
            violations.append(f"delivery {i}: the caller's rest was not committed")


def _dbname(store: SqlStore | None) -> str:
    assert store is not None
    name = store.engine.url.database
    assert name
    return name


@pytest.mark.parametrize("case", CASES)
def test_fault_matrix(case: Case, backends: Backends) -> None:
    cell = Cell(case, backends, pid=f"pay-{next(_ids)}-{time.monotonic_ns() % 10**9}")
    try:
        pay = cell.handler()
        msg = {"payment_id": cell.pid, "cents": 500}
        outcomes: list[str] = []
        runs: list[int] = []
        violations: list[str] = []
        for i in range(DELIVERIES):
            cell.delivery = i
            cell.before_delivery()
            before = len(cell.runs)
            try:
                outcome = cell.classify_value(cell.deliver(pay, msg), len(cell.runs) - before)
            except BaseException as exc:  # every kind, KeyboardInterrupt included
                outcome = cell.classify_error(exc)
                if isinstance(exc, AlreadyInProgress):  # the broker waits it out
                    cell.clock.advance(exc.retry_after + 1.0)
            outcomes.append(outcome)
            runs.append(len(cell.runs) - before)
            cell.check(outcome, violations)
        effects = len(cell.effects) if case.mode == "lease" else cell.rows()
        actual = {"outcomes": tuple(outcomes), "runs": tuple(runs), "effects": effects,
                  "final": cell.final_state(), "violations": violations}
        expected = {"outcomes": case.outcomes, "runs": case.runs, "effects": case.effects,
                    "final": case.final, "violations": []}
        assert actual == expected
        if case.final == "completed":  # the stored result is the last returned one
            rec = cell.record()
            assert json.loads(rec.result) == json.loads(json.dumps(cell.returned[-1]))
        if case.final == "failed":
            assert json.loads(cell.record().result)["error"] == "ValueError"
        sf = case.store_fault
        if sf is not None:  # the fault did happen
            assert cell.injected, "the injected fault never fired"
            if sf.op == "renew":
                assert cell.renewal_seen, "the handler never saw the renewal fail"
    finally:
        for cleanup in reversed(cell.cleanups):
            cleanup()


# -- clock skew: two workers, one live lease -----------------------------------------------------
def _lease_store(kind: str, backends: Backends, clock: Callable[[], float] | None) -> Any:
    if kind == "redis":
        return RedisStore(backends.redis_url(), clock=clock)
    return SqlStore(backends.base(kind).engine, clock=clock)


@contextlib.contextmanager
def _host_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This host's clock (``time.time``) runs ``seconds`` off inside the block."""
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: _real_time() + seconds)
        yield


def _try_to_take_over(store: Any, key: str) -> tuple[str, list[str]]:
    runs: list[str] = []

    @idempotent(store, key="payment_id", namespace=NS + ".skew", lease=5, retry=FAST,
                heartbeat=False)
    def pay(msg: dict[str, Any]) -> str:
        runs.append(msg["payment_id"])
        return "charged again"

    try:
        pay({"payment_id": key})
    except AlreadyInProgress:
        return "AlreadyInProgress", runs
    return "ran", runs


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
@pytest.mark.parametrize("holder_skew,taker_skew", [(-10.0, 10.0), (10.0, -10.0)])
def test_injected_clock_skew_never_takes_over_a_live_lease(
        kind: str, holder_skew: float, taker_skew: float, backends: Backends) -> None:
    """Two stores on one server, their clocks injected 10 s apart either way, default
    lease: the one whose clock is ahead (or behind) never takes the other's live lease."""
    holder = _lease_store(kind, backends, lambda: _real_time() + holder_skew)
    taker = _lease_store(kind, backends, lambda: _real_time() + taker_skew)
    key = f"skew-{next(_ids)}"
    try:
        claimed = holder.claim(NS + ".skew", key, fingerprint=None)
        assert type(claimed).__name__ == "Claimed"
        assert _try_to_take_over(taker, key) == ("AlreadyInProgress", [])
        holder.complete(NS + ".skew", key, claimed.token, b'"charged"')  # still its own
    finally:
        for s in (holder, taker):
            if isinstance(s, RedisStore):
                s.close()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
@pytest.mark.parametrize("holder_skew,taker_skew", [(0.0, 60.0), (-60.0, 0.0)])
def test_a_skewed_host_clock_never_takes_over_a_live_lease(
        kind: str, holder_skew: float, taker_skew: float, backends: Backends,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Time is the store's: a worker whose host clock runs a minute ahead does not take
    over a 5 s lease that another worker holds, nor does a worker on a correct clock take
    over the lease of one whose clock runs a minute behind (no clock injected)."""
    holder = _lease_store(kind, backends, None)
    taker = _lease_store(kind, backends, None)
    key = f"skew-{next(_ids)}"
    try:
        with _host_clock(monkeypatch, holder_skew):
            claimed = holder.claim(NS + ".skew", key, fingerprint=None, lease=5)
        assert type(claimed).__name__ == "Claimed"
        with _host_clock(monkeypatch, taker_skew):
            attempt = _try_to_take_over(taker, key)
        assert attempt == ("AlreadyInProgress", [])
        with _host_clock(monkeypatch, holder_skew):
            holder.complete(NS + ".skew", key, claimed.token, b'"charged"')
    finally:
        for s in (holder, taker):
            if isinstance(s, RedisStore):
                s.close()


def test_the_matrix_is_what_it_says() -> None:
    """Every store x mode x point is in the matrix, and no cell id repeats."""
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))
    combos = {(p.values[0].store, p.values[0].mode) for p in CASES}
    assert combos == {("memory", "lease"), ("sqlite", "lease"), ("postgres", "lease"),
                      ("redis", "lease")} | {(s, m) for s in ("sqlite", "postgres")
                                              for m in ("own", "own-pess", "caller")}
    points = {p.values[0].point for p in CASES}
    assert points == {"before_claim", "handler_start", "before_effect", "after_effect",
                      "at_complete", "at_commit", "at_release", "at_keep", "renewal",
                      "result"}

