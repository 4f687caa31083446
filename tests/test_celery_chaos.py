"""Chaos on real Celery workers: thousands of payments, each published 1-3 times in a
shuffled order, while workers and pool children are SIGKILLed at random and restarted,
the broker is SIGKILLed and restarted once, and PostgreSQL backends are terminated.
When the queue has drained, the ledger holds every payment exactly once, to the cent.

The producer sends through the transactional outbox (idempotent.outbox): each payment is
staged in a committed transaction and published at once, and a relay runs beside it. The
Redis transport can lose a message popped by a worker (or served by a broker) that is
SIGKILLed before kombu records it as unacked; no consumer-side library can see that. The
outbox does: an entry whose consumer record has not appeared ``CONFIRM_AFTER`` seconds
after its publish is published again. There is no reconciliation step in the test: it
prints how many entries the relay re-published and how many payments were applied only
after a re-publish (their first message lost by the broker, or still queued).

``IDEMPOTENT_CHAOS_PAYMENTS=20000`` runs a larger round (CI runs 2,000);
``IDEMPOTENT_CHAOS_SEED`` repeats a round.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _celery_app import apply_payment
from _celery_harness import Broker, Worker, ledger_database, payments_rows, wait_until, worker_env
from _servers import PostgresServer, RedisServer
from celery import Celery
from idempotent.integrations.celery import send_once
from idempotent.integrations.celery_outbox import CeleryPublisher, stage_task
from kombu import Connection

from idempotent import SqlStore
from idempotent.outbox import Outbox, RelayReport

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PAYMENTS = int(os.environ.get("IDEMPOTENT_CHAOS_PAYMENTS", "2000"))
SEED = int(os.environ.get("IDEMPOTENT_CHAOS_SEED", str(random.randrange(1 << 30))))
VISIBILITY = 4  # seconds before an unacked message of a dead worker is handed out again
WORKERS = 2
CONCURRENCY = 2
CHAOS_EVERY = (1.5, 4.0)  # seconds between two blows, drawn uniformly
BACKEND_TERMINATIONS = 3
DEADLINE = 110.0 + PAYMENTS / 20  # seconds for the whole drain (2,000 payments: 210 s)
CONFIRM_AFTER = 30.0  # seconds from a publish to the first re-publish of an unconfirmed entry
STAGE_BATCH = 50  # payments per producer transaction


@dataclass
class Chaos:
    """What was done to the system, to print next to the ledger's counts."""

    worker_kills: int = 0
    child_kills: int = 0
    broker_restarts: int = 0
    backend_terminations: int = 0
    backends_terminated: int = 0
    events: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    """A broker of our own, persistent (AOF, fsync on every write) so a restart keeps its
    queue and its unacked set, as a production broker would."""
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    name, url = ledger_database(pg_server, "chaos")
    try:
        yield name, url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def logs() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="idem-chaos-"))
    yield path
    if not os.environ.get("IDEMPOTENT_KEEP_LOGS"):
        shutil.rmtree(path, ignore_errors=True)


def _publish(outbox: Outbox, broker_url: str, payments: list[dict[str, Any]],
             rng: random.Random) -> int:
    """Each payment staged once in the outbox (in transactions of `STAGE_BATCH`, published
    right after each COMMIT), and 0-2 more copies sent directly with send_once (a producer
    that retried): one task id per payment, whatever the copies."""
    order = payments[:]
    rng.shuffle(order)
    for i in range(0, len(order), STAGE_BATCH):
        for attempt in range(20):  # as a producer does: its transaction failed, try again
            try:
                with outbox.begin() as conn:
                    for p in order[i:i + STAGE_BATCH]:
                        stage_task(outbox, conn, apply_payment, (p,))
                break
            except sa.exc.OperationalError:  # its PostgreSQL backend was terminated
                time.sleep(0.1 * (attempt + 1))
        else:
            raise AssertionError("the producer could not commit a batch in 20 attempts")
    copies = [p for p in payments for _ in range(rng.randint(0, 2))]
    rng.shuffle(copies)
    with Connection(broker_url) as conn:
        for p in copies:
            send_once(apply_payment, (p,), connection=conn)
    return len(payments) + len(copies)


