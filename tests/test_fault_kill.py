"""The SIGKILL column of the fault matrix (issue 9): a worker process killed at each point
of one delivery, on the real servers.

Each cell starts ``tests/_kill_worker.py`` in a process of its own, which delivers one
payment through ``@idempotent`` and SIGKILLs itself at one point: before the claim, at
the handler's start, in the handler before or after its effect, before the key's
complete or commit, or right after it (lease mode: after ``complete`` returned; our own
transaction: after ``Transaction.commit`` committed; the caller's transaction: before and
after the caller's own COMMIT). Nothing of the worker runs after the signal: no
``finally``, no rollback, no release; the database or Redis sees a client vanish.

The test reaps the worker (it must have died of SIGKILL, at the point it was sent to),
looks at what was left, then redelivers the same payment in-process as a broker would:
up to three times, until one is acknowledged (it ran, or it is a duplicate); a delivery
that finds the killed worker's live lease gets `AlreadyInProgress`, and the broker waits
(polling the store's record until the lease has run out on the store's clock, with a
deadline). A further duplicate must then return the first stored result.

What must hold:

* **transactional** (our transaction, optimistic and ``optimistic=False``; the caller's):
  after the kill and after each delivery, the ledger holds at most one row of the
  payment and the key's record is committed iff that row is; at the end exactly one row,
  with the right amount, and a completed key whose result is that run's;
* **lease**: the handler runs again only when the killed run died before its complete
  was stored; the provider shows two charges only when the kill came after the effect
  and before complete (the documented limit; both charges carry the same idempotency
  key, for the provider to deduplicate), otherwise one; the key ends completed;
* in every cell the payment is applied (nothing lost), and in transactional mode never
  twice.

A second test kills the holder of a pessimistic claim (PostgreSQL, ``optimistic=False``
and the caller's transaction) while a duplicate delivery is blocked on its uncommitted
key: the duplicate must then take the key and run, once.

The SQL stores are module-wide (one SQLite file; one PostgreSQL database on the suite's
session server, not a ``pg_url`` database per cell) and each cell has its own payment id;
the Redis cells use a database of the session redis-server and keep their provider table
in the SQLite file.

Cells that fail because of a library bug are marked ``xfail(strict=True)`` with the bug in
one line; see `KNOWN_BUGS`.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from _kill_worker import NS, Payments, ledger, meta, provider, rest

from idempotent import AlreadyInProgress, SqlStore, State
from idempotent.stores.redis import RedisStore

WORKER = Path(__file__).with_name("_kill_worker.py")
REPO = Path(__file__).resolve().parent.parent
REDELIVERIES = 3
DEADLINE = 10.0  # the longest wait on a condition (never reached when things work)
WORKER_TIMEOUT = 60.0
CENTS = 1234
REDIS_DB = 13  # not the conftest's 9 nor the fault matrix's 12
_ids = itertools.count(1)


# -- the backends: one SQLite file, one PostgreSQL database, one Redis db for the module ----
class Backends:
    """Lazily made, module-wide, on the suite's session servers: the SQLite file and a
    PostgreSQL database with the schema (records, ledger, provider, batch rest), a Redis
    database. Each cell has its own payment id; Redis cells keep their provider table in
    the SQLite file."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path) -> None:
        self._request, self._tmp = request, tmp
        self._stores: dict[str, SqlStore] = {}
        self._urls: dict[str, str] = {}
        self._redis_url: str | None = None
        self._pg_name: str | None = None

    def url(self, kind: str) -> str:
        self.sql(kind)
        return self._urls[kind]

    def sql(self, kind: str) -> SqlStore:
        """The module's SqlStore of ``kind``, with the schema."""
        if kind not in self._stores:
            if kind == "sqlite":
                url = f"sqlite:///{self._tmp / 'kill.db'}"
            else:
                server = self._request.getfixturevalue("pg_server")
                self._pg_name = f"fault_kill_{os.getpid()}_{next(_ids)}"
                server.create_database(self._pg_name)
                url = server.url_for(self._pg_name)
            store = SqlStore(url)
            store.create_schema()
            meta.create_all(store.engine)
            self._stores[kind], self._urls[kind] = store, url
        return self._stores[kind]

    def redis_url(self) -> str:
        if self._redis_url is None:
            server = self._request.getfixturevalue("redis_server")
            self._redis_url = server.url_for(REDIS_DB)
            with redis.Redis.from_url(self._redis_url) as client:
                client.flushdb()
        return self._redis_url

    def close(self) -> None:
        for store in self._stores.values():
            store.engine.dispose()
        if self._pg_name is not None:
            self._request.getfixturevalue("pg_server").drop_database(self._pg_name)
        if self._redis_url is not None:
            with redis.Redis.from_url(self._redis_url) as client:
                client.flushdb()


