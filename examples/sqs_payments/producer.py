"""The producer side of the SQS payments example.

    python producer.py setup                          # the queues and the tables
    python producer.py send --payments 100 --copies 3  # every payment sent 3 times
    python producer.py check --payments 100            # wait for the ledger, print it

Payment ``i`` is ``pay_<i>`` for ``100 + i`` cents, so ``check`` knows what to expect.
Each copy of a payment is its own SQS message (its own MessageId): only the business key
``payment_id`` tells the consumer they are one payment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import boto3
import sqlalchemy as sa
from consumer import QUEUE, Base, LedgerEntry, store


def payment(i: int) -> dict:
    return {"payment_id": f"pay_{i:05d}", "account": f"acc_{i % 7}", "cents": 100 + i}


def setup() -> None:
    Base.metadata.create_all(store.engine)
    store.create_schema()
    sqs = boto3.client("sqs")  # region, credentials and endpoint from the environment
    try:
        sqs.create_queue(QueueName=f"{QUEUE}-dead")
        url = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
    finally:
        sqs.close()
    print(f"tables ready, queue {url}")


def send(payments: int, copies: int) -> None:
    sqs = boto3.client("sqs")
    try:
        url = sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
        bodies = [json.dumps(payment(i)) for _ in range(copies) for i in range(payments)]
        for start in range(0, len(bodies), 10):
            entries = [{"Id": str(n), "MessageBody": b}
                       for n, b in enumerate(bodies[start:start + 10])]
            failed = sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")
            if failed:
                raise SystemExit(f"send failed: {failed}")
    finally:
        sqs.close()
    print(f"sent {len(bodies)} messages for {payments} payments")


def check(payments: int, timeout: float) -> int:
    expected = sum(payment(i)["cents"] for i in range(payments))
    query = sa.select(sa.func.count(), sa.func.count(sa.distinct(LedgerEntry.payment_id)),
                      sa.func.coalesce(sa.func.sum(LedgerEntry.cents), 0))
    deadline = time.monotonic() + timeout
    while True:
        with store.engine.connect() as c:
            rows, unique, cents = c.execute(query).one()
        if unique >= payments or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"ledger rows: {rows}, unique payments: {unique}, total cents: {cents} "
          f"(expected {payments} rows, {expected} cents)")
    ok = rows == unique == payments and cents == expected
    print("OK: every payment applied exactly once" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["setup", "send", "check"])
    ap.add_argument("--payments", type=int, default=100)
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
