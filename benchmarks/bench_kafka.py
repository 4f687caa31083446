"""Kafka batch consumers on PostgreSQL: positions in the transaction, and business keys,
against the same consumer without any dedup.

Every variant consumes pre-produced JSON payments from librdkafka's mock cluster (one
broker, in this process, 4 partitions), 500 messages per batch, decodes them and writes
one ledger row per message with one INSERT ... SELECT unnest(...) statement per batch:

* ``no dedup (auto-commit)``: a plain confluent-kafka consumer, ``enable.auto.commit``
  on, one transaction per batch with the ledger rows only (baseline);
* ``positions``: `TransactionalConsumer`: the same rows, plus each partition's stored
  position advanced (fenced UPDATE) in the batch's transaction, Kafka offsets committed
  asynchronously after it;
* ``positions + business keys``: the same with ``key=header("payment-id")``: one
  ``record_many`` statement per batch before the handler.

Each variant run gets a fresh topic and group; the group join (and the first batch) is
not timed. Figures: messages per second, medians over interleaved rounds; ratio vs the
baseline of the same round.

Run: ``.venv/bin/python benchmarks/bench_kafka.py [--quick] [--json]``
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import _common as C  # sets up sys.path first
import sqlalchemy as sa
from _kafka import QUIET, MockKafka
from confluent_kafka import Consumer
from idempotent.integrations.kafka import Message, TransactionalConsumer, header

from idempotent import SqlStore

BATCH = 500
TARGETS = {"positions": (0.9, 50_000.0), "positions + business keys": (0.5, 25_000.0)}


class Bench:
    def __init__(self, kafka: MockKafka, engine: sa.Engine, store: SqlStore) -> None:
        self.kafka, self.engine, self.store = kafka, engine, store
        md = sa.MetaData()
        self.ledger = sa.Table(
            "bench_kafka_ledger", md,
            sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
            sa.Column("payment_id", sa.String(64), nullable=False),
            sa.Column("cents", sa.BigInteger, nullable=False),
        )
        md.drop_all(engine)
        md.create_all(engine)
        self.unnest = sa.text(
            "INSERT INTO bench_kafka_ledger (payment_id, cents) "
            "SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:cents AS bigint[]))")
        store.create_schema()
        self.ids = itertools.count()
        self.expected = 0

    def topic(self, n_msgs: int) -> tuple[str, str]:
        tag = uuid.uuid4().hex[:10]
        topic = f"bench-{tag}"
        rows = []
        for i in range(n_msgs):
            pid = f"{tag}-{next(self.ids)}"
            rows.append({"value": json.dumps({"payment_id": pid, "cents": 100 + i % 900})
                         .encode(), "headers": [("payment-id", pid.encode())],
                         "partition": i % 4})
        self.kafka.produce(topic, rows)
        return topic, f"g-{tag}"

    def insert(self, conn: sa.Connection, values: list[Any]) -> None:
        """The batch's ledger rows in one statement (``unnest`` of two arrays)."""
        conn.execute(self.unnest, {"ids": [v["payment_id"] for v in values],
                                   "cents": [v["cents"] for v in values]})

    def baseline(self, n: int) -> tuple[float, float]:
        total = (n + 1) * BATCH
        topic, group = self.topic(total)
        c = Consumer({**self.kafka.consumer_config(group), "enable.auto.commit": True,
                      **QUIET})
        c.subscribe([topic])
        done = 0

        def batch() -> int:
            msgs = [m for m in c.consume(BATCH, 1.0) if m.error() is None]
            if msgs:
                with self.engine.begin() as conn:
                    self.insert(conn, [json.loads(m.value()) for m in msgs])
            return len(msgs)

        while done == 0:  # the group join and the first batch: untimed
            done += batch()

        def loop() -> None:
            nonlocal done
            while done < total:
                done += batch()

        t = C.timed(loop)
        c.close()
        self.expected += total
        return t

    def ours(self, *, keys: bool) -> C.Variant:
        def run(n: int) -> tuple[float, float]:
            total = (n + 1) * BATCH
            topic, group = self.topic(total)

            def apply(messages: list[Message], connection: sa.Connection) -> None:
                self.insert(connection, [m.value for m in messages])

            c = TransactionalConsumer(self.kafka.consumer_config(group), self.store,
                                      [topic], apply, decode=json.loads, batch_size=BATCH,
                                      batch_timeout=1.0,
                                      key=header("payment-id") if keys else None)
            done = 0
            while done == 0:
                done += c.poll_batch()

            def loop() -> None:
                nonlocal done
                while done < total:
                    done += c.poll_batch()

            t = C.timed(loop)
            ends = self.kafka.end_offsets(topic)
            if {p: (c.position(topic, p) or (0,))[0] for p in ends} != ends:
                raise AssertionError("the stored positions are not the end offsets")
            c.close()
            self.expected += total
            return t

        return run

    def check(self) -> int:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(sa.func.count()).select_from(self.ledger)).scalar_one()
        if rows != self.expected:
            raise AssertionError(f"ledger has {rows} rows, expected {self.expected}")
        return int(rows)


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[0], rounds=5, n=40, quick_rounds=2, quick_n=10)
    with C.postgres() as pg, MockKafka() as kafka:
        engine = sa.create_engine(pg.url, pool_size=1, max_overflow=0)
        store = SqlStore(engine)
        bench = Bench(kafka, engine, store)
        version = C.pg_version(engine)
        C.log(args, f"PostgreSQL {version}, mock Kafka at {kafka.bootstrap}, {args.n} batches "
                    f"of {BATCH}/variant/round")
        variants = {
            "no dedup (auto-commit)": bench.baseline,
            "positions": bench.ours(keys=False),
            "positions + business keys": bench.ours(keys=True),
        }
        start = time.monotonic()
        res = C.interleave(variants, rounds=args.rounds, n=args.n,
                           baseline="no dedup (auto-commit)", unit_per_op=BATCH, args=args,
                           warmup=2)
        rows = bench.check()
        engine.dispose()
    headers, table_rows = C.result_rows(res, rate_label="msg/s")
    headers[1], headers[2] = "µs/batch", "client CPU µs/batch"
    lines, targets = [], []
    for name, (ratio, rate) in TARGETS.items():
        for line, t in (C.target_line(f"{name} msg/s", res[name].per_s, rate, fmt="{:,.0f}"),
                        C.target_line(f"{name} ratio vs no dedup", res[name].ratio, ratio)):
            lines.append(line)
            targets.append(t)
    text = "\n".join([
        f"bench_kafka ({C.git_describe()}): PostgreSQL {version} (fsync on, loopback, psycopg, "
        f"one connection), librdkafka mock cluster in-process; batches of {BATCH} in one "
        f"transaction, one ledger row per message; {args.n} batches per variant per round, "
        f"{args.rounds} interleaved rounds, medians ({time.monotonic() - start:.0f} s)",
        C.table(headers, table_rows),
        f"ledger checked: {rows} rows, one per message",
        *lines,
    ])
    doc = {"benchmark": "kafka", "server_version": version, "batch": BATCH,
           "rounds": args.rounds, "batches_per_round": args.n,
           "results": [r.as_dict() for r in res.values()], "targets": targets}
    C.report(args, doc, text)


if __name__ == "__main__":
    main()