@pytest.fixture(scope="module")
def backends(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    b = Backends(request, tmp_path_factory.mktemp("fault_kill"))
    yield b
    b.close()


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# -- the matrix ----------------------------------------------------------------------------------
HANDLER = ("before_claim", "handler_start", "before_effect", "after_effect")
POINTS_OF = {
    "lease": (*HANDLER, "at_complete", "after_complete"),
    "own": (*HANDLER, "at_commit", "after_commit"),
    "own-pess": (*HANDLER, "at_commit", "after_commit"),
    # at_complete: before the result is written in the caller's transaction; at_commit:
    # the handler returned, before the caller's COMMIT; after_commit: after it
    "caller": (*HANDLER, "at_complete", "at_commit", "after_commit"),
}
COMBOS = (("sqlite", "lease"), ("postgres", "lease"), ("redis", "lease"),
          *((s, m) for s in ("sqlite", "postgres") for m in ("own", "own-pess", "caller")))


@dataclass(frozen=True)
class Cell:
    store: str  # sqlite postgres redis
    mode: str  # lease own own-pess caller
    point: str

    @property
    def id(self) -> str:
        return f"{self.store}-{self.mode}-{self.point}"

    @property
    def lease(self) -> bool:
        return self.mode == "lease"

    # what the contract says the kill leaves behind
    @property
    def done_by_worker(self) -> bool:
        """Lease: the complete was stored; transactional: the key and the row committed."""
        return self.point in ("after_complete", "after_commit")

    @property
    def worker_effects(self) -> int:
        """Lease: charges the killed worker made at the provider."""
        return int(self.point in ("after_effect", "at_complete", "after_complete"))

    @property
    def leaves_lease(self) -> bool:
        """Lease: the worker died holding a live lease (redeliveries wait it out)."""
        return self.lease and self.point not in ("before_claim", "after_complete")


#: Cells that fail because of a library bug: id -> the bug in one line.
KNOWN_BUGS: dict[str, str] = {}

CELLS = [
    pytest.param(cell, id=cell.id, marks=[pytest.mark.postgres] * (cell.store == "postgres")
                 + ([pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[cell.id])]
                    if cell.id in KNOWN_BUGS else []))
    for store, mode in COMBOS for point in POINTS_OF[mode]
    for cell in [Cell(store, mode, point)]
]


# -- one cell ------------------------------------------------------------------------------------
class Run:
    """One cell: its stores (the test's own, for the redeliveries and for reading what
    was recorded) and the payment."""

    def __init__(self, cell: Cell, backends: Backends, tmp_path: Path) -> None:
        self.cell, self.tmp = cell, tmp_path
        self.pid = f"pay-{cell.id}-{next(_ids)}-{time.monotonic_ns() % 10**9}"
        self.msg = {"payment_id": self.pid, "cents": CENTS}
        # the provider's table: in the store's database; for Redis in the SQLite file
        db = "sqlite" if cell.store == "redis" else cell.store
        self.sql = backends.sql(db)
        self.sql_url = backends.url(db)
        self.store: Any
        if cell.store == "redis":
            self.url = backends.redis_url()
            self.store = RedisStore(self.url)
        else:
            self.url = self.sql_url
            self.store = self.sql

    def close(self) -> None:
        if isinstance(self.store, RedisStore):
            self.store.close()

    def start_worker(self, hold: Path | None = None) -> subprocess.Popen[bytes]:
        """Start the worker, which delivers the payment and dies at the cell's point."""
        spec = {"store": self.cell.store, "url": self.url, "provider_url": self.sql_url,
                "mode": self.cell.mode, "payment_id": self.pid, "cents": CENTS,
                "point": self.cell.point, "marker": str(self.marker),
                "hold": None if hold is None else str(hold)}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    @property
    def marker(self) -> Path:
        return self.tmp / "killed-at"

    def reap(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for the worker: it must have died of SIGKILL, at the cell's point."""
        try:
            out, err = proc.communicate(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the worker hung: {err.decode(errors='replace')[-2000:]}")
        assert proc.returncode == -signal.SIGKILL, (
            f"the worker exited {proc.returncode}, not by SIGKILL:\n"
            f"{out.decode(errors='replace')}{err.decode(errors='replace')[-3000:]}")
        assert self.marker.read_text() == self.cell.point

    def kill_worker(self) -> None:
        self.reap(self.start_worker())

    # what is recorded
    def record(self) -> Any:
        return self.store.get(NS, self.pid)

    def count(self, table: sa.Table) -> int:
        with self.sql.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                    .where(table.c.payment_id == self.pid)).scalar_one())

    def rows(self, table: sa.Table) -> list[Any]:
        with self.sql.engine.connect() as conn:
            return list(conn.execute(sa.select(table).where(table.c.payment_id == self.pid)
                                     .order_by(table.c.id)))

    def lease_over(self) -> bool:
        """The killed worker's lease has run out on the store's clock (or it is gone)."""
        rec = self.record()
        return (rec is None or rec.state is not State.IN_PROGRESS
                or rec.lease_until is None or rec.lease_until <= self.store.now())

    def check_transactional(self, when: str, violations: list[str]) -> None:
        """At most one ledger row, and the key's record committed iff the row is."""
        n, rec = self.count(ledger), self.record()
        if n > 1:
            violations.append(f"{when}: {n} ledger rows")
        if (rec is not None) != (n == 1):
            violations.append(f"{when}: record {rec and rec.state} but {n} ledger rows")
        if rec is not None and rec.state is not State.COMPLETED:
            violations.append(f"{when}: a transactional record in state {rec.state}")


