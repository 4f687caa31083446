"""The aio-pika consumer on a real RabbitMQ node and a real PostgreSQL: an ``async def``
transactional handler on an async engine and a sync one in a thread apply each payment
once; duplicates acked; bad input and a poison message dead-lettered with their error."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from _amqp_common import (
    apply_payment,
    declare,
    drain,
    ledger,
    metadata,
    publish,
    ready_count,
    wait_until,
)
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture
from idempotent.integrations.aio_pika import Consumer, Message
from idempotent.integrations.amqp import DELIVERIES_HEADER, ERROR_HEADER, ERROR_TYPE_HEADER
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from idempotent import SqlStore

pytestmark = [pytest.mark.postgres]


def _prepare(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    metadata.create_all(engine)
    SqlStore(engine).create_schema()
    engine.dispose()


def _rows(pg_url: str) -> Counter[str]:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as c:
            return Counter(r[0] for r in c.execute(sa.select(ledger.c.payment_id)))
    finally:
        engine.dispose()


async def _until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


async def _consume_until(consumer: Consumer, url: str, done: Callable[[], Any],
                         timeout: float = 60) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(consumer.run(url, on_ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        await _until(done, timeout, "consumer done")
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)


def test_async_handler_each_payment_once(pg_url: str, rabbit: RabbitServer) -> None:  # noqa: F811
    """An ``async def`` handler in transactional mode (async engine): 200 payments, half
    sent twice: one ledger row each, the copies acked as duplicates, the queue empty."""
    _prepare(pg_url)
    q = f"aq-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, q, dlx=f"{q}.dlx")
    pays = [{"payment_id": f"pay-{i:04d}", "cents": i + 1} for i in range(200)]
    publish(rabbit.url, q, [(p, {"message_id": p["payment_id"]}) for p in pays + pays[::2]])
    runs: Counter[str] = Counter()

    async def apply(message: Message, *, connection: AsyncConnection) -> dict[str, Any]:
        runs[message.body["payment_id"]] += 1
        await connection.execute(ledger.insert(), {
            "payment_id": message.body["payment_id"], "cents": message.body["cents"],
            "pid": 0})
        return {"applied": message.body["payment_id"]}

    async def main() -> None:
        engine = create_async_engine(pg_url)
        try:
            consumer = Consumer(apply, SqlStore(engine), queue=q,
                                dead_letter_exchange=f"{q}.dlx", namespace="aio.apply")
            await _consume_until(consumer, rabbit.url, lambda: len(_rows(pg_url)) == 200
                                 and ready_count(rabbit.url, q) == 0)
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert _rows(pg_url) == Counter({p["payment_id"]: 1 for p in pays})
    assert set(runs.values()) == {1}
    assert drain(rabbit.url, f"{q}.dlx") == []


def test_sync_handler_bad_input_and_poison(pg_url: str, rabbit: RabbitServer) -> None:  # noqa: F811
    """A sync handler (run in a thread) on a quorum queue: good payments once; a message
    without a key and one that is not JSON dead-lettered at once; a poison message run
    exactly max_deliveries=2 times, then dead-lettered with its error."""
    _prepare(pg_url)
    q = f"aqq-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, q, quorum=True, dlx=f"{q}.dlx")
    pays = [{"payment_id": f"pay-{i:04d}", "cents": i + 1} for i in range(100)]
    pays[17]["poison"] = True
    poison_runs = Counter[str]()

    def handler(message: Message, *, connection: sa.Connection) -> Any:
        if message.body.get("poison"):
            poison_runs[message.body["payment_id"]] += 1
            raise ValueError("no such account")
        return apply_payment(message, connection=connection)

    publish(rabbit.url, q, [(p, {"message_id": p["payment_id"]}) for p in pays]
            + [({"payment_id": "x"}, {}), (b"\x00\x01", {"message_id": "bin"})])
    dead: list[tuple[bytes, Any]] = []

    def finished() -> bool:
        dead.extend(drain(rabbit.url, f"{q}.dlx"))
        return len(dead) == 3 and len(_rows(pg_url)) == 99

    engine = sa.create_engine(pg_url)
    try:
        consumer = Consumer(handler, SqlStore(engine), queue=q, dead_letter_exchange=f"{q}.dlx",
                            max_deliveries=2, retry_delay=0.01, namespace="aio.sync")
        asyncio.run(_consume_until(consumer, rabbit.url, finished))
    finally:
        engine.dispose()
    by_type = {props.headers[ERROR_TYPE_HEADER]: (body, props) for body, props in dead}
    assert set(by_type) == {"MissingIdempotencyKey", "UndecodableMessage", "ValueError"}
    body, props = by_type["ValueError"]
    assert json.loads(body)["payment_id"] == "pay-0017"
    assert props.headers[ERROR_HEADER] == "ValueError: no such account"
    assert props.headers[DELIVERIES_HEADER] == 2
    assert poison_runs == Counter({"pay-0017": 2})
    rows = _rows(pg_url)
    assert len(rows) == 99 and set(rows.values()) == {1} and "pay-0017" not in rows
    assert ready_count(rabbit.url, q) == 0


def test_broker_restart_mid_run_loses_nothing(pg_url: str, rabbit: RabbitServer) -> None:  # noqa: F811
    """The RabbitMQ node is SIGKILLed and restarted while the aio-pika consumer works
    through 400 payments on a durable classic queue: the consumer connects again and
    consumes again, what was unacked is redelivered, and every payment is in the ledger
    once. (A classic queue: a quorum queue declared seconds before the node's SIGKILL came
    back without its messages on RabbitMQ 3.10.8, with pika too; see docs/rabbitmq.md,
    Limits.)"""
    _prepare(pg_url)
    q = f"arq-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, q, dlx=f"{q}.dlx")
    pays = [{"payment_id": f"pay-{i:04d}", "cents": i + 1} for i in range(400)]
    publish(rabbit.url, q, [(p, {"message_id": p["payment_id"]}) for p in pays])
    engine = sa.create_engine(pg_url, pool_pre_ping=True)
    consumer = Consumer(apply_payment, SqlStore(engine), queue=q,
                        dead_letter_exchange=f"{q}.dlx", namespace="aio.restart")
    ready = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:  # the consumer's event loop in a thread: the node restarts from
        try:             # the main thread, which it dies with
            asyncio.run(consumer.run(rabbit.url, on_ready=ready.set))
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and not errors, errors
        wait_until(lambda: len(_rows(pg_url)) >= 100, 60, "100 applied")
        applied_at_restart = len(_rows(pg_url))
        rabbit.restart(kill=True)  # until the node answers again
        wait_until(lambda: len(_rows(pg_url)) == 400 and ready_count(rabbit.url, q) == 0,
                   120, "all applied after the restart", lambda: f"{len(_rows(pg_url))}")
    finally:
        consumer.stop()
        thread.join(30)
        engine.dispose()
    assert not thread.is_alive() and not errors, errors
    assert applied_at_restart < 400  # the restart came mid-run
    assert _rows(pg_url) == Counter({p["payment_id"]: 1 for p in pays})
    assert ready_count(rabbit.url, f"{q}.dlx") == 0
