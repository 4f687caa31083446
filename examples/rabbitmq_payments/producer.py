"""The producer side of the RabbitMQ payments example.

    python producer.py setup                           # tables, queue, dead-letter queue
    python producer.py send --payments 200 --copies 3  # every payment sent 3 times
    python producer.py check --payments 200            # wait for the ledger, print it

Payment ``i`` is ``pay_<i>`` for ``100 + i`` cents, so ``check`` knows what to expect.
``send`` also sends two messages that cannot be applied: one without a ``payment_id`` and
one with a negative amount; both end in the dead-letter queue, with their error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import pika
import sqlalchemy as sa
from consumer import DEAD_LETTERS, QUEUE, Base, LedgerEntry, store


def payment(i: int) -> dict:
    return {"payment_id": f"pay_{i:05d}", "account": f"acc_{i % 7}", "cents": 100 + i}


def channel() -> tuple[pika.BlockingConnection, object]:
    conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
    return conn, conn.channel()


def setup() -> None:
    Base.metadata.create_all(store.engine)
    store.create_schema()
    conn, ch = channel()
    ch.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    ch.exchange_declare(DEAD_LETTERS, "fanout", durable=True)
    ch.queue_declare(DEAD_LETTERS, durable=True)
    ch.queue_bind(DEAD_LETTERS, DEAD_LETTERS)
    conn.close()
    print("tables and queues ready")


def send(payments: int, copies: int) -> None:
    conn, ch = channel()
    ch.confirm_delivery()  # each publish confirmed by the broker

    def publish(body: dict) -> None:
        ch.basic_publish("", QUEUE, json.dumps(body).encode(), pika.BasicProperties(
            delivery_mode=2, content_type="application/json", message_id=str(uuid.uuid4())))

    for _ in range(copies):  # a producer that retries its sends: each payment N times
        for i in range(payments):
            publish(payment(i))
    publish({"account": "acc_0", "cents": 5})                           # no payment_id
    publish({"payment_id": "pay_bad", "account": "acc_0", "cents": -5})  # always fails
    conn.close()
    print(f"sent {payments * copies + 2} messages for {payments} payments and 2 bad ones")


def check(payments: int, timeout: float) -> int:
    expected = sum(payment(i)["cents"] for i in range(payments))
    query = sa.select(sa.func.count(), sa.func.count(sa.distinct(LedgerEntry.payment_id)),
                      sa.func.coalesce(sa.func.sum(LedgerEntry.cents), 0))
    conn, ch = channel()
    dead: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        with store.engine.connect() as c:
            rows, unique, cents = c.execute(query).one()
        method, props, _ = ch.basic_get(DEAD_LETTERS, auto_ack=True)
        if method is not None:
            dead.append(props.headers["x-idempotent-error"])
        if (unique >= payments and len(dead) >= 2) or time.monotonic() > deadline:
            break
        if method is None:
            time.sleep(0.2)
    conn.close()
    print(f"ledger rows: {rows}, unique payments: {unique}, total cents: {cents} "
          f"(expected {payments} rows, {expected} cents)")
    for error in sorted(dead):
        print(f"dead-lettered: {error.split(';')[0]}")
    ok = rows == unique == payments and cents == expected and len(dead) == 2
    print("OK: every payment applied exactly once" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["setup", "send", "check"])
    ap.add_argument("--payments", type=int, default=200)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.command == "setup":
        setup()
    elif args.command == "send":
        send(args.payments, args.copies)
    else:
        return check(args.payments, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
