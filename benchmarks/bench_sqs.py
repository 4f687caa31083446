"""SQS: API calls per message, and messages/s, of `SqsConsumer` against a bare loop.

A private moto server (SQS's HTTP API, ``tests/_moto.py``) and a private PostgreSQL (fsync
on) holding a ledger; every variant writes one ledger row per message, each in its own
transaction, and receives up to 10 messages per long poll:

* ``bare loop`` (baseline): receive, INSERT in ``engine.begin()``, one
  ``DeleteMessageBatch`` per receive; no dedup, no visibility management;
* ``bare loop, delete each``: the same with one ``DeleteMessage`` per message (what a
  hand-written worker often does; for reference);
* ``SqsConsumer``: ``sqs_handler`` in transactional mode (the same INSERT, the key and
  result recorded in the same transaction), batched deletes, the visibility heartbeat on.

A round of a variant: N messages are sent to a fresh queue (untimed), then consumed until
all N are applied (timed). API calls are counted with botocore's ``before-call`` event
hook on the consumer's client (receive, delete, visibility changes, including the
heartbeat thread's). The variants run in interleaved rounds; figures are medians, ratios
per round (see ``_common.py``).

After them, one run with a **slow handler** (each message takes 0.4 s, the visibility
timeout is 2 s: a batch of 10 outlives its timeout twice) shows what the heartbeat costs:
its ``ChangeMessageVisibilityBatch`` calls per message.

moto's receive and delete scan the whole queue, so its figures of messages/s are not
AWS's; the calls per message are what SQS bills and what this measures.

Run: ``.venv/bin/python benchmarks/bench_sqs.py [--quick] [--json] [--rounds R] [--n N]``
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from typing import Any

import _common as C  # sets up sys.path first
import sqlalchemy as sa
from _moto import MotoServer, make_queue
from idempotent.integrations.sqs import SqsConsumer, SqsMessage, body_field, sqs_handler

from idempotent import SqlStore

TARGET_CALLS = 0.25
SLOW_N, SLOW_SECONDS, SLOW_VISIBILITY = 20, 0.4, 2

meta = sa.MetaData()
ledger = sa.Table("bench_ledger", meta,
                  sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                  sa.Column("payment_id", sa.String(64), nullable=False),
                  sa.Column("cents", sa.Integer, nullable=False))


class Bench:
    def __init__(self, moto: MotoServer, engine: sa.Engine, store: SqlStore) -> None:
        self.client = moto.client()
        self.producer = moto.client()
        self.engine, self.store = engine, store
        self.calls: dict[str, Counter[str]] = {}
        self.messages: Counter[str] = Counter()
        self.serial = 0

    def fill(self, n: int, **queue: Any) -> tuple[str, str | None]:
        url, dlq = make_queue(self.producer, dlq=True, **queue)
        for i in range(0, n, 10):
            self.serial += 1
            entries = [{"Id": str(j), "MessageBody": json.dumps(
                {"payment_id": f"b{self.serial}-{j}", "cents": 1})} for j in range(min(10, n - i))]
            self.producer.send_message_batch(QueueUrl=url, Entries=entries)
        return url, dlq

    # -- the variants ------------------------------------------------------------------
    def bare(self, batch_delete: bool) -> C.Variant:
        name = "bare loop" if batch_delete else "bare loop, delete each"

        def variant(n: int) -> tuple[float, float]:
            url, _ = self.fill(n)
            client, engine = self.client, self.engine

            def consume() -> None:
                done = 0
                while done < n:
                    got = client.receive_message(
                        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                        VisibilityTimeout=30).get("Messages", [])
                    for m in got:
                        body = json.loads(m["Body"])
                        with engine.begin() as conn:
                            conn.execute(sa.insert(ledger).values(
                                payment_id=body["payment_id"], cents=body["cents"]))
                    if batch_delete and got:
                        client.delete_message_batch(QueueUrl=url, Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(got)])
                    elif got:
                        for m in got:
                            client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                    done += len(got)

            return self._measure(name, n, consume)
        return variant

    def ours(self) -> C.Variant:
        @sqs_handler(self.store, key=body_field("payment_id"), namespace="bench.sqs")
        def apply(message: SqsMessage, *, connection: Any) -> None:
            connection.execute(sa.insert(ledger).values(
                payment_id=message.body["payment_id"], cents=message.body["cents"]))

        def variant(n: int) -> tuple[float, float]:
            url, dlq = self.fill(n)
            with SqsConsumer(self.client, url, apply, wait_time=1,
                             dead_letter_queue_url=dlq) as consumer:
                def consume() -> None:
                    done = 0
                    while done < n:
                        done += len(consumer.poll())
                return self._measure("SqsConsumer", n, consume)
        return variant

    def _measure(self, name: str, n: int, consume: Any) -> tuple[float, float]:
        calls: Counter[str] = Counter()

        def hook(model: Any, **_: Any) -> None:
            calls[model.name] += 1

        events = self.client.meta.events
        events.register("before-call.sqs.*", hook, unique_id="bench-count")
        try:
            result = C.timed(consume)
        finally:
            events.unregister("before-call.sqs.*", unique_id="bench-count")
        self.calls.setdefault(name, Counter()).update(calls)
        self.messages[name] += n
        return result

    def slow(self) -> tuple[Counter[str], int]:
        """The slow-handler run: calls by operation, and the messages."""
        @sqs_handler(self.store, key=body_field("payment_id"), namespace="bench.sqs.slow")
        def apply(message: SqsMessage, *, connection: Any) -> None:
            connection.execute(sa.insert(ledger).values(
                payment_id=message.body["payment_id"], cents=message.body["cents"]))
            time.sleep(SLOW_SECONDS)

        url, dlq = self.fill(SLOW_N)
        with SqsConsumer(self.client, url, apply, wait_time=1, visibility_timeout=SLOW_VISIBILITY,
                         dead_letter_queue_url=dlq) as consumer:
            def consume() -> None:
                done = 0
                while done < SLOW_N:
                    done += len(consumer.poll())
            self._measure("slow handler", SLOW_N, consume)
        return self.calls["slow handler"], SLOW_N

    def per_message(self, name: str) -> float:
        return sum(self.calls[name].values()) / self.messages[name]

    def close(self) -> None:
        self.client.close()
        self.producer.close()


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[0], rounds=5, n=200, quick_rounds=2, quick_n=50)
    with C.postgres() as pg, MotoServer() as moto:
        engine = sa.create_engine(pg.url)
        meta.create_all(engine)
        store = SqlStore(engine)
        store.create_schema()
        version = C.pg_version(engine)
        bench = Bench(moto, engine, store)
        try:
            C.log(args, f"PostgreSQL {version}, moto at {moto.endpoint}; "
                        f"{args.n} messages/variant/round")
            variants = {"bare loop": bench.bare(True),
                        "bare loop, delete each": bench.bare(False),
                        "SqsConsumer": bench.ours()}
            res = C.interleave(variants, rounds=args.rounds, n=args.n, baseline="bare loop",
                               args=args, warmup=20)
            slow_calls, slow_n = bench.slow()
        finally:
            bench.close()
            engine.dispose()
    headers, rows = C.result_rows(res, rate_label="msgs/s")
    headers[1] = "µs/msg"
    calls = {k: bench.per_message(k) for k in [*variants, "slow handler"]}
    line, target = C.target_line("SqsConsumer API calls per message (batches of 10)",
                                 calls["SqsConsumer"], TARGET_CALLS, higher_is_better=False)
    by_op = {k: dict(bench.calls[k]) for k in calls}
    text = "\n".join([
        f"bench_sqs ({C.git_describe()}): moto server (SQS API over HTTP, loopback), "
        f"PostgreSQL {version} (fsync on); {args.n} messages per variant per round, "
        f"{args.rounds} interleaved rounds, medians; ratio = msgs/s / msgs/s of the bare "
        "loop in the same round (moto's speed, not AWS's)",
        C.table(headers, rows),
        "API calls per message (all rounds and the warm-up): " + ", ".join(
            f"{k} {v:.3f}" for k, v in calls.items()),
        "calls by operation: " + "; ".join(
            f"{k}: " + ", ".join(f"{op} {c}" for op, c in sorted(ops.items()))
            for k, ops in by_op.items()),
        f"slow handler: {slow_n} messages of {SLOW_SECONDS} s each, visibility timeout "
        f"{SLOW_VISIBILITY} s: {slow_calls.get('ChangeMessageVisibilityBatch', 0)} "
        f"ChangeMessageVisibilityBatch calls, {calls['slow handler']:.3f} calls per message",
        line,
    ])
    doc = {"benchmark": "sqs", "server_version": version, "rounds": args.rounds,
           "messages_per_round": args.n, "calls_per_message": calls, "calls_by_operation": by_op,
           "results": [r.as_dict() for r in res.values()], "targets": [target],
           "ratio_median": statistics.median(res["SqsConsumer"].ratios)
           if res["SqsConsumer"].ratios else None}
    C.report(args, doc, text)


if __name__ == "__main__":
    main()
