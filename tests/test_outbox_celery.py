"""The outbox with real Celery: a real redis-server broker, a real ``celery worker -P
prefork`` and a real PostgreSQL, with the producer and the relay SIGKILLed at the two
points where a message used to be lost or doubled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from _celery_app import apply_payment
from _celery_harness import (
    TESTS,
    Broker,
    Worker,
    ledger_database,
    payments_rows,
    wait_until,
    worker_env,
)
from _servers import PostgresServer, RedisServer
from celery import Celery
from idempotent.integrations.celery_outbox import CeleryPublisher, stage_task

from idempotent import SqlStore
from idempotent.outbox import Outbox

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ORDERS = sa.Table("orders", sa.MetaData(), sa.Column("payment_id", sa.String(64),
                                                      primary_key=True))


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(pg_server: PostgresServer) -> Iterator[str]:
    name, url = ledger_database(pg_server, "outbox")
    engine = sa.create_engine(url)
    store = SqlStore(engine)
    Outbox(store, [])  # defines the outbox table on the store's metadata
    store.create_schema()
    ORDERS.create(engine)
    engine.dispose()
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def worker(broker: RedisServer, db: str) -> Iterator[Worker]:
    logs = Path(tempfile.mkdtemp(prefix="idem-outbox-"))
    w = Worker("o0", worker_env(broker=broker.url, db=db, visibility=30, backend=None), logs,
               concurrency=1)
    w.start()
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()
        shutil.rmtree(logs, ignore_errors=True)


def _run(mode: str, db: str, broker: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    return subprocess.run([sys.executable, str(TESTS / "_outbox_proc.py"), mode, db, broker,
                           *extra], env=env, capture_output=True, text=True, timeout=120)


def _relay(db: str, broker_url: str) -> tuple[Outbox, SqlStore]:
    """A relay in this process: its own Celery app on the broker (send_task needs only the
    task's name)."""
    store = SqlStore(db)
    publisher = CeleryPublisher(Celery("relay", broker=broker_url, set_as_current=False))
    return Outbox(store, [publisher], grace=0, confirm_after=0.2), store


def test_producer_killed_between_commit_and_publish(db: str, broker: RedisServer,
                                                    worker: Worker) -> None:
    """The order and the staged task committed; the producer died before publishing. A
    relay publishes it and the payment is applied once."""
    payment = {"payment_id": "pay_k1", "account": "acc_1", "cents": 1234}
    proc = _run("produce-then-die", db, broker.url, json.dumps(payment))
    assert proc.returncode == -9, proc.stderr
    queue = Broker(broker.url)
    outbox, store = _relay(db, broker.url)
    engine = store.engine
    try:
        with engine.connect() as c:  # the order committed; the message was never sent
            assert c.execute(sa.select(sa.func.count()).select_from(ORDERS)).scalar() == 1
        assert queue.counts()["ready"] == 0
        entries = outbox.stats().counts
        assert entries == {"pending": 1}, entries

        # due once the producer's grace (5 s) has passed since staging
        wait_until(lambda: outbox.relay_once().published == 1, 30, "the relay publishes it")
        wait_until(lambda: payments_rows(engine, "apply_payment"), 60, "payment applied",
                   describe=worker.log_tail)
        wait_until(lambda: outbox.relay_once().confirmed == 1, 30, "entry confirmed")
        wait_until(queue.empty, 30, "queue drained")
        assert payments_rows(engine, "apply_payment") == {"pay_k1": [1234]}
        assert outbox.stats().counts == {"confirmed": 1}
    finally:
        queue.close()
        engine.dispose()


def test_relay_killed_after_publish_before_mark(db: str, broker: RedisServer) -> None:
    """A relay published the task and died before marking it: the entry is still due, the
    next relay publishes it again (same task id), and the payment is applied once. The
    worker starts after both publishes, so both copies are in the queue when it consumes
    (had the first been applied already, the next relay would find the payment's record
    and confirm the entry instead of publishing it)."""
    outbox, store = _relay(db, broker.url)
    engine = store.engine
    queue = Broker(broker.url)
    payment = {"payment_id": "pay_k2", "account": "acc_1", "cents": 777}
    logs = Path(tempfile.mkdtemp(prefix="idem-outbox-"))
    worker = Worker("o1", worker_env(broker=broker.url, db=db, visibility=30, backend=None),
                    logs, concurrency=1)
    try:
        with engine.begin() as conn:  # staged and committed, not yet published
            stage_task(outbox, conn, apply_payment, (payment,))
        wait_until(lambda: _due(engine), 10, "the entry is due")
        proc = _run("relay-then-die", db, broker.url)
        assert proc.returncode == -9, proc.stderr
        entry = outbox.get(next(iter(_ids(engine))))
        assert entry is not None and (entry.state, entry.publishes) == ("pending", 0)
        assert queue.counts()["ready"] == 1  # it did publish before it died

        report = outbox.relay_once()  # the mark never committed: published again
        assert report.published == 1
        assert queue.counts()["ready"] == 2
        worker.start()
        worker.wait_ready()
        wait_until(queue.empty, 60, "both copies consumed", describe=lambda: str(queue.counts()))
        wait_until(lambda: outbox.relay_once().confirmed == 1, 30, "entry confirmed")
        assert payments_rows(engine, "apply_payment") == {"pay_k2": [777]}
        assert worker.current_log().count(b"succeeded") == 2  # two copies ran, one applied
    finally:
        worker.stop()
        shutil.rmtree(logs, ignore_errors=True)
        queue.close()
        engine.dispose()


def _due(engine: sa.Engine) -> bool:
    import time

    with engine.connect() as c:
        return bool(c.execute(sa.text("SELECT count(*) FROM idempotency_outbox WHERE next_at "
                                      "<= :now"), {"now": time.time()}).scalar())


def _ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as c:
        return [r[0] for r in c.execute(sa.text("SELECT id FROM idempotency_outbox"))]
