"""Celery: tasks/s of an idempotent task against the same plain ``acks_late`` task.

One ``celery worker -P prefork`` process (``--concurrency``, default 2), a private
redis-server as the broker, a private PostgreSQL (fsync on) holding the ledger and the
records; both tasks live in the same worker (``tests/_celery_app.py``):

* ``plain acks_late``: ``t.plain_apply``, ``acks_late=True``, one Core INSERT in
  ``engine.begin()`` (baseline);
* ``idempotent``: ``t.apply_payment``, ``@idempotent_task(app, store, key="payment_id")``
  taking ``connection``: the same INSERT, plus the record written in the same transaction
  (transactional mode, optimistic, fingerprint on, result stored);
* ``idempotent, 10% dup``: the same task; every 10th message repeats the payment sent 9
  places before it, already applied by then (its stored result is returned, the body does
  not run).

A round of a variant: N messages are published to a queue of their own that no worker
consumes yet (untimed); the clock starts when the worker is told to consume it
(``add_consumer``) and stops when the broker holds none of them, ready or unacked (every
task has run and been acked). Besides the wall clock, the CPU time the worker's processes
and PostgreSQL's used in the round is read from ``/proc``: the cost of a task, which other
work on a shared machine disturbs much less than throughput. The variants run in
interleaved rounds; figures are medians, ratios per round (see ``_common.py``). After the
run the ledger is checked: one row per payment of each variant.

Run: ``.venv/bin/python benchmarks/bench_celery.py [--quick] [--json] [--concurrency C]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C  # sets up sys.path first
import redis
import sqlalchemy as sa
from _celery_app import apply_payment, ledger, metadata, plain_apply
from _celery_harness import Worker, worker_env
from _servers import RedisServer
from celery import Celery
from kombu import Connection

from idempotent import SqlStore

TARGET_RATIO = 0.80
POLL = 0.005  # seconds between two looks at the broker while a round drains
DUP_EVERY = 10


class Bench:
    def __init__(self, broker: RedisServer, engine: sa.Engine, worker: Worker,
                 pg_pid: int) -> None:
        self.pg_pid = pg_pid
        self.broker_url = broker.url
        self.redis = redis.Redis.from_url(broker.url)
        self.engine = engine
        self.worker = worker
        self.control = Celery("bench-control", broker=broker.url).control
        self.destination = [f"{worker.name}@{_hostname()}"]
        self.queues = itertools.count()
        self.payments = itertools.count()
        self.sent: dict[str, set[str]] = {"plain_apply": set(), "apply_payment": set()}
        #: per variant, per round (the warm-up too): (worker, PostgreSQL) CPU s per task
        self.split: dict[str, list[tuple[float, float]]] = {}

    def _payment(self) -> dict[str, Any]:
        i = next(self.payments)
        return {"payment_id": f"b{i:08d}", "account": f"acc_{i % 50}", "cents": 100 + i % 997}

    def variant(self, name: str, task: Any, tag: str, dup_every: int = 0) -> C.Variant:
        def run(n: int) -> tuple[float, float]:
            queue = f"bench{next(self.queues)}"
            msgs: list[dict[str, Any]] = []
            for i in range(n):
                if dup_every and i % dup_every == dup_every - 1:
                    # a redelivery of a payment sent 9 places earlier: done by the time this
                    # one is fetched (at most 2 x concurrency messages are in the worker)
                    msgs.append(msgs[i - dup_every + 1])
                else:
                    msgs.append(self._payment())
            with Connection(self.broker_url) as conn:
                for m in msgs:
                    task.apply_async((m,), connection=conn, queue=queue)
            self.sent[tag].update(m["payment_id"] for m in msgs)
            assert self.redis.llen(queue) == n

            def loop() -> None:
                self.control.add_consumer(queue, destination=self.destination, reply=True,
                                          timeout=10)
                while self.redis.llen(queue) or self.redis.hlen("unacked"):
                    time.sleep(POLL)

            w0, p0 = self.server_cpu()
            wall, _ = C.timed(loop)
            w1, p1 = self.server_cpu()
            self.split.setdefault(name, []).append(((w1 - w0) / n, (p1 - p0) / n))
            cpu = (w1 - w0) + (p1 - p0)
            self.control.cancel_consumer(queue, destination=self.destination, reply=True,
                                         timeout=10)
            return wall, cpu

        return run

    def server_cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the worker (parent and pool) and by PostgreSQL (the
        postmaster and its backends): what a task costs, whatever else runs on the machine."""
        worker = [self.worker.pid, *self.worker.children()]
        pg = [self.pg_pid, *_children(self.pg_pid)]
        return sum(map(_cpu_seconds, worker)), sum(map(_cpu_seconds, pg))

    def check(self) -> dict[str, int]:
        """Ledger rows per task; each must equal the payments sent to it (no doubles)."""
        out = {}
        with self.engine.connect() as c:
            for tag, sent in self.sent.items():
                rows, distinct = c.execute(
                    sa.select(sa.func.count(), sa.func.count(sa.distinct(ledger.c.payment_id)))
                    .where(ledger.c.task == tag)).one()
                assert rows == distinct == len(sent), (tag, rows, distinct, len(sent))
                out[tag] = int(rows)
        return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _hostname() -> str:
    import socket

    return socket.gethostname()


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--concurrency", type=int, default=2, help="pool processes (2)")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=1000, quick_n=200, extra=extra)
    logs = Path(tempfile.mkdtemp(prefix="idem-bench-celery-"))
    with C.postgres() as pg, RedisServer() as broker:
        engine = sa.create_engine(pg.url)
        metadata.create_all(engine)
        SqlStore(engine).create_schema()
        version = C.pg_version(engine)
        worker = Worker("bench", worker_env(broker=broker.url, db=pg.url, backend=None,
                                            visibility=3600),
                        logs, concurrency=args.concurrency, queues="celery")
        worker.start()
        try:
            worker.wait_ready()
            bench = Bench(broker, engine, worker, pg.pid)
            C.log(args, f"PostgreSQL {version}, redis-server at {broker.url}, worker pid "
                        f"{worker.pid} -c {args.concurrency}; {args.n} tasks/variant/round")
            variants = {
                name: bench.variant(name, task, tag, dup)
                for name, task, tag, dup in (
                    ("plain acks_late", plain_apply, "plain_apply", 0),
                    ("idempotent", apply_payment, "apply_payment", 0),
                    ("idempotent, 10% dup", apply_payment, "apply_payment", DUP_EVERY),
                )
            }
            res = C.interleave(variants, rounds=args.rounds, n=args.n,
                               baseline="plain acks_late", args=args)
            checked = bench.check()
        finally:
            worker.stop()
            engine.dispose()
            shutil.rmtree(logs, ignore_errors=True)

    headers, rows = C.result_rows(res, rate_label="tasks/s")
    headers[1] = "µs/task"
    headers[2] = "worker+PG CPU µs/task"
    cpu_ratio = {k: statistics.median(r.cpu_seconds) / statistics.median(
        res["plain acks_late"].cpu_seconds) for k, r in res.items()}
    line, target = C.target_line("idempotent tasks/s vs plain acks_late", res["idempotent"].ratio,
                                 TARGET_RATIO)
    text = "\n".join([
        f"bench_celery ({C.git_describe()}): celery worker -P prefork -c {args.concurrency}, "
        f"redis-server broker, PostgreSQL {version} (fsync on, loopback); {args.n} tasks per "
        f"variant per round, {args.rounds} interleaved rounds, medians; ratio = tasks/s / "
        "tasks/s of the plain acks_late task in the same round",
        C.table(headers, rows),
        "CPU per task, relative to the plain task (worker and PostgreSQL processes; steadier "
        "than tasks/s on a shared machine): "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_ratio.items()),
        "CPU µs per task, medians over rounds, worker / PostgreSQL: " + ", ".join(
            f"{k} {statistics.median(w for w, _ in v[1:]) * 1e6:,.0f} / "
            f"{statistics.median(p for _, p in v[1:]) * 1e6:,.0f}"
            for k, v in bench.split.items()),
        f"ledger checked: {checked} rows, one per payment",
        line,
    ])
    doc = {"benchmark": "celery", "server_version": version, "concurrency": args.concurrency,
           "rounds": args.rounds, "tasks_per_round": args.n,
           "results": [r.as_dict() for r in res.values()], "targets": [target]}
    C.report(args, doc, text)


if __name__ == "__main__":
    main()
