"""The Celery integration on real ``celery worker -P prefork`` processes, a real redis-server
broker and PostgreSQL: duplicates, task-id keys, bad input, a pool child killed mid-task,
and a countdown longer than the broker's visibility timeout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from _celery_app import (
    apply_by_id,
    apply_limited,
    apply_payment,
    charge,
    charge_redis,
    plain_apply,
    psp_calls,
    unreachable,
)
from _celery_app import psp_charges as psp_charges_table
from _celery_harness import (
    Broker,
    Worker,
    ledger_database,
    log_count,
    payments_rows,
    wait_until,
    worker_env,
)
from _servers import PostgresServer, RedisServer
from celery import Celery
from celery.backends.redis import RedisBackend
from celery.exceptions import Reject
from idempotent.integrations.celery import IdempotentTask, send_once, task_id_for
from kombu import Connection

from idempotent import (
    AlreadyInProgress,
    IdempotencyKeyConflict,
    MemoryStore,
    MissingIdempotencyKey,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

VISIBILITY = 30  # seconds: the killed-child tests see redelivery by reject_on_worker_lost
SHORT_VISIBILITY = 2  # seconds, for the countdown test's worker (broker database 2: the
# unacked set is per database, and any worker sweeps it with its own visibility timeout)
LEASE = 10  # lease of the lease-mode tasks; well beyond the time a worker takes to see a
# lost child (up to ~3.5 s seen on a loaded machine), so the requeued copy meets a live lease
WAIT = 60.0  # deadline of every wait on a condition


class Env:
    """The servers, the worker and the producer side of this module."""

    def __init__(self, broker: RedisServer, db_url: str, workers: list[Worker],
                 marks: Path) -> None:
        self.broker = broker
        self.broker_url = broker.url_for(0)
        self.engine = sa.create_engine(db_url)
        self.workers = workers
        self.worker = workers[0]
        self.marks = marks
        self.app = Celery("producer")
        self.backend = RedisBackend(app=self.app, url=broker.url_for(1))
        self.queues = [Broker(self.broker_url), Broker(broker.url_for(2))]

    def connection(self, short: bool) -> Connection:
        return Connection(self.broker.url_for(2) if short else self.broker_url)

    def send(self, task: Any, payment: dict[str, Any], *, short: bool = False,
             **options: Any) -> str:
        """Publish one message; return its task id (``short``: to the short-visibility
        worker)."""
        with self.connection(short) as conn:
            return str(task.apply_async((payment,), connection=conn, **options).id)

    def send_once(self, task: Any, payment: dict[str, Any], *, short: bool = False,
                  **options: Any) -> str:
        with self.connection(short) as conn:
            return str(send_once(task, (payment,), connection=conn, **options).id)

    def meta(self, task_id: str) -> dict[str, Any]:
        return dict(self.backend.get_task_meta(task_id))

    def stored_error_type(self, task_id: str) -> str:
        """The exception type as the worker stored it (before any client decodes it)."""
        with redis.Redis.from_url(self.broker.url_for(1)) as results:
            raw = json.loads(results.get(f"celery-task-meta-{task_id}") or b"{}")
        return str(raw["result"]["exc_type"])

    def wait_done(self, task_id: str) -> dict[str, Any]:
        """The result meta once the task is SUCCESS or FAILURE."""
        return wait_until(lambda: (m := self.meta(task_id))["status"] in ("SUCCESS", "FAILURE")
                          and m, WAIT, f"task {task_id} done", describe=self.worker.log_tail)

    def wait_drained(self) -> None:
        """Until every message is acked (none ready, none unacked)."""
        wait_until(lambda: all(q.empty() for q in self.queues), WAIT, "broker drained",
                   describe=lambda: f"{[q.counts() for q in self.queues]}\n"
                                    f"{self.worker.log_tail()}")

    def rows(self, task: str) -> dict[str, list[int]]:
        return payments_rows(self.engine, task)


@pytest.fixture(scope="module")
def env(pg_server: PostgresServer) -> Iterator[Env]:
    # our own temp dir: pytest prunes old basetemps, which other sessions on this machine
    # may trigger while the workers still write their logs
    tmp = Path(tempfile.mkdtemp(prefix="idem-celery-"))
    logs, marks = tmp / "logs", tmp / "marks"
    logs.mkdir()
    marks.mkdir()
    db, db_url = ledger_database(pg_server, "celery")
    broker = RedisServer().start()
    servers = {"backend": broker.url_for(1), "db": db_url, "marks": marks, "lease": LEASE,
               "redis_store": broker.url_for(3)}
    workers = [  # w2 has Celery's own worker_deduplicate_successful_tasks on, for comparison
        Worker("w1", worker_env(broker=broker.url_for(0), visibility=VISIBILITY, **servers),
               logs, concurrency=3),
        Worker("w2", worker_env(broker=broker.url_for(2), visibility=SHORT_VISIBILITY, dedup=1,
                                **servers), logs, concurrency=4),
    ]
    e = Env(broker, db_url, [w.start() for w in workers], marks)
    try:
        for w in workers:
            w.wait_ready()
        yield e
    finally:
        for w in workers:
            w.stop()
        for q in e.queues:
            q.close()
        e.engine.dispose()
        broker.stop()
        pg_server.drop_database(db)
        if not os.environ.get("IDEMPOTENT_KEEP_LOGS"):
            shutil.rmtree(tmp, ignore_errors=True)


def payment(**extra: Any) -> dict[str, Any]:
    return {"payment_id": f"pay_{uuid.uuid4().hex[:12]}", "account": "acc_1", "cents": 1234,
            **extra}


def test_double_sends_run_the_body_once(env: Env) -> None:
    """Three sends with the derived task id and two with random ids: one ledger row, and
    every copy's result is the first one's."""
    p = payment()
    ids = {env.send_once(apply_payment, p) for _ in range(3)}
    assert ids == {task_id_for(apply_payment, p["payment_id"])}
    ids |= {env.send(apply_payment, p) for _ in range(2)}
    results = [env.wait_done(t) for t in ids]
    env.wait_drained()
    assert {r["status"] for r in results} == {"SUCCESS"}
    assert [r["result"] for r in results] == [{"applied": p["payment_id"], "cents": 1234}] * 3
    assert env.rows("apply_payment")[p["payment_id"]] == [1234]


def test_task_id_is_the_default_key(env: Env) -> None:
    """Keyed by task id: two messages with one id apply once; another id applies again."""
    p = payment()
    tid = str(uuid.uuid4())
    env.send(apply_by_id, p, task_id=tid)
    env.send(apply_by_id, p, task_id=tid)
    other = env.send(apply_by_id, p)
    for t in (tid, other):
        assert env.wait_done(t)["status"] == "SUCCESS"
    env.wait_drained()
    assert env.rows("apply_by_id")[p["payment_id"]] == [1234, 1234]


def test_missing_business_key_fails_visibly_once(env: Env) -> None:
    """No payment_id: FAILURE with MissingIdempotencyKey in the result backend, one error
    in the worker log, the message acked (not requeued, not retried), nothing written."""
    p = payment()
    del p["payment_id"]
    tid = env.send(apply_payment, p)
    meta = env.wait_done(tid)
    env.wait_drained()
    assert meta["status"] == "FAILURE"
    assert type(meta["result"]).__name__ == "MissingIdempotencyKey"
    assert env.stored_error_type(tid) == "MissingIdempotencyKey"
    assert "no idempotency key" in str(meta["result"])
    assert meta["retries"] == 0
    assert log_count([env.worker], f"t.apply_payment[{tid}] raised unexpected") == 1
    # the producer helper refuses before sending anything
    with pytest.raises(MissingIdempotencyKey):
        env.send_once(apply_payment, p)


def test_same_key_other_arguments_is_a_conflict_not_a_retry(env: Env) -> None:
    """Same payment_id, other amount: FAILURE with IdempotencyKeyConflict, no retry, the
    first payment's row untouched."""
    p = payment()
    first = env.send(apply_payment, p)
    assert env.wait_done(first)["status"] == "SUCCESS"
    second = env.send(apply_payment, {**p, "cents": 9999})
    meta = env.wait_done(second)
    env.wait_drained()
    assert meta["status"] == "FAILURE"
    assert env.stored_error_type(second) == "IdempotencyKeyConflict"
    assert isinstance(meta["result"], IdempotencyKeyConflict)  # the client gets the type back
    assert "was first used with another payload" in str(meta["result"])
    assert meta["retries"] == 0
    assert log_count([env.worker], f"t.apply_payment[{second}] raised unexpected") == 1
    assert log_count([env.worker], f"t.apply_payment[{second}] retry") == 0
    assert env.rows("apply_payment")[p["payment_id"]] == [1234]


