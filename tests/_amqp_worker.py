"""A pika consumer process for the AMQP crash tests: ``python _amqp_worker.py AMQP_URL
DB_URL QUEUE DLX [MARKS_DIR]``. It applies payments (one ledger row each, transactional
mode, keyed by ``payment_id``) until SIGTERM (it stops after the message in hand) or
SIGKILL. It prints ``ready <pid>`` each time its consumer is registered (after every
reconnect).

With ``MARKS_DIR``, a payment carrying ``"hang"`` stops at one point of its first delivery,
leaves a file ``<payment_id>`` there, and sleeps until the test kills the process:
``"before_commit"`` after its ledger INSERT, inside the transaction; ``"after_commit"``
after the commit (the ``completed`` event), before the ack. Later deliveries go on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _amqp_common import apply_payment
from idempotent.integrations.amqp import Consumer, Message

from idempotent import Event, SqlStore, add_listener

HANG_LIMIT = 120.0  # a hanging delivery that was never killed gives up (its test fails)


def _hang(marks: Path, payment_id: str) -> None:
    mark = marks / payment_id
    if mark.exists():
        return
    mark.write_text(str(os.getpid()))
    deadline = time.monotonic() + HANG_LIMIT
    while time.monotonic() < deadline:  # until the test SIGKILLs this process
        time.sleep(0.05)


def main() -> None:
    url, db_url, queue, dlx = sys.argv[1:5]
    marks = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    engine = sa.create_engine(db_url, pool_pre_ping=True, pool_size=2)
    store = SqlStore(engine)
    hang_after: set[str] = set()

    def handler(message: Message, *, connection: sa.Connection) -> Any:
        out = apply_payment(message, connection=connection)
        point = message.body.get("hang") if marks is not None else None
        if point == "before_commit":
            _hang(marks, message.body["payment_id"])  # type: ignore[arg-type]
        elif point == "after_commit":
            hang_after.add(message.body["payment_id"])
        return out

    def after_commit(event: Event) -> None:
        if event.kind == "completed" and event.key in hang_after and marks is not None:
            _hang(marks, event.key)

    add_listener(after_commit)
    consumer = Consumer(handler, store, queue=queue, key="payment_id",
                        dead_letter_exchange=dlx, namespace="chaos.apply_payment",
                        max_deliveries=50, retry_delay=0.2, reconnect_delay=0.5)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())

    def ready() -> None:
        print(f"ready {os.getpid()}", flush=True)

    try:
        consumer.run(url, on_ready=ready)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
