"""The Celery app the integration tests and the benchmark run in ``celery worker`` processes.

Configured by environment variables, so the test that starts a worker decides:

* ``IDEMPOTENT_CELERY_BROKER``: the redis-server URL of the broker (required);
* ``IDEMPOTENT_CELERY_BACKEND``: result backend URL (unset: no results kept);
* ``IDEMPOTENT_CELERY_DB``: the PostgreSQL URL of the ledger and the idempotency records;
* ``IDEMPOTENT_CELERY_VISIBILITY``: the broker's visibility timeout, seconds (default 5);
* ``IDEMPOTENT_CELERY_DEDUP``: ``1`` turns on ``worker_deduplicate_successful_tasks``;
* ``IDEMPOTENT_CELERY_MARKS``: a directory where ``hang_once`` tasks leave a mark;
* ``IDEMPOTENT_CELERY_LEASE``: lease seconds of the lease-mode tasks (default 3);
* ``IDEMPOTENT_CELERY_REDIS_STORE``: the redis URL of ``t.charge_redis``'s store.

Tasks (explicit names, so the test process and the workers agree whatever the module is
called):

* ``t.apply_payment``: idempotent, transactional (takes ``connection``), keyed by the
  payment's ``payment_id``; one ledger row per run that commits;
* ``t.apply_by_id``: the same body keyed by the task id (the default);
* ``t.apply_limited``: ``t.apply_payment`` with a hard ``time_limit`` of 3 s;
* ``t.charge``: idempotent, lease mode (no ``connection``): every run logs a call in
  ``psp_calls``; the "provider" keeps one charge per idempotency key (``psp_charges``);
* ``t.charge_redis``: the same on a `RedisStore` (``IDEMPOTENT_CELERY_REDIS_STORE``);
* ``t.unreachable``: idempotent, its store a PostgreSQL nobody listens on (StoreUnavailable);
* ``t.plain_apply``: the same ledger insert as a plain ``acks_late`` task;
* ``t.poison``: lease mode, ``autoretry_for=(ValueError,)``, ``max_retries=2``, no delay;
  every run logs a call in ``psp_calls``; a payment with ``poison`` raises ValueError;
* ``t.scoped``: transactional, keyed by the invoice's ``number``, scoped by its ``tenant``;
* ``t.apply_soft`` / ``t.charge_soft``: ``t.apply_payment`` / ``t.charge`` with a
  ``soft_time_limit`` of 1 s (a payment with ``hold`` beyond it raises
  SoftTimeLimitExceeded inside the body).

A payment may carry ``hold`` (seconds the body sleeps after its write) and ``hang_once``
(the first run leaves a mark named after its pid and sleeps until killed; later runs go on).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from idempotent.integrations.celery import IdempotentTask, idempotent_task
from sqlalchemy.dialects.postgresql import insert as pg_insert

from idempotent import SqlStore, current_key
from idempotent.stores import RedisStore

BROKER = os.environ.get("IDEMPOTENT_CELERY_BROKER", "redis://127.0.0.1:1/0")
BACKEND = os.environ.get("IDEMPOTENT_CELERY_BACKEND") or None
DB_URL = os.environ.get("IDEMPOTENT_CELERY_DB", "postgresql+psycopg://postgres@127.0.0.1:1/x")
VISIBILITY = float(os.environ.get("IDEMPOTENT_CELERY_VISIBILITY", "5"))
MARKS = os.environ.get("IDEMPOTENT_CELERY_MARKS", "")
LEASE = float(os.environ.get("IDEMPOTENT_CELERY_LEASE", "3"))
HANG_LIMIT = 120.0  # a hang_once run that was never killed gives up (the test fails then)

metadata = sa.MetaData()
ledger = sa.Table(
    "celery_ledger", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(64), nullable=False),  # not unique: doubles must show
    sa.Column("account", sa.String(32), nullable=False),
    sa.Column("cents", sa.BigInteger, nullable=False),
    sa.Column("task", sa.String(32), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)
psp_calls = sa.Table(
    "psp_calls", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("idem_key", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)
psp_charges = sa.Table(
    "psp_charges", metadata,
    sa.Column("idem_key", sa.String(200), primary_key=True),  # the provider's own dedup
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("cents", sa.BigInteger, nullable=False),
)

app = Celery("idempotent_tests", broker=BROKER, backend=BACKEND)
app.conf.update(
    broker_transport_options={
        "visibility_timeout": VISIBILITY,
        # kombu >= 5.7: sweep the unacked set every second, not every 100 s
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    result_backend_transport_options={"visibility_timeout": VISIBILITY},
    broker_connection_retry_on_startup=True,
    result_extended=True,  # the result meta carries the retry count the tests check
    worker_prefetch_multiplier=1,
    worker_deduplicate_successful_tasks=os.environ.get("IDEMPOTENT_CELERY_DEDUP") == "1",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)

store = SqlStore(DB_URL, pool_size=2)
engine = store.engine  # the ledger lives in the same database as the records


def _hold_or_hang(payment: dict[str, Any]) -> None:
    if payment.get("hang_once") and MARKS:
        marks = Path(MARKS)
        if not any(marks.glob(f"{payment['payment_id']}.*")):
            (marks / f"{payment['payment_id']}.{os.getpid()}").touch()
            deadline = time.monotonic() + HANG_LIMIT
            while time.monotonic() < deadline:  # until the test kills this process
                time.sleep(0.05)
    if payment.get("hold"):
        time.sleep(float(payment["hold"]))


def _row(payment: dict[str, Any], task: str) -> dict[str, Any]:
    return {"payment_id": payment["payment_id"], "account": payment["account"],
            "cents": payment["cents"], "task": task, "pid": os.getpid()}


@idempotent_task(app, store, key="payment_id", name="t.apply_payment")
def apply_payment(payment: dict[str, Any], connection: sa.Connection) -> dict[str, Any]:
    connection.execute(ledger.insert(), _row(payment, "apply_payment"))
    _hold_or_hang(payment)
    return {"applied": payment["payment_id"], "cents": payment["cents"]}


@idempotent_task(app, store, key="payment_id", time_limit=3, name="t.apply_limited")
def apply_limited(payment: dict[str, Any], connection: sa.Connection) -> dict[str, Any]:
    """``t.apply_payment`` with a hard time limit of 3 s (a ``hang_once`` run exceeds it)."""
    connection.execute(ledger.insert(), _row(payment, "apply_limited"))
    _hold_or_hang(payment)
    return {"applied": payment["payment_id"], "cents": payment["cents"]}


@app.task(base=IdempotentTask, idempotency_store=store, name="t.apply_by_id")
def apply_by_id(payment: dict[str, Any], connection: sa.Connection) -> dict[str, Any]:
    connection.execute(ledger.insert(), _row(payment, "apply_by_id"))
    _hold_or_hang(payment)
    return {"applied": payment["payment_id"], "cents": payment["cents"]}


def _charge(payment: dict[str, Any]) -> dict[str, Any]:
    key = current_key()  # the provider's idempotency key, as a real PSP call would pass it
    with engine.begin() as c:
        c.execute(psp_calls.insert(), {"idem_key": key, "pid": os.getpid()})
        c.execute(pg_insert(psp_charges).values(
            idem_key=key, payment_id=payment["payment_id"], cents=payment["cents"],
        ).on_conflict_do_nothing())
    _hold_or_hang(payment)
    return {"charged": payment["payment_id"], "cents": payment["cents"]}


charge = idempotent_task(app, store, key="payment_id", lease=LEASE, name="t.charge")(_charge)
#: the same task on a RedisStore (built in each pool child, from the environment)
charge_redis = idempotent_task(
    app, lambda: RedisStore(os.environ["IDEMPOTENT_CELERY_REDIS_STORE"]), key="payment_id",
    lease=LEASE, name="t.charge_redis")(_charge)


#: nothing listens on port 9 of the loopback: every connection is refused at once
DEAD_DB = "postgresql+psycopg://postgres@127.0.0.1:9/none"


@idempotent_task(app, lambda: SqlStore(DEAD_DB), key="payment_id", retry=None,
                 backoff=0.2, backoff_max=0.5, store_retries=2, name="t.unreachable")
def unreachable(payment: dict[str, Any]) -> dict[str, Any]:
    """Its store is down (a store given as a factory, built in the pool child)."""
    raise AssertionError("never runs: the key cannot be claimed")


@app.task(acks_late=True, reject_on_worker_lost=True, name="t.plain_apply")
def plain_apply(payment: dict[str, Any]) -> dict[str, Any]:
    with engine.begin() as c:
        c.execute(ledger.insert(), _row(payment, "plain_apply"))
    _hold_or_hang(payment)
    return {"applied": payment["payment_id"], "cents": payment["cents"]}


@idempotent_task(app, store, key="payment_id", lease=LEASE, autoretry_for=(ValueError,),
                 max_retries=2, retry_backoff=False, default_retry_delay=0, name="t.poison")
def poison(payment: dict[str, Any]) -> dict[str, Any]:
    """A task with its own retry budget (autoretry_for, max_retries=2)."""
    with engine.begin() as c:
        c.execute(psp_calls.insert(), {"idem_key": current_key(), "pid": os.getpid()})
    if payment.get("poison"):
        raise ValueError(f"poison message {payment['payment_id']}")
    return {"ok": payment["payment_id"]}


@idempotent_task(app, store, key="number", scope=lambda invoice, **_: invoice["tenant"],
                 name="t.scoped")
def scoped(invoice: dict[str, Any], connection: sa.Connection) -> dict[str, Any]:
    """One ledger row per (tenant, invoice number): ``payment_id`` the number, ``account``
    the tenant."""
    connection.execute(ledger.insert(), {
        "payment_id": invoice["number"], "account": invoice["tenant"],
        "cents": invoice["cents"], "task": "scoped", "pid": os.getpid()})
    return {"tenant": invoice["tenant"], "number": invoice["number"],
            "cents": invoice["cents"]}


@idempotent_task(app, store, key="payment_id", soft_time_limit=1, name="t.apply_soft")
def apply_soft(payment: dict[str, Any], connection: sa.Connection) -> dict[str, Any]:
    connection.execute(ledger.insert(), _row(payment, "apply_soft"))
    _hold_or_hang(payment)
    return {"applied": payment["payment_id"], "cents": payment["cents"]}


charge_soft = idempotent_task(app, store, key="payment_id", lease=LEASE, soft_time_limit=1,
                              name="t.charge_soft")(_charge)
