"""The payment ledger and handler of the SQS tests, and the consumer process they SIGKILL.

The ledger has **no** unique constraint on ``payment_id``: only the dedup store stands
between a redelivery (or a producer's second send) and a second row.

Run as a script (``python tests/_sqs_app.py``), it is one consumer process, configured by
``IDEM_SQS_*`` environment variables (see `main`): it prints ``ready <pid>`` and consumes
until SIGTERM (or SIGKILL). Its PostgreSQL sessions carry ``application_name`` =
``sqs-worker`` so a test can terminate them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from idempotent.integrations.sqs import (
    SqsConsumer,
    SqsHandler,
    SqsMessage,
    body_field,
    sqs_handler,
)

from idempotent import SqlStore

NS = "tests.sqs.apply_payment"
APP_NAME = "sqs-worker"

ledger_metadata = sa.MetaData()
ledger = sa.Table(
    "sqs_ledger",
    ledger_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(200), nullable=False),  # deliberately NOT unique
    sa.Column("cents", sa.BigInteger, nullable=False),
    sa.Column("applied_by", sa.String(64), nullable=False),
)


def make_store(url: str, **engine_options: Any) -> SqlStore:
    """A SqlStore on ``url`` whose sessions are named `APP_NAME`."""
    engine = sa.create_engine(url, connect_args={"application_name": APP_NAME},
                              pool_pre_ping=False, **engine_options)
    return SqlStore(engine)


def setup(url: str) -> None:
    """The store's table and the ledger, in a fresh database."""
    store = SqlStore(url)
    try:
        store.create_schema()
        ledger_metadata.create_all(store.engine)
    finally:
        store.engine.dispose()


def make_handler(store: SqlStore, *, by: str = "test", slow_dir: str | None = None,
                 **options: Any) -> SqsHandler:
    """The transactional payment handler: one ledger row per payment, keyed by the
    body's ``payment_id``. A payment with ``"slow": true`` writes ``<slow_dir>/<pid>``
    and then sleeps (until its process is killed)."""

    @sqs_handler(store, key=body_field("payment_id"), namespace=NS, **options)
    def apply_payment(message: SqsMessage, *, connection: Any) -> dict[str, Any]:
        body = message.body
        connection.execute(sa.insert(ledger).values(
            payment_id=body["payment_id"], cents=body["cents"], applied_by=by))
        if body.get("slow") and slow_dir is not None:
            Path(slow_dir, str(os.getpid())).write_text(message.message_id)
            time.sleep(3600)
        return {"applied": body["payment_id"], "by": by}

    return apply_payment


def ledger_rows(engine: sa.Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [(r.payment_id, r.cents) for r in conn.execute(
            sa.select(ledger.c.payment_id, ledger.c.cents))]


def main() -> None:
    """One consumer process. IDEM_SQS_QUEUE, IDEM_SQS_DLQ (optional), IDEM_SQS_DB,
    IDEM_SQS_VISIBILITY (seconds), IDEM_SQS_SLOW_DIR (optional), IDEM_SQS_WAIT."""
    import boto3

    env = os.environ
    store = make_store(env["IDEM_SQS_DB"], pool_size=1, max_overflow=0)
    handler = make_handler(store, by=f"pid-{os.getpid()}", slow_dir=env.get("IDEM_SQS_SLOW_DIR"))
    client = boto3.client("sqs")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with SqsConsumer(client, env["IDEM_SQS_QUEUE"], handler,
                     visibility_timeout=int(env.get("IDEM_SQS_VISIBILITY", "30")),
                     wait_time=int(env.get("IDEM_SQS_WAIT", "1")),
                     dead_letter_queue_url=env.get("IDEM_SQS_DLQ") or None,
                     retry_delay=0) as consumer:
        print(f"ready {os.getpid()}", flush=True)
        consumer.run(stop)
    client.close()
    store.engine.dispose()
    sys.exit(0)


if __name__ == "__main__":
    main()