def classify(value: Any, ran: int, handler: Payments, stored: Any) -> str:
    """A delivery's value: ``ok`` (it ran and returned its own value) or ``dup`` (it did
    not run and returned the stored result)."""
    if ran:
        return "ok" if ran == 1 and value is handler.returned[-1] else f"ran{ran}:{value!r}"
    if stored is None or stored.result is None:
        return f"dup-without-a-result:{value!r}"
    return "dup" if value == json.loads(stored.result) else f"wrong-dup:{value!r}"


@pytest.mark.parametrize("cell", CELLS)
def test_sigkill(cell: Cell, backends: Backends, tmp_path: Path) -> None:
    run = Run(cell, backends, tmp_path)
    try:
        _check_cell(cell, run)
    finally:
        run.close()


def _check_cell(cell: Cell, run: Run) -> None:
    violations: list[str] = []
    run.kill_worker()

    # what the kill left
    rec = run.record()
    if cell.lease:
        assert run.count(provider) == cell.worker_effects
        if cell.point == "before_claim":
            assert rec is None
        elif cell.done_by_worker:
            assert rec is not None and rec.state is State.COMPLETED
        else:
            assert rec is not None and rec.state is State.IN_PROGRESS
        worker_token = None if rec is None else rec.token
    else:
        run.check_transactional("after the kill", violations)
        assert run.count(ledger) == int(cell.done_by_worker)
        if cell.mode == "caller":  # the caller's batch committed iff the payment did
            assert run.count(rest) == int(cell.done_by_worker)

    # the broker redelivers until one delivery is acknowledged
    handler = Payments(run.store, cell.mode, run.sql.engine, "redelivery")
    outcomes: list[str] = []
    for i in range(REDELIVERIES):
        before, seen = handler.runs, run.record()
        try:
            value = handler.deliver(run.msg, run.sql.engine)
        except AlreadyInProgress as exc:
            outcomes.append("AIP")
            now = run.record()
            if not (cell.leaves_lease and now is not None and now.state is State.IN_PROGRESS
                    and now.token == worker_token and exc.retry_after > 0):
                violations.append(f"delivery {i}: AlreadyInProgress on {now}")
            # the broker waits: until the lease has run out on the store's clock
            if not wait_until(run.lease_over):
                violations.append(f"delivery {i}: the lease never ran out")
            continue
        ran = handler.runs - before
        outcome = classify(value, ran, handler, run.record())
        outcomes.append(outcome)
        if ran and cell.lease and seen is not None and not (
                seen.lease_until is not None and seen.lease_until <= run.store.now()):
            violations.append(f"delivery {i}: ran while the lease of {seen} was live")
        if not cell.lease:
            run.check_transactional(f"delivery {i}", violations)
        if outcome in ("ok", "dup"):
            break

    # a further duplicate gets the first stored result, without a run
    stored = run.record()
    runs_before = handler.runs
    again = handler.deliver(run.msg, run.sql.engine)
    assert handler.runs == runs_before
    assert stored is not None and stored.state is State.COMPLETED
    assert again == json.loads(stored.result)

    # the cell, as one value
    redelivered_runs = handler.runs
    expected_by = "worker" if cell.done_by_worker else "redelivery"
    if cell.lease:
        effects = run.rows(provider)
        actual = {
            "outcomes": tuple(o for o in outcomes if o != "AIP"),
            "waits": outcomes.count("AIP") <= 1,
            "runs": redelivered_runs,
            "effects": len(effects),
            "effect keys": {r.idem_key for r in effects},
            "effects by": tuple(r.by for r in effects),
            "result": again,
            "violations": violations,
        }
        expected = {
            "outcomes": ("dup",) if cell.done_by_worker else ("ok",),
            "waits": True,
            "runs": int(not cell.done_by_worker),
            "effects": cell.worker_effects + int(not cell.done_by_worker),
            "effect keys": {run.pid},  # every charge under the payment's own key
            "effects by": ("worker",) * cell.worker_effects
                          + ("redelivery",) * int(not cell.done_by_worker),
            "result": {"payment_id": run.pid, "cents": CENTS, "by": expected_by},
            "violations": [],
        }
    else:
        entries = run.rows(ledger)
        actual = {
            "outcomes": tuple(outcomes),
            "runs": redelivered_runs,
            "ledger": [(r.cents, r.by) for r in entries],
            "result": again,
            "violations": violations,
        }
        expected = {
            "outcomes": ("dup",) if cell.done_by_worker else ("ok",),
            "runs": int(not cell.done_by_worker),
            "ledger": [(CENTS, expected_by)],
            "result": {"payment_id": run.pid, "cents": CENTS, "by": expected_by},
            "violations": [],
        }
        if cell.mode == "caller":  # each committed caller transaction kept its rest
            actual["rest"] = run.count(rest)
            expected["rest"] = int(cell.done_by_worker) + len(outcomes) + 1
    assert actual == expected


