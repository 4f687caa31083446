"""Chaos on real Celery workers: thousands of payments, each published 1-3 times in a
shuffled order, while workers and pool children are SIGKILLed at random and restarted,
the broker is SIGKILLed and restarted once, and PostgreSQL backends are terminated.
When the queue has drained, the ledger holds every payment exactly once, to the cent.

One thing no consumer-side library can see: the Redis transport loses a message popped by
a worker (or served by a broker) that is SIGKILLed before kombu records it as unacked. The
test counts such messages, re-sends them as a producer's reconciliation would (together
with some payments already applied, which must stay single), and prints the count.

``IDEMPOTENT_CHAOS_PAYMENTS=20000`` runs a larger round (CI runs 2,000);
``IDEMPOTENT_CHAOS_SEED`` repeats a round.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
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
from idempotent.integrations.celery import send_once
from kombu import Connection

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PAYMENTS = int(os.environ.get("IDEMPOTENT_CHAOS_PAYMENTS", "2000"))
SEED = int(os.environ.get("IDEMPOTENT_CHAOS_SEED", str(random.randrange(1 << 30))))
VISIBILITY = 4  # seconds before an unacked message of a dead worker is handed out again
WORKERS = 2
CONCURRENCY = 2
CHAOS_EVERY = (1.5, 4.0)  # seconds between two blows, drawn uniformly
BACKEND_TERMINATIONS = 3
DEADLINE = 110.0 + PAYMENTS / 20  # seconds for the whole drain (2,000 payments: 210 s)


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


def _publish(broker_url: str, payments: list[dict[str, Any]], rng: random.Random) -> int:
    """Each payment 1-3 times, shuffled; a copy goes either with the task id derived from
    its payment id (send_once) or with a random one (a producer that forgot): the worker
    keys by payment id, so both collapse."""
    copies = [p for p in payments for _ in range(rng.randint(1, 3))]
    rng.shuffle(copies)
    with Connection(broker_url) as conn:
        for p in copies:
            if rng.random() < 0.5:
                send_once(apply_payment, (p,), connection=conn)
            else:
                apply_payment.apply_async((p,), connection=conn)
    return len(copies)


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
    chaos = Chaos()
    started = time.monotonic()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        published = _publish(broker.url, payments, rng)

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
        empty_since: float | None = None
        while (done := applied()) < PAYMENTS:
            # nothing ready, nothing unacked for a while, after the broker restart: the
            # messages of the payments still missing are gone from the broker
            if not queue.empty():
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            elif time.monotonic() - empty_since > 3.0 and chaos.broker_restarts:
                break
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
        # the last redeliveries (and duplicate copies) must drain too: nothing left unacked
        wait_until(queue.empty, max(10.0, deadline - time.monotonic()), "queue drained",
                   describe=lambda: f"{queue.counts()}")
        # The producer's reconciliation, as a payment system runs it: re-send what the
        # ledger lacks, and (to show re-sends are harmless) some payments already applied.
        # On the Redis transport a message can vanish before any task code sees it: kombu
        # pops it (BRPOP) and records it as unacked in a second round trip, so a worker
        # or broker SIGKILLed between the two loses it (celery#4354, kombu#305).
        applied_ids = set(payments_rows(engine, "apply_payment"))
        vanished = sorted(set(expected) - applied_ids)
        resent = vanished + rng.sample(sorted(applied_ids), min(50, len(applied_ids)))
        by_id = {p["payment_id"]: p for p in payments}
        with Connection(broker.url) as conn:
            for pid in resent:
                send_once(apply_payment, (by_id[pid],), connection=conn)
        wait_until(lambda: applied() == PAYMENTS and queue.empty(), 60,
                   "re-sent payments applied", describe=lambda: f"{queue.counts()}")
        rows = payments_rows(engine, "apply_payment")
    finally:
        for w in workers:
            w.stop()
        queue.close()
        engine.dispose()
    elapsed = time.monotonic() - started

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
        f"  messages that vanished from the broker before reaching any task (Redis transport, "
        f"SIGKILL between BRPOP and the unacked record) {len(vanished)} {vanished[:5]}; "
        f"re-sent by the producer with {len(resent) - len(vanished)} already applied\n"
        + "".join(f"  - {e}\n" for e in chaos.events)
    )
    assert chaos.broker_restarts == 1
    assert chaos.worker_kills >= 2 and chaos.child_kills >= 2
    assert chaos.backends_terminated >= 1
    assert lost == [] and doubled == [] and wrong == []
    assert ledger_rows == PAYMENTS
    assert amount == sum(expected.values())
