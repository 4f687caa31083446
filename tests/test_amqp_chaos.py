"""Chaos on real pika consumer processes: thousands of payments, each published 1-3 times
(half of the copies with a message id of their own, as a producer that sent twice), while
the 3 consumer processes are SIGKILLed and restarted at random, PostgreSQL backends are
terminated, and the RabbitMQ node is SIGKILLed and restarted once. When the queue has
drained, the ledger holds every payment exactly once, to the cent, and nothing was
dead-lettered.

``IDEMPOTENT_AMQP_CHAOS_PAYMENTS`` changes the size (default 3,000, to fit the suite's
time budget on a 2-core machine; 5,000 passes too, in 30-50 s more);
``IDEMPOTENT_CHAOS_SEED`` repeats a round.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from _amqp_common import Proc, declare, ledger, metadata, publish, ready_count, wait_until
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture
from _servers import PostgresServer

from idempotent import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PAYMENTS = int(os.environ.get("IDEMPOTENT_AMQP_CHAOS_PAYMENTS", "3000"))
SEED = int(os.environ.get("IDEMPOTENT_CHAOS_SEED", str(random.randrange(1 << 30))))
CONSUMERS = 3
CHAOS_EVERY = (0.8, 2.0)  # seconds between two SIGKILLs, drawn uniformly
BACKEND_TERMINATIONS = 3
DEADLINE = 120.0 + PAYMENTS / 25  # seconds for the whole run (5,000 payments: 320 s)


@dataclass
class Chaos:
    kills: int = 0
    broker_restarts: int = 0
    backends_terminated: int = 0
    events: list[str] = field(default_factory=list)


@pytest.fixture
def db(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    name = f"amqp_chaos_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    url = pg_server.url_for(name)
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    SqlStore(engine).create_schema()
    engine.dispose()
    try:
        yield name, url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def logs() -> Iterator[Path]:
    import shutil

    path = Path(tempfile.mkdtemp(prefix="idem-amqp-chaos-"))
    yield path
    if not os.environ.get("IDEMPOTENT_KEEP_LOGS"):
        shutil.rmtree(path, ignore_errors=True)


def ledger_rows(engine: sa.Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with engine.connect() as c:
        for pid, cents in c.execute(sa.select(ledger.c.payment_id, ledger.c.cents)):
            out.setdefault(pid, []).append(int(cents))
    return out


def test_amqp_chaos_every_payment_once(pg_server: PostgresServer, rabbit: RabbitServer,  # noqa: F811
                                       db: tuple[str, str], logs: Path) -> None:
    """Ledger rows == unique payments, amounts exact, 0 lost, 0 doubled, 0 dead-lettered,
    after SIGKILLed consumers, a SIGKILLed and restarted broker, terminated PostgreSQL
    sessions."""
    dbname, db_url = db
    rng = random.Random(SEED)
    q = f"chaos-{uuid.uuid4().hex[:8]}"
    dlx = f"{q}.dlx"
    declare(rabbit.url, q, quorum=True, dlx=dlx)
    pays = [{"payment_id": f"pay_{i:06d}", "cents": rng.randint(1, 10_000_000)}
            for i in range(PAYMENTS)]
    expected = {p["payment_id"]: p["cents"] for p in pays}
    copies = [p for p in pays for _ in range(rng.randint(1, 3))]
    rng.shuffle(copies)
    started = time.monotonic()
    published = publish(rabbit.url, q, [
        (p, {"message_id": p["payment_id"] if rng.random() < 0.5 else str(uuid.uuid4())})
        for p in copies])
    procs = [Proc(f"c{i}", [rabbit.url, db_url, q, dlx], logs) for i in range(CONSUMERS)]
    engine = sa.create_engine(db_url, pool_pre_ping=True)
    chaos = Chaos()

    def applied() -> int:
        with engine.connect() as c:
            return int(c.execute(sa.select(
                sa.func.count(sa.distinct(ledger.c.payment_id)))).scalar() or 0)

    def describe() -> str:
        return (f"{applied()}/{PAYMENTS} applied; {chaos.events[-4:]}\n"
                f"{procs[0].current_log()[-2000:]}")

    try:
        for p in procs:
            p.start()
        broker_at = rng.uniform(0.3, 0.5) * PAYMENTS
        terminate_at = sorted(rng.uniform(0.1, 0.8) * PAYMENTS
                              for _ in range(BACKEND_TERMINATIONS))
        deadline = started + DEADLINE
        next_kill = time.monotonic() + rng.uniform(*CHAOS_EVERY)
        while (done := applied()) < PAYMENTS:
            assert time.monotonic() < deadline, describe()
            if not chaos.broker_restarts and done >= broker_at:
                old = rabbit.pid
                rabbit.restart(kill=True)  # SIGKILL of the node's process group
                chaos.broker_restarts += 1
                chaos.events.append(f"SIGKILL rabbitmq {old} at {done} applied, restarted")
            if terminate_at and done >= terminate_at[0]:
                terminate_at.pop(0)
                pids = pg_server.terminate_backends(dbname=dbname)
                chaos.backends_terminated += len(pids)
                chaos.events.append(f"terminated {len(pids)} PostgreSQL backends at {done}")
            if time.monotonic() >= next_kill:
                # only a consumer that got as far as consuming: killing ones still
                # starting on a loaded machine would only stall the run
                ready = [p for p in procs if p.ready()]
                if ready:
                    victim = rng.choice(ready)
                    victim.kill()
                    victim.start()
                    chaos.kills += 1
                    chaos.events.append(f"SIGKILL {victim.name} at {done}")
                next_kill = time.monotonic() + rng.uniform(*CHAOS_EVERY)
            time.sleep(0.1)
        # every copy must be handled too (the duplicates, the redeliveries): stop the
        # consumers cleanly, so whatever they held goes back to the queue, and look
        while True:
            for p in procs:
                p.stop()
            left = ready_count(rabbit.url, q)
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} messages left; {describe()}"
            for p in procs:
                p.start()
            wait_until(lambda: ready_count(rabbit.url, q) == 0, max(
                5.0, deadline - time.monotonic()), "queue drained", describe)
        dead = ready_count(rabbit.url, dlx)
        rows = ledger_rows(engine)
    finally:
        for p in procs:
            p.stop(10)
        engine.dispose()
    elapsed = time.monotonic() - started
    lost = sorted(set(expected) - set(rows))
    doubled = sorted(k for k, v in rows.items() if len(v) > 1)
    wrong = sorted(k for k, v in rows.items() if v[0] != expected.get(k))
    n_rows = sum(len(v) for v in rows.values())
    amount = sum(c for v in rows.values() for c in v)
    print(
        f"\nAMQP chaos (seed {SEED}): {PAYMENTS} payments, {published} messages, "
        f"{CONSUMERS} pika consumer processes, quorum queue, {elapsed:.0f}s\n"
        f"  consumers SIGKILLed and restarted {chaos.kills}, rabbitmq SIGKILLed and "
        f"restarted {chaos.broker_restarts}, PostgreSQL backends terminated "
        f"{chaos.backends_terminated}\n"
        f"  ledger rows {n_rows}, unique payments {PAYMENTS}, lost {len(lost)}, doubled "
        f"{len(doubled)}, wrong amount {len(wrong)}, dead-lettered {dead}, amount {amount} "
        f"of {sum(expected.values())} cents\n" + "".join(f"  - {e}\n" for e in chaos.events))
    assert chaos.broker_restarts == 1 and chaos.kills >= 3 and chaos.backends_terminated >= 1
    assert lost == [] and doubled == [] and wrong == []
    assert n_rows == PAYMENTS and amount == sum(expected.values())
    assert dead == 0
