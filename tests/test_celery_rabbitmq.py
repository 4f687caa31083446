"""The Celery integration on a RabbitMQ broker (py-amqp), unchanged: chaos on real
``celery worker -P prefork`` processes. Thousands of payments, each published 1-3 times
(with publisher confirms) in a shuffled order, half with the task id `send_once` derives,
half with a random one; the 2 workers and their pool children SIGKILLed at random and
restarted; PostgreSQL backends terminated; the RabbitMQ node SIGKILLed and restarted once.
When the queue has drained, every payment is in the ledger exactly once, to the cent, with
**no producer reconciliation**: on RabbitMQ an unacked message goes back to the queue when
its channel closes, so none vanishes (unlike the Redis transport, see test_celery_chaos).

``IDEMPOTENT_CELERY_RMQ_PAYMENTS`` changes the size (default 2,000, as the Redis chaos
run, to fit the suite's time budget; 5,000 passes too, in about a minute);
``IDEMPOTENT_CHAOS_SEED`` repeats a round.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _amqp_common import connection, ready_count
from _celery_app import apply_payment, charge
from _celery_harness import Worker, ledger_database, payments_rows, wait_until, worker_env
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture
from _servers import PostgresServer
from idempotent.integrations.celery import send_once
from kombu import Connection

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PAYMENTS = int(os.environ.get("IDEMPOTENT_CELERY_RMQ_PAYMENTS", "2000"))
SEED = int(os.environ.get("IDEMPOTENT_CHAOS_SEED", str(random.randrange(1 << 30))))
WORKERS, CONCURRENCY = 2, 2
CHAOS_EVERY = (1.5, 3.5)
BACKEND_TERMINATIONS = 3
DEADLINE = 120.0 + PAYMENTS / 20


@dataclass
class Chaos:
    worker_kills: int = 0
    child_kills: int = 0
    broker_restarts: int = 0
    backends_terminated: int = 0
    events: list[str] = field(default_factory=list)


@pytest.fixture
def db(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    name, url = ledger_database(pg_server, "celery_rmq")
    try:
        yield name, url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def logs() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="idem-celery-rmq-"))
    yield path
    if not os.environ.get("IDEMPOTENT_KEEP_LOGS"):
        shutil.rmtree(path, ignore_errors=True)


def _publish(url: str, queue: str, payments: list[dict[str, Any]], rng: random.Random) -> int:
    """Each payment 1-3 times, shuffled, every publish confirmed by the broker."""
    copies = [p for p in payments for _ in range(rng.randint(1, 3))]
    rng.shuffle(copies)
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        for p in copies:
            if rng.random() < 0.5:
                send_once(apply_payment, (p,), connection=conn, queue=queue)
            else:
                apply_payment.apply_async((p,), connection=conn, queue=queue)
    return len(copies)


def _blow(rng: random.Random, workers: list[Worker], chaos: Chaos) -> bool:
    """SIGKILL a whole worker (and restart it) or one pool child, of a worker that got as
    far as consuming."""
    ready = [w for w in workers if w.ready()]
    if not ready:
        return False
    w = rng.choice(ready)
    children = w.children()
    if children and chaos.child_kills < chaos.worker_kills:
        victim = rng.choice(children)
        os.kill(victim, 9)
        chaos.child_kills += 1
        chaos.events.append(f"SIGKILL child {victim} of {w.name}")
    else:
        w.kill()
        w.start()
        chaos.worker_kills += 1
        chaos.events.append(f"SIGKILL worker {w.name}, restarted")
    return True


def test_celery_on_rabbitmq_chaos(pg_server: PostgresServer, rabbit: RabbitServer,  # noqa: F811
                                  db: tuple[str, str], logs: Path) -> None:
    """Ledger rows == unique payments, amounts exact, 0 lost, 0 doubled, 0 vanished, with
    no re-send by the producer."""
    dbname, db_url = db
    rng = random.Random(SEED)
    queue = f"celery-{uuid.uuid4().hex[:8]}"
    payments = [{"payment_id": f"pay_{i:06d}", "account": f"acc_{rng.randrange(50):03d}",
                 "cents": rng.randint(1, 10_000_000)} for i in range(PAYMENTS)]
    expected = {p["payment_id"]: p["cents"] for p in payments}
    env = worker_env(broker=rabbit.url, db=db_url, backend=None)
    workers = [Worker(f"r{i}", env, logs, concurrency=CONCURRENCY, queues=queue)
               for i in range(WORKERS)]
    engine = sa.create_engine(db_url, pool_pre_ping=True)
    chaos = Chaos()
    started = time.monotonic()

    def applied() -> int:
        with engine.connect() as c:
            return int(c.execute(sa.text(
                "SELECT count(DISTINCT payment_id) FROM celery_ledger")).scalar() or 0)

    def describe() -> str:
        return f"{applied()}/{PAYMENTS} applied; {chaos.events[-4:]}\n{workers[0].log_tail()}"

    try:
        # all published first (the producer declares the queue), so the chaos below
        # covers the whole run
        published = _publish(rabbit.url, queue, payments, rng)
        for w in workers:
            w.start()
        broker_at = rng.uniform(0.3, 0.5) * PAYMENTS
        terminate_at = sorted(rng.uniform(0.1, 0.8) * PAYMENTS
                              for _ in range(BACKEND_TERMINATIONS))
        deadline = started + DEADLINE
        next_blow = time.monotonic() + rng.uniform(*CHAOS_EVERY)
        milestones = [PAYMENTS * k / 6 for k in range(1, 6)]
        while (done := applied()) < PAYMENTS:
            assert time.monotonic() < deadline, describe()
            if not chaos.broker_restarts and done >= broker_at:
                old = rabbit.pid
                rabbit.restart(kill=True)
                chaos.broker_restarts += 1
                chaos.events.append(f"SIGKILL rabbitmq {old} at {done} applied, restarted")
            if terminate_at and done >= terminate_at[0]:
                terminate_at.pop(0)
                pids = pg_server.terminate_backends(dbname=dbname)
                chaos.backends_terminated += len(pids)
                chaos.events.append(f"terminated {len(pids)} PostgreSQL backends at {done}")
            # a blow every few seconds, and at least one per sixth of the run, however fast
            # or slow the machine is
            due = milestones and done >= milestones[0]
            if (time.monotonic() >= next_blow or due) and _blow(rng, workers, chaos):
                if due:
                    milestones.pop(0)
                next_blow = time.monotonic() + rng.uniform(*CHAOS_EVERY)
            time.sleep(0.2)
        # the remaining copies (duplicates, retries waiting on a countdown) must be handled
        # too: warm-stop the workers, so what they hold returns to the queue, and look
        while True:
            for w in workers:
                w.stop()
            left = ready_count(rabbit.url, queue)
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} left; {describe()}"
            for w in workers:
                w.start()
            wait_until(lambda: ready_count(rabbit.url, queue) == 0,
                       max(5.0, deadline - time.monotonic()), "queue drained", describe=describe)
        rows = payments_rows(engine, "apply_payment")
    finally:
        for w in workers:
            w.stop()
        engine.dispose()
        with connection(rabbit.url) as conn:
            conn.channel().queue_delete(queue)
    elapsed = time.monotonic() - started
    lost = sorted(set(expected) - set(rows))
    doubled = sorted(k for k, v in rows.items() if len(v) > 1)
    wrong = sorted(k for k, v in rows.items() if v[0] != expected.get(k))
    n_rows = sum(len(v) for v in rows.values())
    amount = sum(c for v in rows.values() for c in v)
    print(
        f"\nCelery on RabbitMQ chaos (seed {SEED}): {PAYMENTS} payments, {published} "
        f"messages, {WORKERS} prefork workers x {CONCURRENCY}, {elapsed:.0f}s\n"
        f"  workers SIGKILLed and restarted {chaos.worker_kills}, pool children SIGKILLed "
        f"{chaos.child_kills}, rabbitmq SIGKILLed and restarted {chaos.broker_restarts}, "
        f"PostgreSQL backends terminated {chaos.backends_terminated}\n"
        f"  ledger rows {n_rows}, unique payments {PAYMENTS}, lost {len(lost)}, doubled "
        f"{len(doubled)}, wrong amount {len(wrong)}, amount {amount} of "
        f"{sum(expected.values())} cents\n"
        f"  messages that vanished before reaching a task: {len(lost)} (no producer "
        f"reconciliation step ran)\n" + "".join(f"  - {e}\n" for e in chaos.events))
    assert chaos.broker_restarts == 1 and chaos.worker_kills >= 2 and chaos.child_kills >= 1
    assert chaos.backends_terminated >= 1
    assert lost == [] and doubled == [] and wrong == []
    assert n_rows == PAYMENTS and amount == sum(expected.values())


def test_celery_consumer_timeout_loses_nothing(
        rabbit: RabbitServer, db: tuple[str, str], logs: Path) -> None:  # noqa: F811
    """A task that holds its message longer than RabbitMQ's consumer_timeout: the broker
    closes the worker's channel (PRECONDITION_FAILED), which Celery 5.x treats as an
    unrecoverable error: the worker shuts down. The message is not lost: it is back in the
    queue, and the restarted worker acks it as a duplicate of the run that committed. One
    ledger row."""
    _, db_url = db
    queue = f"celery-ct-{uuid.uuid4().hex[:8]}"
    timed_out = "delivery acknowledgement on channel"
    before = rabbit.log_text().count(timed_out)
    rabbit.set_env("consumer_timeout", "1500")  # for channels opened from now on
    worker = Worker("ct", worker_env(broker=rabbit.url, db=db_url, backend=None), logs,
                    concurrency=2, queues=queue)
    engine = sa.create_engine(db_url)
    try:
        worker.start()
        worker.wait_ready()
        payment = {"payment_id": "pay_slow", "account": "acc_1", "cents": 4200, "hold": 6}
        with Connection(rabbit.url, transport_options={"confirm_publish": True}) as conn:
            send_once(apply_payment, (payment,), connection=conn, queue=queue)
        wait_until(lambda: rabbit.log_text().count(timed_out) > before, 60,
                   "the broker closed the worker's channel (consumer_timeout)")
        assert worker.proc is not None
        wait_until(lambda: worker.proc is not None and worker.proc.poll() is not None, 60,
                   "the worker shut down (Celery: unrecoverable error)",
                   describe=worker.log_tail)
        first_log = worker.current_log()
        assert b"Unrecoverable error: PreconditionFailed" in first_log
        rabbit.set_env("consumer_timeout", "1800000")  # RabbitMQ's default, 30 min
        worker.start()
        wait_until(lambda: b" succeeded in " in worker.current_log(), 60,
                   "the redelivered message acked", describe=worker.log_tail)
        worker.stop()
        assert ready_count(rabbit.url, queue) == 0
        rows = payments_rows(engine, "apply_payment")
    finally:
        worker.stop()
        rabbit.set_env("consumer_timeout", "1800000")
        engine.dispose()
        with connection(rabbit.url) as conn:
            conn.channel().queue_delete(queue)
    assert rows == {"pay_slow": [4200]}


def test_celery_in_progress_retry_goes_through_rabbitmq(
        rabbit: RabbitServer, db: tuple[str, str], logs: Path) -> None:  # noqa: F811
    """Two copies of a lease-mode payment reach the two pool processes at once: one runs,
    the other gets AlreadyInProgress, and the integration publishes it again through
    RabbitMQ with a countdown; that copy finds the stored result. The body ran once."""
    _, db_url = db
    queue = f"celery-ip-{uuid.uuid4().hex[:8]}"
    worker = Worker("ip", worker_env(broker=rabbit.url, db=db_url, backend=None), logs,
                    concurrency=2, queues=queue)
    engine = sa.create_engine(db_url)
    try:
        payment = {"payment_id": "pay_ip", "account": "acc_1", "cents": 900, "hold": 2}
        with Connection(rabbit.url, transport_options={"confirm_publish": True}) as conn:
            for _ in range(2):
                send_once(charge, (payment,), connection=conn, queue=queue)
        worker.start()
        wait_until(lambda: worker.current_log().count(b" succeeded in ") >= 2, 60,
                   "both copies succeeded", describe=worker.log_tail)
        log = worker.current_log()
        worker.stop()
        assert ready_count(rabbit.url, queue) == 0
        with engine.connect() as c:
            calls = c.execute(sa.text("SELECT count(*) FROM psp_calls")).scalar()
            charges = c.execute(sa.text("SELECT count(*) FROM psp_charges")).scalar()
    finally:
        worker.stop()
        engine.dispose()
        with connection(rabbit.url) as conn:
            conn.channel().queue_delete(queue)
    assert b"AlreadyInProgress" in log and b"Retry in" in log
    assert calls == 1 and charges == 1
