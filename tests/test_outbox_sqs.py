"""The outbox publishing to SQS (moto's server, real boto3 calls) and a real PostgreSQL:
a producer that died after COMMIT, a relay that published twice, one ledger row each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from _moto import MotoServer, make_queue, wait_until
from idempotent.integrations.sqs import (
    OUTBOX_ID_ATTRIBUTE,
    SqsConsumer,
    SqsMessage,
    SqsPublisher,
    message_attribute,
    sqs_handler,
)
from sqlalchemy.orm import Session

from idempotent import SqlStore
from idempotent.outbox import Outbox

pytestmark = [pytest.mark.postgres]

LEDGER = sa.Table("outbox_sqs_ledger", sa.MetaData(),
                  sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                  sa.Column("payment_id", sa.String(64), nullable=False),  # doubles show
                  sa.Column("cents", sa.Integer, nullable=False))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def test_outbox_to_sqs_each_message_applied_once(moto: MotoServer, pg_url: str) -> None:
    client = moto.client()
    store = SqlStore(pg_url)
    outbox = Outbox(store, [SqsPublisher(client)], grace=0, confirm_after=0.5)
    store.create_schema()
    LEDGER.create(store.engine)
    queue_url, dlq = make_queue(client, dlq=True)

    @sqs_handler(store, key=message_attribute(OUTBOX_ID_ATTRIBUTE), namespace="ledger")
    def apply(message: SqsMessage, *, connection: sa.Connection) -> None:
        connection.execute(LEDGER.insert().values(payment_id=message.body["payment_id"],
                                                  cents=message.body["cents"]))

    def stage(session: Session | sa.Connection, i: int) -> None:
        outbox.stage(session, publisher="sqs", target=queue_url,
                     body={"payment_id": f"p{i}", "cents": 100 + i}, id=f"pay-{i}",
                     confirm=("ledger", f"pay-{i}"))

    try:
        with Session(store.engine) as s, s.begin():  # published right after COMMIT
            for i in range(5):
                stage(s, i)
        with store.engine.begin() as conn:  # committed; the producer "died" before publishing
            for i in range(5, 8):
                stage(conn, i)
        # confirm_after later the relay finds all 8 unconfirmed (no consumer ran yet): it
        # publishes them, so 0..4 are in the queue twice and 5..7 once
        published = []
        wait_until(lambda: published.append(outbox.relay_once().published) or
                   sum(published) == 8, 10, "the relay published the 8 entries")
        consumer = SqsConsumer(client, queue_url, apply, wait_time=1,
                               dead_letter_queue_url=dlq)
        with consumer:
            def drained() -> bool:
                consumer.poll()
                with store.engine.connect() as c:
                    n = c.execute(sa.select(sa.func.count(sa.distinct(LEDGER.c.payment_id))))
                    return n.scalar() == 8
            wait_until(drained, 60, "every payment applied")
            for _ in range(3):
                consumer.poll()  # the remaining copies, duplicates
        wait_until(lambda: outbox.relay_once() and outbox.stats().counts == {"confirmed": 8},
                   30, "every entry confirmed by its consumer's record",
                   describe=lambda: str(outbox.stats().counts))
        with store.engine.connect() as c:
            rows: list[Any] = c.execute(sa.select(LEDGER.c.payment_id, LEDGER.c.cents)).all()
        assert sorted(rows) == sorted((f"p{i}", 100 + i) for i in range(8))
        sent = client.receive_message(QueueUrl=queue_url, MessageAttributeNames=["All"],
                                      WaitTimeSeconds=0)
        assert "Messages" not in sent, json.dumps(sent)[:300]
    finally:
        outbox.close()
        client.close()
        store.engine.dispose()
