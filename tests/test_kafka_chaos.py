"""Kafka consumers as real processes: SIGKILLed and restarted at random while PostgreSQL
backends are terminated (every payment applied once, the amounts exact, every position
at its partition's end), and a zombie (SIGSTOPped past its session timeout while holding
a batch) whose commit is refused after SIGCONT."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _kafka import PARTITIONS, MockKafka, wait_until
from _kafka_payments import ledger, ledger_figures, metadata, payments
from _servers import PostgresServer

from idempotent import SqlStore

WORKER = str(Path(__file__).with_name("_kafka_worker.py"))

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def kafka() -> Iterator[MockKafka]:
    with MockKafka() as cluster:
        yield cluster


@pytest.fixture
def store(pg_url: str) -> Iterator[SqlStore]:
    s = SqlStore(pg_url)
    s.create_schema()
    metadata.create_all(s.engine)
    yield s
    s.engine.dispose()


class Worker:
    """One consumer process (tests/_kafka_worker.py), stopped by its PID."""

    def __init__(self, spec: dict[str, Any], tmp: Path, name: str) -> None:
        self.spec = {**spec, "worker": name, "status": str(tmp / f"{name}.status")}
        self.log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, WORKER, json.dumps(self.spec)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def status(self) -> dict[str, Any] | None:
        path = Path(self.spec["status"])
        return json.loads(path.read_text()) if path.exists() else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.kill()
        return code


def positions(store: SqlStore, group: str, topic: str) -> dict[int, int]:
    t = store.positions
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.partition, t.c.next_offset).where(
            (t.c.consumer_group == group) & (t.c.topic == topic))).all()
    return {int(p): int(o) for p, o in rows}


def test_chaos_sigkill_and_terminated_backends(
        kafka: MockKafka, store: SqlStore, pg_server: PostgresServer, pg_url: str,
        tmp_path: Path) -> None:
    """20,000 payments produced 1-3 times each (duplicates at new offsets) while 3
    consumers are SIGKILLed and restarted every 1-4 s and PostgreSQL backends are
    terminated in 3 rounds: ledger rows == unique payments, the amounts exact, every
    stored position == its partition's end offset."""
    tag = uuid.uuid4().hex[:8]
    topic, group = f"chaos-{tag}", f"chaos-{tag}"
    msgs, amounts = payments(20_000, copies=(1, 3), seed=11)
    spec = {"bootstrap": kafka.bootstrap, "url": pg_url, "topic": topic, "group": group,
            "key": True, "batch_size": 200, "stop": str(tmp_path / "stop")}
    rng = random.Random(5)
    serial = iter(range(1000))
    workers = [Worker(spec, tmp_path, f"w{next(serial)}") for _ in range(3)]
    chunks = [msgs[i::8] for i in range(8)]
    kills = terminated = rounds = 0
    try:
        for step, chunk in enumerate(chunks):
            kafka.produce(topic, chunk)
            time.sleep(rng.uniform(1, 4))  # the chaos schedule, not a wait for a result
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            kills += 1
            workers[victim] = Worker(spec, tmp_path, f"w{next(serial)}")
            if step in (1, 3, 5):  # a round ends when it terminated at least one backend
                rounds += 1
                before = terminated

                def terminate(before: int = before) -> bool:
                    nonlocal terminated
                    terminated += len(pg_server.terminate_backends(
                        application_name="kafka-worker",
                        dbname=sa.make_url(pg_url).database))
                    return terminated > before

                wait_until(terminate, 30, "a worker's backend to terminate", step=0.05)
        ends = kafka.end_offsets(topic)
        assert sum(ends.values()) == len(msgs)
        wait_until(lambda: positions(store, group, topic) == ends, 150,
                   "every stored position at its partition's end", step=0.25)
        Path(spec["stop"]).touch()
        for w in workers:
            assert w.wait(60) == 0, w.status
    finally:
        for w in workers:
            w.kill()
    rows, distinct, cents = ledger_figures(store.engine)
    print(f"\nkafka chaos: {len(msgs)} messages for {len(amounts)} payments, {kills} SIGKILLs, "
          f"{terminated} backends terminated in {rounds} rounds -> {rows} ledger rows, "
          f"{distinct} distinct, cents {cents} (expected {sum(amounts.values())}); "
          f"lost {len(amounts) - distinct}, doubled {rows - distinct}")
    assert (rows, distinct, cents) == (len(amounts), len(amounts), sum(amounts.values()))
    assert kills == 8 and rounds == 3 and terminated >= 3
    assert positions(store, group, topic) == ends


def test_zombie_commit_is_refused(kafka: MockKafka, store: SqlStore, pg_url: str,
                                  tmp_path: Path) -> None:
    """A consumer SIGSTOPped past its session timeout while its first batch is written but
    not committed: the partitions move to another member, which applies everything;
    after SIGCONT the zombie's commit is refused with `PositionFenced` and none of its
    rows exist."""
    from _kafka import FAST_GROUP
    from _kafka_payments import apply_batch
    from idempotent.integrations.kafka import TransactionalConsumer

    tag = uuid.uuid4().hex[:8]
    topic, group = f"zombie-{tag}", f"zombie-{tag}"
    msgs, amounts = payments(2000, seed=3)
    kafka.produce(topic, msgs)
    hold = tmp_path / "go"
    zombie = Worker({"bootstrap": kafka.bootstrap, "url": pg_url, "topic": topic,
                     "group": group, "batch_size": 300, "stop": str(tmp_path / "stop"),
                     "hold": str(hold)}, tmp_path, "zombie")
    heir = None
    try:
        wait_until(lambda: (zombie.status or {}).get("holding"), 60, "the zombie's batch")
        held = zombie.status["holding"]  # type: ignore[index]
        os.kill(zombie.proc.pid, signal.SIGSTOP)
        heir = TransactionalConsumer(kafka.consumer_config(group), store, [topic],
                                     apply_batch("heir"), decode=json.loads)
        ends = kafka.end_offsets(topic)
        deadline = time.monotonic() + 60
        while positions(store, group, topic) != ends:
            assert time.monotonic() < deadline, "the heir never reached the end offsets"
            heir.poll_batch(0.1)
        with store.engine.connect() as conn:  # the zombie's uncommitted rows are invisible
            assert conn.execute(sa.select(sa.func.count()).where(
                ledger.c.worker == "zombie")).scalar_one() == 0
        hold.touch()
        os.kill(zombie.proc.pid, signal.SIGCONT)
        code = zombie.wait(60)
    finally:
        os.kill(zombie.proc.pid, signal.SIGCONT) if zombie.proc.poll() is None else None
        zombie.kill()
        if heir is not None:
            heir.close()
    status = zombie.status
    assert code == 3 and status is not None and status["error"] == "PositionFenced", status
    assert status["found"][1] > status["generation"]  # the heir's newer generation
    assert status["found"][0] == ends[status["partition"]]
    assert held > 0 and FAST_GROUP["session.timeout.ms"] == 3000
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(
            ledger.c.worker == "zombie")).scalar_one() == 0
    assert ledger_figures(store.engine) == (2000, 2000, sum(amounts.values()))
    assert positions(store, group, topic) == ends
    assert len(ends) == PARTITIONS
