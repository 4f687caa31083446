"""The consumer side of the SQS payments example: apply each payment once.

    python consumer.py          # runs until Ctrl-C or SIGTERM

``apply_payment`` takes ``session``: its ledger row and the payment's idempotency key
commit in one PostgreSQL transaction (transactional mode). The key is the body's
``payment_id``, so a producer that sends a payment twice (two MessageIds) applies it once.
"""

from __future__ import annotations

import os
import signal
import threading

import boto3
from idempotent.integrations.sqs import SqsConsumer, SqsMessage, body_field, sqs_handler
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idempotent import SqlStore

QUEUE = os.environ.get("QUEUE_NAME", "payments")
store = SqlStore(os.environ["DATABASE_URL"])


class Base(DeclarativeBase):
    pass


class LedgerEntry(Base):
    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(64))  # not unique: the key is the guard
    account: Mapped[str] = mapped_column(String(64))
    cents: Mapped[int] = mapped_column(BigInteger)


@sqs_handler(store, key=body_field("payment_id"), namespace="payments.apply")
def apply_payment(message: SqsMessage, *, session: Session) -> dict:
    payment = message.body
    session.add(LedgerEntry(payment_id=payment["payment_id"], account=payment["account"],
                            cents=payment["cents"]))
    return {"status": "applied", "payment_id": payment["payment_id"]}


def main() -> None:
    sqs = boto3.client("sqs")  # region, credentials and endpoint from the environment
    url = sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=f"{QUEUE}-dead")["QueueUrl"]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with SqsConsumer(sqs, url, apply_payment, visibility_timeout=30, wait_time=5,
                     dead_letter_queue_url=dlq, max_receives=5) as consumer:
        print(f"ready: consuming {url}", flush=True)
        consumer.run(stop, on_outcome=lambda o: print(o.status.value, o.message_id, flush=True))
    sqs.close()
    store.engine.dispose()


if __name__ == "__main__":
    main()