def test_store_down_is_retried_with_backoff_then_fails(env: Env) -> None:
    """StoreUnavailable becomes a retry with backoff, up to the task's store_retries (2
    here; unlimited by default, counted in the message's idempotent_store_retries
    header); then FAILURE with StoreUnavailable, nothing run."""
    tid = env.send(unreachable, payment())
    meta = env.wait_done(tid)
    env.wait_drained()
    assert meta["status"] == "FAILURE"
    assert env.stored_error_type(tid) == "StoreUnavailable"
    assert meta["retries"] == 0  # ours are counted in a header, not in request.retries
    assert log_count([env.worker], f"t.unreachable[{tid}] retry: Retry in") == 2


def _kill_the_hanging_child(env: Env, payment_id: str) -> int:
    """Wait for the first run's mark, SIGKILL that pool child; return its pid."""
    mark = wait_until(lambda: next(env.marks.glob(f"{payment_id}.*"), None), WAIT,
                      f"{payment_id} running", describe=env.worker.log_tail)
    pid = int(mark.suffix[1:])
    assert pid in env.worker.children()  # a pool child of the worker this module started
    os.kill(pid, signal.SIGKILL)
    return pid


def test_child_killed_mid_task_applies_once(env: Env) -> None:
    """Transactional: the child dies after its INSERT, before COMMIT; reject_on_worker_lost
    requeues the message and the redelivered copy applies the payment once."""
    p = payment(hang_once=True)
    tid = env.send_once(apply_payment, p)
    killed = _kill_the_hanging_child(env, p["payment_id"])
    meta = env.wait_done(tid)
    env.wait_drained()
    assert meta["status"] == "SUCCESS", meta
    assert env.rows("apply_payment")[p["payment_id"]] == [1234]
    with env.engine.connect() as c:
        pids = c.execute(sa.text("SELECT pid FROM celery_ledger WHERE payment_id = :p"),
                         {"p": p["payment_id"]}).scalars().all()
    assert pids != [killed]  # the row is the redelivered copy's, in another child
    lost = f"pid:{killed} exited with 'signal 9 (SIGKILL)'"  # seen by the worker: requeued
    assert log_count([env.worker], lost) == 1, env.worker.log_tail(40)


