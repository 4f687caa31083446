"""RabbitMQ: messages/s of the idempotent pika consumer against a plain pika consumer doing
the same writes with the same prefetch.

A private rabbitmq-server (``tests/_rabbitmq.py``) and a private PostgreSQL (fsync on), both
on loopback; the consumer runs in this process:

* ``plain pika``: ``basic_qos(prefetch_count=P)``, manual acks; per message one Core INSERT
  of a ledger row in ``engine.begin()``, then ``basic_ack`` (baseline);
* ``idempotent``: `idempotent.integrations.amqp.Consumer` with the same prefetch, a
  handler taking ``connection`` (transactional mode): the same INSERT, plus the record in
  the same transaction, then the ack; key = the ``message_id`` property;
* ``idempotent, 10% dup``: the same; every 10th message repeats the message id and body
  of the one sent 9 places before it (acked as a duplicate, the handler does not run).

A round of a variant: N persistent messages are published to a fresh queue (untimed); the
clock runs from connecting the consumer until it has handled all N and stopped. Variants
run in interleaved rounds; figures are medians, ratios per round (see ``_common.py``).
After the run the ledger is checked: one row per unique message of each variant.

Run: ``.venv/bin/python benchmarks/bench_amqp.py [--quick] [--json] [--prefetch P]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import uuid
from collections import Counter
from typing import Any

import _common as C  # sets up sys.path first
import pika
import sqlalchemy as sa
from _rabbitmq import RabbitServer
from idempotent.integrations.amqp import Consumer, Message

from idempotent import SqlStore, listening

TARGET_RATIO = 0.80
DUP_EVERY = 10

metadata = sa.MetaData()
ledger = sa.Table(
    "bench_amqp_ledger", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("cents", sa.BigInteger, nullable=False),
    sa.Column("variant", sa.String(32), nullable=False),
)


class Bench:
    def __init__(self, rabbit: RabbitServer, engine: sa.Engine, prefetch: int) -> None:
        self.url = rabbit.url
        self.engine = engine
        self.store = SqlStore(engine)
        self.prefetch = prefetch
        self.sent: Counter[str] = Counter()  # unique payments per variant
        self.ids = itertools.count()

    def _publish(self, n: int, dup_every: int) -> str:
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            ch.queue_declare(queue, durable=True)
            ch.confirm_delivery()
            sent: list[tuple[str, bytes]] = []
            for i in range(n):
                if dup_every and i % dup_every == dup_every - 1 and len(sent) >= 9:
                    mid, body = sent[-9]
                else:
                    pid = f"p{next(self.ids):08d}"
                    mid, body = pid, json.dumps({"payment_id": pid, "cents": 100}).encode()
                sent.append((mid, body))
                ch.basic_publish("", queue, body, pika.BasicProperties(
                    delivery_mode=2, message_id=mid, content_type="application/json"))
        finally:
            conn.close()
        self.unique = len({m for m, _ in sent})
        return queue

    def _delete(self, queue: str) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            conn.channel().queue_delete(queue)
        finally:
            conn.close()

    def plain(self, name: str) -> C.Variant:
        def run(n: int) -> tuple[float, float]:
            queue = self._publish(n, 0)
            self.sent[name] += self.unique
            engine = self.engine

            def loop() -> None:
                conn = pika.BlockingConnection(pika.URLParameters(self.url))
                ch = conn.channel()
                ch.basic_qos(prefetch_count=self.prefetch)
                done = 0

                def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
                    nonlocal done
                    msg = json.loads(body)
                    with engine.begin() as c:
                        c.execute(ledger.insert(), {"payment_id": msg["payment_id"],
                                                    "cents": msg["cents"], "variant": name})
                    ch.basic_ack(method.delivery_tag)
                    done += 1
                    if done == n:
                        ch.stop_consuming()

                ch.basic_consume(queue, on_message, auto_ack=False)
                ch.start_consuming()
                conn.close()

            out = C.timed(loop)
            self._delete(queue)
            return out
        return run

    def idempotent(self, name: str, dup_every: int) -> C.Variant:
        def handler(message: Message, *, connection: sa.Connection) -> dict[str, Any]:
            connection.execute(ledger.insert(), {"payment_id": message.body["payment_id"],
                                                 "cents": message.body["cents"],
                                                 "variant": name})
            return {"applied": message.body["payment_id"]}

        def run(n: int) -> tuple[float, float]:
            queue = self._publish(n, dup_every)
            self.sent[name] += self.unique
            consumer = Consumer(handler, self.store, queue=queue, prefetch=self.prefetch,
                                namespace=f"bench.{name}")
            handled = 0

            def count(event: Any) -> None:
                nonlocal handled
                if event.kind in ("completed", "duplicate"):
                    handled += 1
                    if handled == n:
                        consumer.stop()  # after the ack of the message in hand

            def loop() -> None:
                with listening(count):
                    consumer.run(self.url)

            out = C.timed(loop)
            self._delete(queue)
            return out
        return run

    def check(self) -> int:
        with self.engine.connect() as c:
            got = Counter(dict(c.execute(sa.select(ledger.c.variant, sa.func.count(
                sa.distinct(ledger.c.payment_id)))
                .group_by(ledger.c.variant)).all()))
            rows = int(c.execute(sa.select(sa.func.count()).select_from(ledger)).scalar() or 0)
        assert got == self.sent, (got, self.sent)
        assert rows == sum(self.sent.values()), (rows, self.sent)
        return rows


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--prefetch", type=int, default=10, help="prefetch count (10)")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=2000, quick_n=300, extra=extra)
    with C.postgres() as pg, RabbitServer() as rabbit:
        engine = sa.create_engine(pg.url)
        metadata.create_all(engine)
        SqlStore(engine).create_schema()
        version = C.pg_version(engine)
        try:
            bench = Bench(rabbit, engine, args.prefetch)
            C.log(args, f"PostgreSQL {version}, rabbitmq at {rabbit.url}, prefetch "
                        f"{args.prefetch}; {args.n} messages/variant/round")
            variants = {
                "plain pika": bench.plain("plain"),
                "idempotent": bench.idempotent("idem", 0),
                "idempotent, 10% dup": bench.idempotent("idem_dup", DUP_EVERY),
            }
            res = C.interleave(variants, rounds=args.rounds, n=args.n, baseline="plain pika",
                               args=args)
            checked = bench.check()
        finally:
            engine.dispose()

    headers, rows = C.result_rows(res, rate_label="msgs/s")
    headers[1] = "µs/msg"
    headers[2] = "consumer CPU µs/msg"
    line, target = C.target_line("idempotent msgs/s vs plain pika", res["idempotent"].ratio,
                                 TARGET_RATIO)
    text = "\n".join([
        f"bench_amqp ({C.git_describe()}): pika BlockingConnection consumer in-process, "
        f"prefetch {args.prefetch}, manual acks, rabbitmq-server 3.10 and PostgreSQL "
        f"{version} (fsync on) on loopback; {args.n} persistent messages per variant per "
        f"round, {args.rounds} interleaved rounds, medians; ratio = msgs/s / msgs/s of the "
        "plain consumer in the same round",
        C.table(headers, rows),
        "consumer CPU per message, relative to the plain consumer (steadier than msgs/s on a "
        "shared machine): " + ", ".join(
            f"{k} {r.cpu_per_op_us / res['plain pika'].cpu_per_op_us:.2f}"
            for k, r in res.items()),
        f"ledger checked: {checked} rows, one per unique message",
        line,
    ])
    doc = {"benchmark": "amqp", "server_version": version, "prefetch": args.prefetch,
           "rounds": args.rounds, "messages_per_round": args.n, "pid": os.getpid(),
           "results": [r.as_dict() for r in res.values()], "targets": [target]}
    C.report(args, doc, text)


if __name__ == "__main__":
    main()
