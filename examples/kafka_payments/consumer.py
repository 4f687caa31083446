"""Apply payments from Kafka to a ledger, each exactly once.

    python consumer.py --idle 5

One transaction per batch (up to 500 messages): the payments not seen before (business
key: the ``payment-id`` header) are written to the ledger in one statement, and the
partitions' positions advance in the same transaction. Stops after ``--idle`` seconds
without messages and prints the ledger's figures. Reads KAFKA_BOOTSTRAP and DATABASE_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sqlalchemy as sa
from idempotent.integrations.kafka import Message, TransactionalConsumer, header

from idempotent import SqlStore

metadata = sa.MetaData()
ledger = sa.Table(
    "ledger", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("account", sa.String(32), nullable=False),
    sa.Column("cents", sa.BigInteger, nullable=False),
)


def apply_payments(messages: list[Message], connection: sa.Connection) -> None:
    """The batch's ledger rows, in one INSERT; the library commits it with the positions."""
    connection.execute(ledger.insert().values([
        {"payment_id": m.value["payment_id"], "account": m.value["account"],
         "cents": m.value["cents"]} for m in messages]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topic", default="payments")
    ap.add_argument("--group", default="ledger")
    ap.add_argument("--idle", type=float, default=5.0, help="stop after so many idle seconds")
    args = ap.parse_args()
    store = SqlStore(os.environ.get("DATABASE_URL", "sqlite:///payments.db"))
    store.create_schema()            # the records and positions tables (production: migrations)
    metadata.create_all(store.engine)
    consumer = TransactionalConsumer(
        {"bootstrap.servers": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
         "group.id": args.group, "auto.offset.reset": "earliest", "log_level": 2},
        store, [args.topic], apply_payments,
        key=header("payment-id"), decode=json.loads,
        dead_letter_topic=f"{args.topic}.dead-letter")
    last = time.monotonic()
    try:
        while time.monotonic() - last < args.idle:
            if consumer.poll_batch(0.5):
                last = time.monotonic()
    finally:
        consumer.close()
    with store.engine.connect() as conn:
        rows, payments, cents = conn.execute(sa.select(
            sa.func.count(), sa.func.count(sa.distinct(ledger.c.payment_id)),
            sa.func.coalesce(sa.func.sum(ledger.c.cents), 0))).one()
    store.engine.dispose()
    print(f"ledger: {rows} rows, {payments} payments, {cents} cents")


if __name__ == "__main__":
    main()