def _blow(rng: random.Random, workers: list[Worker], chaos: Chaos) -> bool:
    """SIGKILL a whole worker (parent and pool) and start it again, or one pool child.
    Only a worker that got as far as consuming is hit: on a loaded machine a restart can
    take seconds, and killing workers that never got to work would only stall the run."""
    ready = [w for w in workers if w.ready()]
    if not ready:
        return False
    w = rng.choice(ready)
    children = w.children()
    if children and chaos.child_kills < chaos.worker_kills:  # the two kinds take turns
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


def test_chaos_every_payment_once(pg_server: PostgresServer, broker: RedisServer,
                                  db: tuple[str, str], logs: Path) -> None:
    """Ledger rows == unique payments, amounts exact, 0 lost, 0 doubled, after SIGKILLed
    workers and children, a SIGKILLed broker and terminated database sessions."""
    dbname, db_url = db
    rng = random.Random(SEED)
    accounts = [f"acc_{i:03d}" for i in range(50)]
    payments = [{"payment_id": f"pay_{i:06d}", "account": rng.choice(accounts),
                 "cents": rng.randint(1, 10_000_000)} for i in range(PAYMENTS)]
    expected = {p["payment_id"]: p["cents"] for p in payments}
    env = worker_env(broker=broker.url, db=db_url, visibility=VISIBILITY, backend=None)
    workers = [Worker(f"c{i}", env, logs, concurrency=CONCURRENCY) for i in range(WORKERS)]
    queue = Broker(broker.url)
    engine = sa.create_engine(db_url, pool_pre_ping=True)  # our backends get terminated too
    outbox_store = SqlStore(sa.create_engine(db_url, pool_pre_ping=True))
    relay_app = Celery("chaos-relay", broker=broker.url, set_as_current=False)
    outbox = Outbox(outbox_store, [CeleryPublisher(relay_app)], grace=2,
                    confirm_after=CONFIRM_AFTER, max_publishes=6, retry_after=0.5)
    outbox_store.create_schema()
    relay_stop = threading.Event()
    relay_reports: list[RelayReport] = []
    relay = threading.Thread(
        target=lambda: relay_reports.append(outbox.run_relay(interval=0.5, stop=relay_stop)),
        name="outbox-relay")
    chaos = Chaos()
    started = time.monotonic()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        relay.start()
        # the producer stages and publishes while the blows fall
        sent: list[int] = []
        producer = threading.Thread(target=lambda: sent.append(
            _publish(outbox, broker.url, payments, random.Random(rng.random()))),
            name="producer")
        producer.start()

        def applied() -> int:
            with engine.connect() as c:
                return int(c.execute(sa.text(
                    "SELECT count(DISTINCT payment_id) FROM celery_ledger")).scalar() or 0)

        broker_at = rng.uniform(0.2, 0.5) * PAYMENTS  # restart the broker once, mid-run
        terminate_at = sorted(rng.uniform(0.1, 0.8) * PAYMENTS
                              for _ in range(BACKEND_TERMINATIONS))
        deadline = started + DEADLINE
        next_blow = time.monotonic() + rng.uniform(*CHAOS_EVERY)
        milestones = [PAYMENTS * k / 8 for k in range(1, 8)]
        while (done := applied()) < PAYMENTS:
            assert time.monotonic() < deadline, (
                f"only {done}/{PAYMENTS} applied; broker {queue.counts()}; "
                f"chaos {chaos.events[-5:]}\n{workers[0].log_tail()}")
            if not chaos.broker_restarts and done >= broker_at:
                before = queue.counts()
                old_pid = broker.pid
                broker.restart(kill=True)
                after = wait_until(lambda: (c := queue.counts())["ready"] >= 0 and c, 30,
                                   "broker answers again")
                assert broker.pid != old_pid
                # the AOF kept what was queued or held: the restart lost no message
                assert after["ready"] + after["unacked"] > 0 or \
                    before["ready"] + before["unacked"] == 0, (before, after)
                chaos.broker_restarts += 1
                chaos.events.append(f"SIGKILL broker pid {old_pid}, restarted as "
                                    f"{broker.pid}: before {before}, after {after}")
            if terminate_at and done >= terminate_at[0]:
                terminate_at.pop(0)
                pids = pg_server.terminate_backends(dbname=dbname)
                chaos.backend_terminations += 1
                chaos.backends_terminated += len(pids)
                chaos.events.append(f"terminated {len(pids)} PostgreSQL backends")
            # a blow every few seconds, and at least one per eighth of the run, however
            # fast or slow the machine is
            due = milestones and done >= milestones[0]
            if (time.monotonic() >= next_blow or due) and _blow(rng, workers, chaos):
                if due:
                    milestones.pop(0)
                next_blow = time.monotonic() + rng.uniform(*CHAOS_EVERY)
            time.sleep(0.2)
        producer.join(max(10.0, deadline - time.monotonic()))
        assert sent, "the producer did not finish"
        published = sent[0]
        # the last redeliveries (and duplicate copies) must drain too, and every outbox
        # entry be confirmed by its payment's record; no producer reconciliation
        wait_until(queue.empty, max(10.0, deadline - time.monotonic()), "queue drained",
                   describe=lambda: f"{queue.counts()}")
        wait_until(lambda: outbox.stats().counts == {"confirmed": PAYMENTS},
                   max(10.0, deadline - time.monotonic()), "every outbox entry confirmed",
                   describe=lambda: f"{outbox.stats().counts}")
        rows = payments_rows(engine, "apply_payment")
        late = _applied_after_a_republish(engine)
    finally:
        relay_stop.set()
        if relay.is_alive():
            relay.join(60)
        for w in workers:
            w.stop()
        queue.close()
        engine.dispose()
        outbox_store.engine.dispose()
    elapsed = time.monotonic() - started
    relayed = sum(relay_reports, RelayReport())

    lost = sorted(set(expected) - set(rows))
    doubled = sorted(k for k, v in rows.items() if len(v) > 1)
    wrong = sorted(k for k, v in rows.items() if v[0] != expected.get(k))
    ledger_rows = sum(len(v) for v in rows.values())
    amount = sum(c for v in rows.values() for c in v)
    print(
        f"\nCelery chaos (seed {SEED}): {PAYMENTS} payments, {published} messages published, "
        f"{WORKERS} prefork workers x {CONCURRENCY}, visibility {VISIBILITY}s, "
        f"{elapsed:.0f}s\n"
        f"  workers SIGKILLed and restarted {chaos.worker_kills}, pool children SIGKILLed "
        f"{chaos.child_kills}, broker SIGKILLed and restarted {chaos.broker_restarts}, "
        f"PostgreSQL backends terminated {chaos.backends_terminated} "
        f"(in {chaos.backend_terminations} rounds)\n"
        f"  ledger rows {ledger_rows}, unique payments {PAYMENTS}, lost {len(lost)}, "
        f"doubled {len(doubled)}, wrong amount {len(wrong)}, "
        f"amount {amount} of {sum(expected.values())} cents\n"
        f"  outbox: {PAYMENTS} entries, each published by the producer after its COMMIT; "
        f"published by the relay because the payment's record was missing "
        f"{CONFIRM_AFTER:.0f}s later {relayed.published}, and again after that "
        f"{relayed.republished}; publish failures {relayed.failed}, given up "
        f"{relayed.unconfirmed}\n"
        f"  payments applied only after a re-publish (the broker lost their message, or "
        f"held it past {CONFIRM_AFTER:.0f}s): {len(late)} {late[:5]}; no producer "
        f"reconciliation step\n"
        + "".join(f"  - {e}\n" for e in chaos.events)
    )
    assert chaos.broker_restarts == 1
    assert chaos.worker_kills >= 2 and chaos.child_kills >= 2
    assert chaos.backends_terminated >= 1
    assert relayed.unconfirmed == 0
    assert lost == [] and doubled == [] and wrong == []
    assert ledger_rows == PAYMENTS
    assert amount == sum(expected.values())


def _applied_after_a_republish(engine: sa.Engine) -> list[str]:
    """Payments whose record was created after the relay's last publish of their entry:
    the producer's message (and any earlier re-publish) never got to a task before it."""
    with engine.connect() as c:
        return sorted(r[0] for r in c.execute(sa.text(
            "SELECT r.key FROM idempotency_outbox o JOIN idempotency_records r "
            "ON r.namespace = o.confirm_namespace AND r.key = o.confirm_key "
            "WHERE o.published_at IS NOT NULL AND r.created_at > o.published_at")))