def test_the_matrix_is_what_it_says() -> None:
    """Every store x mode x point is here once."""
    ids = [p.id for p in CELLS]
    assert len(ids) == len(set(ids)) == 56
    assert {(p.values[0].store, p.values[0].mode) for p in CELLS} == set(COMBOS)
    assert set(KNOWN_BUGS) <= set(ids) | {"wait-" + p.id.split("-", 1)[1] for p in WAITING}


# -- a duplicate waiting on the key when its holder is killed -----------------------------------
WAITING = [
    pytest.param(Cell("postgres", mode, point), id=f"postgres-{mode}-{point}",
                 marks=[pytest.mark.postgres]
                 + ([pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[f"wait-{mode}-{point}"])]
                    if f"wait-{mode}-{point}" in KNOWN_BUGS else []))
    for mode in ("own-pess", "caller") for point in ("after_effect", "at_commit")
]


def _lock_waiters(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one())


@pytest.mark.parametrize("cell", WAITING)
def test_sigkill_under_a_waiting_duplicate(cell: Cell, backends: Backends,
                                           tmp_path: Path) -> None:
    """PostgreSQL, the key claimed pessimistically (``optimistic=False``, or the caller's
    transaction): the worker holds the uncommitted key at the point, a duplicate delivery
    blocks on it (seen in ``pg_stat_activity``), then the worker kills itself. The
    duplicate must then claim the key and run, once, within ``lock_timeout``: exactly one
    ledger row, the duplicate's."""
    run = Run(cell, backends, tmp_path)
    go = tmp_path / "go"
    proc = run.start_worker(hold=go)
    result: dict[str, Any] = {}
    waiter: threading.Thread | None = None
    try:
        def holding_or_gone() -> bool:
            held = run.marker.exists() and run.marker.read_text() == "holding"
            return held or proc.poll() is not None

        assert wait_until(holding_or_gone), "the worker never held the key"
        assert proc.poll() is None, "the worker ended before it held the key"
        handler = Payments(run.store, cell.mode, run.sql.engine, "redelivery")

        def duplicate() -> None:
            try:
                result["value"] = handler.deliver(run.msg, run.sql.engine)
            except BaseException as exc:  # handed to the test thread
                result["error"] = exc

        waiter = threading.Thread(target=duplicate, daemon=True)
        waiter.start()
        assert wait_until(lambda: _lock_waiters(run.sql.engine) >= 1), \
            f"the duplicate never waited on the key: {result}"
        assert handler.runs == 0 and not result
        go.touch()
        run.reap(proc)
        waiter.join(DEADLINE)
        assert not waiter.is_alive(), "the duplicate still waits after its holder died"
        assert "error" not in result, f"the duplicate raised {result['error']!r}"
        assert handler.runs == 1 and result["value"] is handler.returned[-1]
        stored = run.record()
        assert stored is not None and stored.state is State.COMPLETED
        assert json.loads(stored.result) == result["value"]
        assert [(r.cents, r.by) for r in run.rows(ledger)] == [(CENTS, "redelivery")]
        again = handler.deliver(run.msg, run.sql.engine)
        assert handler.runs == 1 and again == result["value"]
        if cell.mode == "caller":  # the killed caller's batch went; the duplicates' stayed
            assert [r.by for r in run.rows(rest)] == ["redelivery", "redelivery"]
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if waiter is not None:
            waiter.join(DEADLINE)
        run.close()
