"""A pika consumer process for the AMQP chaos test: ``python _amqp_worker.py AMQP_URL DB_URL
QUEUE DLX``. It applies payments (one ledger row each, transactional mode, keyed by
``payment_id``) until SIGTERM (it stops after the message in hand) or SIGKILL. It prints
``ready <pid>`` each time its consumer is registered (after every reconnect)."""

from __future__ import annotations

import signal
import sys

import sqlalchemy as sa
from _amqp_common import apply_payment
from idempotent.integrations.amqp import Consumer

from idempotent import SqlStore


def main() -> None:
    url, db_url, queue, dlx = sys.argv[1:5]
    engine = sa.create_engine(db_url, pool_pre_ping=True, pool_size=2)
    store = SqlStore(engine)
    consumer = Consumer(apply_payment, store, queue=queue, key="payment_id",
                        dead_letter_exchange=dlx, namespace="chaos.apply_payment",
                        max_deliveries=50, retry_delay=0.2, reconnect_delay=0.5)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())

    def ready() -> None:
        print(f"ready {__import__('os').getpid()}", flush=True)

    try:
        consumer.run(url, on_ready=ready)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
