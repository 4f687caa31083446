"""The payments ledger the Kafka tests and the Kafka worker script write to."""

from __future__ import annotations

import json
import random
from typing import Any

import sqlalchemy as sa
from _kafka import partition_of

metadata = sa.MetaData()
#: No unique constraint on purpose: a payment applied twice shows as two rows.
ledger = sa.Table(
    "kafka_ledger", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("cents", sa.BigInteger, nullable=False),
    sa.Column("worker", sa.String(32), nullable=False),
)


def apply_batch(worker: str) -> Any:
    """A batch handler: one INSERT of a row per message, tagged with ``worker``."""
    def apply(messages: list[Any], connection: sa.Connection) -> None:
        connection.execute(ledger.insert(), [
            {"payment_id": m.value["payment_id"], "cents": m.value["cents"], "worker": worker}
            for m in messages])
    apply.__qualname__ = "apply_payments"
    return apply


def payments(n: int, *, copies: tuple[int, int] = (1, 1), seed: int = 7,
             prefix: str = "p") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``n`` payments as messages, each sent ``copies`` times (a retrying producer: same
    payload, new offset, same partition), shuffled; and ``payment_id -> cents``."""
    rnd = random.Random(seed)
    amounts = {f"{prefix}{i}": rnd.randint(1, 100_000) for i in range(n)}
    out = []
    for pid, cents in amounts.items():
        body = json.dumps({"payment_id": pid, "cents": cents}).encode()
        for _ in range(rnd.randint(*copies)):
            out.append({"value": body, "key": pid.encode(), "partition": partition_of(pid),
                        "headers": [("payment-id", pid.encode())]})
    rnd.shuffle(out)
    return out, amounts


def ledger_figures(engine: sa.Engine) -> tuple[int, int, int]:
    """(rows, distinct payments, sum of cents) of the ledger."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(
            sa.func.count(), sa.func.count(sa.distinct(ledger.c.payment_id)),
            sa.func.coalesce(sa.func.sum(ledger.c.cents), 0))).one()
    return int(row[0]), int(row[1]), int(row[2])