def test_hard_time_limit_kill_requeues_the_message(env: Env) -> None:
    """Transactional, a hard time_limit: Celery kills the child mid-transaction (after its
    INSERT, before COMMIT). The message goes back to the queue (acks_on_timeout=False)
    instead of being acked as failed, and the redelivered copy applies the payment once
    (was, at 70b75f3: acked at the timeout, the payment never applied)."""
    p = payment(hang_once=True)
    tid = env.send_once(apply_limited, p)
    wait_until(lambda: env.rows("apply_limited").get(p["payment_id"]), WAIT,
               "the redelivered copy's row", describe=env.worker.log_tail)
    env.wait_drained()
    assert env.rows("apply_limited")[p["payment_id"]] == [1234]
    assert log_count([env.worker], f"Hard time limit (3s) exceeded for t.apply_limited[{tid}]") \
        == 1, env.worker.log_tail(40)
    assert wait_until(lambda: env.meta(tid)["status"] == "SUCCESS" and env.meta(tid), WAIT,
                      "SUCCESS in the backend")["result"] == {
        "applied": p["payment_id"], "cents": 1234}


LEASE_TASKS = pytest.mark.parametrize("task", [charge, charge_redis], ids=["sql", "redis"])


@LEASE_TASKS
def test_child_killed_mid_task_lease_mode(env: Env, task: Any) -> None:
    """Lease mode: the killed child's lease stays until it runs out (its heartbeat died
    with it); the requeued copy waits for that (AlreadyInProgress, retried with a countdown)
    and then takes the key over. The body ran twice (the honest limit of lease mode); the
    provider, which dedups by the key the task passed it (current_key()), charged once."""
    p = payment(hang_once=True)
    tid = env.send_once(task, p)
    _kill_the_hanging_child(env, p["payment_id"])
    meta = env.wait_done(tid)
    env.wait_drained()
    assert meta["status"] == "SUCCESS", meta
    assert meta["result"] == {"charged": p["payment_id"], "cents": 1234}
    key = p["payment_id"]
    with env.engine.connect() as c:
        calls = c.execute(sa.select(sa.func.count()).where(psp_calls.c.idem_key == key)).scalar()
        charges = c.execute(sa.select(psp_charges_table.c.cents)
                            .where(psp_charges_table.c.idem_key == key)).scalars().all()
    assert calls == 2
    assert charges == [1234]
    assert log_count([env.worker], f"{task.name}[{tid}] retry: Retry in") >= 1


