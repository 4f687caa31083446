"""The outbox publishing to a real rabbitmq-server and a real PostgreSQL: each entry
published by the producer after COMMIT and once more by a relay (its record missing when
the relay looked), a `Consumer` keyed by message_id applies each once, and the relay
confirms every entry by the consumer's records. An unroutable target is a publish failure
the entry is retried for, never a silent loss."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pika
import pytest
import sqlalchemy as sa
from _amqp_common import apply_payment, declare, drain, ledger, metadata, ready_count, running
from _amqp_common import wait_until as amqp_wait
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture
from idempotent.integrations.amqp import AmqpPublisher, Consumer
from sqlalchemy.orm import Session

from idempotent import SqlStore
from idempotent.outbox import Outbox

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def db(pg_url: str) -> Iterator[SqlStore]:
    store = SqlStore(pg_url)
    metadata.create_all(store.engine)
    store.create_schema()
    yield store
    store.engine.dispose()


def test_outbox_to_rabbitmq_each_message_applied_once(db: SqlStore,
                                                      rabbit: RabbitServer) -> None:  # noqa: F811
    store = db
    queue = f"outbox-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, queue, dlx=f"{queue}.dlx")
    publisher = AmqpPublisher(lambda: pika.BlockingConnection(pika.URLParameters(rabbit.url)))
    outbox = Outbox(store, [publisher], grace=0, confirm_after=0.5)
    namespace = "outbox.amqp"
    try:
        with Session(store.engine) as s, s.begin():
            for i in range(5):
                outbox.stage(s, publisher="amqp", target=queue,
                             body={"payment_id": f"p{i}", "cents": 100 + i}, id=f"pay-{i}",
                             confirm=(namespace, f"pay-{i}"))
        # no consumer yet: confirm_after later the relay publishes every entry again
        published: list[int] = []
        amqp_wait(lambda: published.append(outbox.relay_once().published) or
                  sum(published) == 5, 10, "the relay re-published the 5 entries")
        assert ready_count(rabbit.url, queue) == 10
        consumer = Consumer(apply_payment, store, queue=queue,
                            dead_letter_exchange=f"{queue}.dlx", namespace=namespace)
        with running(consumer, rabbit.url):
            amqp_wait(lambda: ready_count(rabbit.url, queue) == 0 and _rows(store) == 5, 60,
                      "every copy consumed")
        amqp_wait(lambda: outbox.relay_once() is not None and
                  outbox.stats().counts == {"confirmed": 5}, 30, "every entry confirmed")
        with store.engine.connect() as c:
            got = sorted(c.execute(sa.select(ledger.c.payment_id, ledger.c.cents)).all())
        assert got == [(f"p{i}", 100 + i) for i in range(5)]  # 10 messages, 5 rows
        assert drain(rabbit.url, f"{queue}.dlx") == []

        # a target no queue is bound to: the broker returns it, the entry stays pending
        with outbox.begin() as conn:
            outbox.stage(conn, publisher="amqp", target=f"{queue}-nobody", body={}, id="lost?")
        assert outbox.flush(30)
        entry = outbox.get("lost?")
        assert entry is not None and entry.state == "pending"
        assert entry.last_error is not None and "Unroutable" in entry.last_error
    finally:
        publisher.close()
        outbox.close()


def _rows(store: SqlStore) -> int:
    with store.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(ledger)).scalar() or 0)
