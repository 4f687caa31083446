"""A producer or a relay of the outbox, in a process of its own, that SIGKILLs itself at
one point (tests/test_outbox_celery.py):

    python _outbox_proc.py produce-then-die DB_URL BROKER_URL PAYMENT_JSON
        stages the payment's task with an order row, COMMITs, and dies in the after-commit
        hook, before anything is published;
    python _outbox_proc.py relay-then-die DB_URL BROKER_URL
        relays: publishes the first due entry to the broker, and dies before the entry is
        marked published (its transaction never commits).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session

os.environ["IDEMPOTENT_CELERY_BROKER"] = sys.argv[3]
os.environ["IDEMPOTENT_CELERY_DB"] = sys.argv[2]

from _celery_app import app, apply_payment
from idempotent.integrations.celery_outbox import CeleryPublisher, stage_task

from idempotent import SqlStore
from idempotent.outbox import Entry, Outbox

ORDERS = sa.Table("orders", sa.MetaData(), sa.Column("payment_id", sa.String(64),
                                                      primary_key=True))


class DieBeforePublish(CeleryPublisher):
    def publish(self, entry: Entry) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class DieAfterPublish(CeleryPublisher):
    def publish(self, entry: Entry) -> None:
        super().publish(entry)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode, db_url = sys.argv[1], sys.argv[2]
    store = SqlStore(db_url)
    if mode == "produce-then-die":
        outbox = Outbox(store, [DieBeforePublish(app)], confirm_after=1)
        payment = json.loads(sys.argv[4])
        with Session(store.engine) as s, s.begin():
            s.execute(ORDERS.insert().values(payment_id=payment["payment_id"]))
            stage_task(outbox, s, apply_payment, (payment,))
        raise SystemExit("still alive after the commit")
    if mode == "relay-then-die":
        outbox = Outbox(store, [DieAfterPublish(app)], grace=0)
        outbox.relay_once(batch=1)
        raise SystemExit("still alive after the relay pass")
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
