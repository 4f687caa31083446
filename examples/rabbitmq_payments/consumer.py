"""The consumer of the RabbitMQ payments example: apply each payment to a PostgreSQL ledger
once, ack after the commit, dead-letter what cannot be applied.

    python consumer.py

``AMQP_URL`` (a RabbitMQ node) and ``DATABASE_URL`` (PostgreSQL, SQLAlchemy form) come from
the environment. SIGTERM or Ctrl-C stops it after the message in hand.
"""

from __future__ import annotations

import logging
import os
import signal

import sqlalchemy as sa
from idempotent.integrations.amqp import Consumer, Message
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idempotent import SqlStore

QUEUE = "payments"
DEAD_LETTERS = "payments.dead"  # a fanout exchange, bound to a queue of the same name

store = SqlStore(os.environ["DATABASE_URL"])  # the records live next to the ledger


class Base(DeclarativeBase):
    pass


class LedgerEntry(Base):
    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(primary_key=True)
    payment_id: Mapped[str] = mapped_column(sa.String(64))  # not unique: doubles would show
    account: Mapped[str] = mapped_column(sa.String(32))
    cents: Mapped[int] = mapped_column(sa.BigInteger)


def apply_payment(message: Message, *, session: Session) -> dict:
    """Runs once per payment_id: the ledger row and the key commit in one transaction."""
    payment = message.body
    if payment["cents"] <= 0:
        raise ValueError(f"{payment['payment_id']}: the amount must be positive")
    session.add(LedgerEntry(payment_id=payment["payment_id"], account=payment["account"],
                            cents=payment["cents"]))
    return {"status": "applied", "payment_id": payment["payment_id"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    consumer = Consumer(
        apply_payment, store, queue=QUEUE,
        key="payment_id",                   # the business key: a re-sent payment collapses
        namespace="payments.apply_payment",  # stable across refactors
        dead_letter_exchange=DEAD_LETTERS,  # bad input and poison, with the error in headers
        max_deliveries=3,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop after the message in hand
        signal.signal(sig, lambda *_: consumer.stop())
    consumer.run(os.environ["AMQP_URL"], on_ready=lambda: print("consuming", flush=True))


if __name__ == "__main__":
    main()
