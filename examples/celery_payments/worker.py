"""The Celery worker of the payments example: apply each payment to a PostgreSQL ledger once.

    celery -A worker worker -P prefork -c 2 --loglevel INFO

``BROKER_URL`` (a redis-server) and ``DATABASE_URL`` (PostgreSQL, SQLAlchemy form) come from
the environment.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from celery import Celery
from idempotent.integrations.celery import idempotent_task
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idempotent import SqlStore

app = Celery("payments", broker=os.environ["BROKER_URL"])
app.conf.update(
    worker_prefetch_multiplier=1,  # a reserved message is unacked too: reserve one at a time
    broker_transport_options={"visibility_timeout": 3600},  # longer than any task or countdown
    task_serializer="json",
    accept_content=["json"],
)

store = SqlStore(os.environ["DATABASE_URL"])  # the records live next to the ledger


class Base(DeclarativeBase):
    pass


class LedgerEntry(Base):
    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(primary_key=True)
    payment_id: Mapped[str] = mapped_column(sa.String(64))  # not unique: doubles would show
    account: Mapped[str] = mapped_column(sa.String(32))
    cents: Mapped[int] = mapped_column(sa.BigInteger)


@idempotent_task(app, store, key="payment_id", name="payments.apply_payment")
def apply_payment(payment: dict, session: Session) -> dict:
    """Runs once per payment_id: the ledger row and the key commit in one transaction."""
    session.add(LedgerEntry(payment_id=payment["payment_id"], account=payment["account"],
                            cents=payment["cents"]))
    return {"status": "applied", "payment_id": payment["payment_id"]}
