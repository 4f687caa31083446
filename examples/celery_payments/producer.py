"""The producer side of the payments example.

    python producer.py setup                          # create the ledger and records tables
    python producer.py send --payments 200 --copies 3  # every payment sent 3 times
    python producer.py check --payments 200            # wait for the ledger, print it

Payment ``i`` is ``pay_<i>`` for ``100 + i`` cents, so ``check`` knows what to expect.
"""

from __future__ import annotations

import argparse
import sys
import time

import sqlalchemy as sa
from idempotent.integrations.celery import send_once, task_id_for
from worker import Base, LedgerEntry, apply_payment, store


def payment(i: int) -> dict:
    return {"payment_id": f"pay_{i:05d}", "account": f"acc_{i % 7}", "cents": 100 + i}


def setup() -> None:
    Base.metadata.create_all(store.engine)
    store.create_schema()
    print("tables ready")


def send(payments: int, copies: int) -> None:
    with apply_payment.app.connection_for_write() as conn:
        for _ in range(copies):  # a producer that retries its sends: each payment N times
            for i in range(payments):
                send_once(apply_payment, (payment(i),), connection=conn)
    first = task_id_for(apply_payment, payment(0)["payment_id"])
    print(f"sent {payments * copies} messages for {payments} payments "
          f"({copies} with task id {first} for pay_00000)")


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
