"""The outbox publishing to Kafka (librdkafka's mock cluster, the real protocol) and a
real PostgreSQL: entries published by the producer and again by a relay land at new
offsets; a TransactionalConsumer keyed by the entry-id header applies each once, and the
relay confirms every entry by the consumer's records."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from _kafka import MockKafka, wait_until
from idempotent.integrations.kafka import (
    OUTBOX_ID_HEADER,
    KafkaPublisher,
    TransactionalConsumer,
    header,
)
from sqlalchemy.orm import Session

from idempotent import SqlStore
from idempotent.outbox import Outbox

pytestmark = [pytest.mark.postgres]

LEDGER = sa.Table("outbox_kafka_ledger", sa.MetaData(),
                  sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                  sa.Column("payment_id", sa.String(64), nullable=False),  # doubles show
                  sa.Column("cents", sa.Integer, nullable=False))


@pytest.fixture(scope="module")
def kafka() -> Iterator[MockKafka]:
    with MockKafka() as cluster:
        yield cluster


def test_outbox_to_kafka_each_message_applied_once(kafka: MockKafka, pg_url: str) -> None:
    store = SqlStore(pg_url)
    producer = kafka.producer()
    outbox = Outbox(store, [KafkaPublisher(producer)], grace=0, confirm_after=0.5)
    store.create_schema()
    LEDGER.create(store.engine)
    with Session(store.engine) as s, s.begin():  # published right after COMMIT
        for i in range(6):
            outbox.stage(s, publisher="kafka", target="outbox-payments",
                         body={"payment_id": f"p{i}", "cents": 10 + i}, id=f"pay-{i}",
                         confirm=("ledger", f"pay-{i}"))
    # confirm_after later no consumer has run: the relay publishes each entry again, at a
    # new offset (what a lost or slow first message looks like to a relay)
    published: list[int] = []
    wait_until(lambda: published.append(outbox.relay_once().published) or
               sum(published) == 6, 10, "the relay re-published the 6 entries")
    assert kafka.end_offsets("outbox-payments") and sum(
        kafka.end_offsets("outbox-payments").values()) == 12

    def apply(messages: list, connection: sa.Connection) -> None:
        connection.execute(LEDGER.insert(), [m.value for m in messages])

    consumer = TransactionalConsumer(
        kafka.consumer_config("outbox-ledger"), store, ["outbox-payments"], apply,
        key=header(OUTBOX_ID_HEADER), namespace="ledger", decode=json.loads)
    try:
        def applied() -> bool:
            consumer.poll_batch(0.5)
            with store.engine.connect() as c:
                return c.execute(sa.select(sa.func.count()).select_from(LEDGER)).scalar() == 6
        wait_until(applied, 60, "the 6 payments applied")
        ends = kafka.end_offsets("outbox-payments")
        wait_until(lambda: consumer.poll_batch(0.2) is not None and all(
            (consumer.position("outbox-payments", p) or (0,))[0] == end
            for p, end in ends.items() if end), 30, "every copy consumed")
    finally:
        consumer.close()
    with store.engine.connect() as c:
        rows = sorted(c.execute(sa.select(LEDGER.c.payment_id, LEDGER.c.cents)).all())
    assert rows == [(f"p{i}", 10 + i) for i in range(6)]  # 12 messages, 6 rows
    wait_until(lambda: outbox.relay_once() is not None and
               outbox.stats().counts == {"confirmed": 6}, 30, "every entry confirmed")
    outbox.close()
    producer.flush(5)
    store.engine.dispose()
