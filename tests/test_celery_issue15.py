"""Issue 15, Celery: our infrastructure retries leave the task's own retry budget alone,
task ids carry the scope, a message passed by keyword is the message passed by position,
and a soft time limit inside the body is never recorded as done. On a real
``celery worker -P prefork`` (one pool process, so every message of a test meets the same
task object), a real redis-server broker and PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _celery_app import apply_payment, apply_soft, charge_soft, ledger, poison, psp_calls, scoped
from _celery_harness import Worker, ledger_database, log_count, worker_env
from _servers import PostgresServer, RedisServer
from idempotent.integrations.celery import TASK_ID_NAMESPACE, send_once, task_id_for
from test_celery import Env, payment

from idempotent import MissingIdempotencyKey, SqlStore
from idempotent.keys import canonical_json

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LEASE = 3  # lease of the lease-mode tasks in this module's worker


@pytest.fixture(scope="module")
def env(pg_server: PostgresServer) -> Iterator[Env]:
    tmp = Path(tempfile.mkdtemp(prefix="idem-celery15-"))
    logs, marks = tmp / "logs", tmp / "marks"
    logs.mkdir()
    marks.mkdir()
    db, db_url = ledger_database(pg_server, "celery15")
    broker = RedisServer().start()
    worker = Worker("i15", worker_env(
        broker=broker.url_for(0), backend=broker.url_for(1), db=db_url, marks=marks,
        lease=LEASE, visibility=30, redis_store=broker.url_for(3)), logs, concurrency=1)
    e = Env(broker, db_url, [worker.start()], marks)
    try:
        worker.wait_ready()
        yield e
    finally:
        worker.stop()
        for q in e.queues:
            q.close()
        e.engine.dispose()
        broker.stop()
        pg_server.drop_database(db)
        shutil.rmtree(tmp, ignore_errors=True)


def _calls(env: Env, key: str) -> int:
    with env.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count())
                             .where(psp_calls.c.idem_key == key)).scalar_one())


def test_our_retry_leaves_the_tasks_own_retry_budget_alone(env: Env) -> None:
    """Item 1. One AlreadyInProgress retry in the pool process, then a poison message on
    the same task (autoretry_for=ValueError, max_retries=2): it runs 3 times and fails.
    Our retry does not advance Celery's request.retries either."""
    blocker = f"blk_{uuid.uuid4().hex[:10]}"
    store = SqlStore(env.engine)
    store.claim("t.poison", blocker, fingerprint=None, lease=2)  # a live lease elsewhere
    tid = env.send(poison, {"payment_id": blocker})
    meta = env.wait_done(tid)
    assert meta["status"] == "SUCCESS", meta
    assert log_count(env.workers, f"t.poison[{tid}] retry: Retry in") >= 1  # ours, taken
    blocker_retries = meta["retries"]

    bad = f"bad_{uuid.uuid4().hex[:10]}"
    ptid = env.send(poison, {"payment_id": bad, "poison": True})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and env.meta(ptid)["status"] != "FAILURE" \
            and _calls(env, bad) <= 3:
        time.sleep(0.1)
    time.sleep(1.0)  # any further run would show by now (no retry delay)
    runs, meta = _calls(env, bad), env.meta(ptid)
    print(f"\npoison message after one of our retries: {runs} runs, {meta['status']}, "
          f"retries {meta.get('retries')}")
    assert runs == 3
    assert meta["status"] == "FAILURE" and meta["retries"] == 2
    env.wait_drained()
    assert blocker_retries == 0  # ours are counted in our own header, not request.retries