@LEASE_TASKS
def test_in_progress_duplicate_is_retried_then_replayed(env: Env, task: Any) -> None:
    """A second message of a payment whose first run holds the lease is retried with a
    countdown (AlreadyInProgress), then gets the stored result; the body runs once."""
    p = payment(hold=2)
    first = env.send(task, p)
    wait_until(lambda: log_count([env.worker], f"{task.name}[{first}] received"), WAIT,
               "first received")
    second = env.send(task, p)
    results = [env.wait_done(t) for t in (first, second)]
    env.wait_drained()
    assert [r["status"] for r in results] == ["SUCCESS", "SUCCESS"]
    assert results[0]["result"] == results[1]["result"]
    assert log_count([env.worker], f"{task.name}[{second}] retry: Retry in") >= 1
    assert results[1]["retries"] == 0  # the task's own retry budget is untouched
    with env.engine.connect() as c:
        calls = c.execute(sa.select(sa.func.count())
                          .where(psp_calls.c.idem_key == p["payment_id"])).scalar()
    assert calls == 1


def test_countdown_longer_than_visibility_timeout(env: Env) -> None:
    """Celery #3270/#4400: a countdown longer than the visibility timeout makes the broker
    hand the waiting message out again and again; every copy runs at the ETA. Our task
    writes one row. The plain acks_late task, in the same worker with
    worker_deduplicate_successful_tasks on, writes one row per copy that started before
    the first one succeeded: at least two."""
    countdown = 3 * SHORT_VISIBILITY + 1
    ours, plain = payment(hold=1), payment(hold=1)
    t_ours = env.send_once(apply_payment, ours, countdown=countdown, short=True)
    t_plain = env.send(plain_apply, plain, countdown=countdown, short=True)
    for t in (t_ours, t_plain):
        assert env.wait_done(t)["status"] == "SUCCESS"
    env.wait_drained()
    copies_ours = log_count(env.workers, f"t.apply_payment[{t_ours}] received")
    copies_plain = log_count(env.workers, f"t.plain_apply[{t_plain}] received")
    plain_rows = env.rows("plain_apply")[plain["payment_id"]]
    print(f"\ncountdown {countdown}s, visibility {SHORT_VISIBILITY}s: idempotent task "
          f"{copies_ours} copies -> {len(env.rows('apply_payment')[ours['payment_id']])} row; "
          f"plain task with worker_deduplicate_successful_tasks {copies_plain} copies -> "
          f"{len(plain_rows)} rows")
    assert copies_ours >= 2 and copies_plain >= 2  # the broker did redeliver
    assert env.rows("apply_payment")[ours["payment_id"]] == [1234]
    assert len(plain_rows) >= 2