def test_tenants_get_their_own_task_ids(env: Env) -> None:
    """Item 2. Tenant A's and tenant B's invoice inv-1: two task ids, two runs, each
    producer reads its own tenant's result; the id is the scope's, whatever way the
    arguments are given."""
    inv = f"inv_{uuid.uuid4().hex[:8]}"
    a = {"tenant": "A", "number": inv, "cents": 100}
    b = {"tenant": "B", "number": inv, "cents": 200}
    ta = env.send_once(scoped, a)
    tb = env.send_once(scoped, b)
    assert ta != tb
    assert ta == task_id_for(scoped, inv, scope="A")
    assert tb == task_id_for(scoped, inv, scope="B")
    assert env.wait_done(ta)["result"] == {"tenant": "A", "number": inv, "cents": 100}
    assert env.wait_done(tb)["result"] == {"tenant": "B", "number": inv, "cents": 200}
    with env.connection(False) as conn:  # the same invoice again, by keyword: same id
        again = send_once(scoped, kwargs={"invoice": b}, connection=conn).id
    assert again == tb
    assert env.wait_done(again)["status"] == "SUCCESS"
    env.wait_drained()
    with env.engine.connect() as c:
        rows = c.execute(sa.select(ledger.c.account, ledger.c.cents)
                         .where(ledger.c.payment_id == inv)).all()
    assert sorted(rows) == [("A", 100), ("B", 200)]
    with pytest.raises(TypeError, match="scope"):
        task_id_for(scoped, inv)  # a scoped task's id needs its scope
    assert task_id_for("t.scoped", inv) != task_id_for("t.scoped", inv, scope="A")


def test_a_message_by_keyword_is_the_message_by_position(env: Env) -> None:
    """Item 3. ``apply.delay(payment=p)``, ``send_once(task, kwargs={"payment": p})`` and
    the positional message: all SUCCESS with one result, one ledger row (no
    MissingIdempotencyKey, no IdempotencyKeyConflict), one task id for send_once."""
    p = payment()
    with env.connection(False) as conn:
        by_kw = apply_payment.apply_async(kwargs={"payment": p}, connection=conn).id
        once_kw = send_once(apply_payment, kwargs={"payment": p}, connection=conn).id
    once_pos = env.send_once(apply_payment, p)
    assert once_kw == once_pos == task_id_for(apply_payment, p["payment_id"])
    results = [env.wait_done(t) for t in (by_kw, once_kw)]
    env.wait_drained()
    assert [r["status"] for r in results] == ["SUCCESS", "SUCCESS"], results
    assert [r["result"] for r in results] == [{"applied": p["payment_id"], "cents": 1234}] * 2
    assert env.rows("apply_payment")[p["payment_id"]] == [1234]
    # a task's business key, both ways
    assert apply_payment.business_key((p,)) == apply_payment.business_key(
        (), {"payment": p}) == p["payment_id"]
    with pytest.raises(MissingIdempotencyKey):
        send_once(apply_payment, kwargs={"payment": {"account": "a"}})


@pytest.mark.parametrize("task", [apply_soft, charge_soft], ids=["transactional", "lease"])
def test_soft_time_limit_is_never_recorded_as_done(env: Env, task: Any) -> None:
    """SoftTimeLimitExceeded raised inside the body: the transaction rolls back (or the
    claim is released), the task fails visibly, nothing is recorded; the next message of
    the payment runs the body and succeeds."""
    p = payment(hold=3)
    tid = env.send(task, p)
    meta = env.wait_done(tid)
    assert meta["status"] == "FAILURE", meta
    assert env.stored_error_type(tid) == "SoftTimeLimitExceeded"
    assert log_count(env.workers, f"Soft time limit (1s) exceeded for {task.name}[{tid}]") == 1
    store = SqlStore(env.engine)
    assert store.get(task.name, p["payment_id"]) is None  # released / rolled back
    assert not env.rows("apply_soft").get(p["payment_id"])
    again = env.send(task, {k: v for k, v in p.items() if k != "hold"})
    done = env.wait_done(again)
    env.wait_drained()
    assert done["status"] == "SUCCESS", done
    if task is apply_soft:
        assert env.rows("apply_soft")[p["payment_id"]] == [1234]
    else:
        assert _calls(env, p["payment_id"]) == 2


def test_task_id_for_scope_and_arguments_in_process() -> None:
    """No worker: send_once's id derivation reads the scope and the key the same way for
    positional and keyword arguments, and the unscoped id is unchanged."""
    assert task_id_for("t.apply_payment", "pay_1") == str(uuid.uuid5(
        TASK_ID_NAMESPACE, canonical_json(["t.apply_payment", "pay_1"])))  # as before
    inv = {"tenant": "T", "number": "i1", "cents": 1}
    assert scoped.business_key((inv,)) == scoped.business_key((), {"invoice": inv}) == "i1"
    assert scoped.scope_key((inv,)) == scoped.scope_key((), {"invoice": inv}) == "T"