def test_direct_call_and_idempotent_task_checks() -> None:
    """Called as a plain function there is no task id: MissingIdempotencyKey; a task that
    takes `connection` can be sent without it (the worker supplies it); a business key
    maps to one task id, whatever process computes it."""
    with pytest.raises(MissingIdempotencyKey):
        apply_by_id({"payment_id": "x", "account": "a", "cents": 1})
    apply_payment.__header__({"payment_id": "x"})  # no TypeError for the missing connection
    with pytest.raises(TypeError):
        apply_payment.__header__()
    assert task_id_for("t.apply_payment", "pay_1") == task_id_for(apply_payment, "pay_1")
    assert task_id_for("t.apply_payment", "pay_1") != task_id_for("t.apply_by_id", "pay_1")
    assert isinstance(apply_payment, IdempotentTask) and apply_payment.acks_late
    assert apply_payment.reject_on_worker_lost
    with pytest.raises(TypeError, match="task id"):
        send_once(apply_by_id, ({"payment_id": "x"},))


def _local_task(**options: Any) -> Any:
    """A task on an app of its own (no broker used), for calls in this process."""
    app = Celery("local", set_as_current=False)
    calls: list[Any] = []

    @app.task(base=IdempotentTask, **options)
    def record(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload)
        return {"n": len(calls)}

    record.calls = calls
    return record


def test_callable_key_and_store_factory_in_process() -> None:
    """A key function and a store factory given to app.task are used as given (not bound
    as methods); a duplicate called in process gets the stored result."""
    store = MemoryStore()
    task = _local_task(idempotency_store=lambda: store, idempotency_key=lambda p: p["id"],
                       name="local.record")
    assert task({"id": "a"}) == {"n": 1}
    assert task({"id": "a"}) == {"n": 1}
    assert task({"id": "b"}) == {"n": 2}
    assert len(task.calls) == 2
    assert task.business_key(({"id": "a"},)) == "a"


def test_in_progress_outside_a_worker_is_raised_not_retried() -> None:
    """Called directly there is no message to retry: AlreadyInProgress reaches the caller
    with its retry_after."""
    store = MemoryStore()
    task = _local_task(idempotency_store=store, idempotency_key="id", name="local.busy",
                       idempotency_options={"lease": 30})
    store.claim("local.busy", "k", fingerprint=None, lease=30)
    with pytest.raises(AlreadyInProgress) as info:
        task({"id": "k"})
    assert 0 < info.value.retry_after <= 30
    assert task.calls == []


def test_eager_mode_raises_in_progress_instead_of_recursing() -> None:
    """apply() (as task_always_eager uses) has no worker: AlreadyInProgress reaches the
    caller at once, rather than Celery re-running the retry recursively without its
    countdown until RecursionError."""
    store = MemoryStore()
    task = _local_task(idempotency_store=store, idempotency_key="id", name="local.eager",
                       idempotency_options={"lease": 30})
    store.claim("local.eager", "k", fingerprint=None, lease=30)
    result = task.apply(({"id": "k"},))
    assert isinstance(result.result, AlreadyInProgress) and result.status == "FAILURE"
    assert task.calls == []


def test_a_retry_that_cannot_be_published_requeues_the_message() -> None:
    """Celery answers a retry it cannot publish with Reject(requeue=False), which drops the
    message; the task turns it into Reject(requeue=True), carrying the broker's error."""
    app = Celery("local", broker="redis://127.0.0.1:9/0", set_as_current=False)  # refused
    app.conf.broker_connection_retry = False
    store = MemoryStore()

    @app.task(base=IdempotentTask, idempotency_store=store, idempotency_key="id",
              name="local.unpublishable", idempotency_options={"lease": 30})
    def unpublishable(payload: dict[str, Any]) -> int:
        return 1

    store.claim("local.unpublishable", "k", fingerprint=None, lease=30)  # AlreadyInProgress
    payload = {"id": "k"}
    unpublishable.push_request(id="tid-1", called_directly=False, retries=0,
                               delivery_info={}, args=[payload], kwargs={})
    try:
        with pytest.raises(Reject) as info:
            unpublishable(payload)
    finally:
        unpublishable.pop_request()
    assert info.value.requeue is True
    assert "Connection refused" in str(info.value.reason)
