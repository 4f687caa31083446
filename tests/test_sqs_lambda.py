"""The AWS Lambda adapters of idempotent.integrations.sqs: ``lambda_handler``'s partial
batch response, and ``record_handler`` under Powertools' real ``BatchProcessor`` and
``process_partial_response``. The events are built from messages received from moto's
SQS server, in the shape Lambda's event source mapping gives them."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from _moto import MotoServer, make_queue
from idempotent.integrations.sqs import SqsMessage, body_field, message_attribute, sqs_handler

from idempotent import MemoryStore, MissingIdempotencyKey, SqlStore

ARN = "arn:aws:sqs:us-east-1:123456789012:{}"


@pytest.fixture(scope="module")
def sqs() -> Iterator[Any]:
    with MotoServer() as server:
        client = server.client()
        yield client
        client.close()


def lambda_event(sqs: Any, bodies: list[Any], *, fifo: bool = False,
                 attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send the bodies, receive them, and make the Lambda event of that batch."""
    url, _ = make_queue(sqs, fifo=fifo)
    for i, body in enumerate(bodies):
        extra: dict[str, Any] = {}
        if fifo:
            extra = {"MessageGroupId": "g", "MessageDeduplicationId": str(i)}
        if attributes:
            extra["MessageAttributes"] = attributes
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body), **extra)
    got: list[dict[str, Any]] = []
    while len(got) < len(bodies):
        got += sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                   MessageSystemAttributeNames=["All"],
                                   MessageAttributeNames=["All"]).get("Messages", [])
    name = url.rsplit("/", 1)[1]

    def attr(v: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"dataType": v["DataType"]}
        if "StringValue" in v:
            out["stringValue"] = v["StringValue"]
        if "BinaryValue" in v:
            out["binaryValue"] = base64.b64encode(v["BinaryValue"]).decode()
        return out

    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": m.get("Attributes", {}), "md5OfBody": m["MD5OfBody"],
        "messageAttributes": {k: attr(v) for k, v in m.get("MessageAttributes", {}).items()},
        "eventSource": "aws:sqs", "eventSourceARN": ARN.format(name),
        "awsRegion": "us-east-1"} for m in got]}


class Declined(Exception):
    pass


def charge_handler(store: Any, effects: list[str], **options: Any) -> Any:
    @sqs_handler(store, key=body_field("payment_id"), namespace="tests.lambda.charge",
                 **options)
    def charge(message: SqsMessage) -> dict[str, Any]:
        if message.body.get("declined"):
            raise Declined(message.body["payment_id"])
        effects.append(message.body["payment_id"])
        return {"charged": message.body["payment_id"]}
    return charge


def test_lambda_handler_reports_only_unprocessed(sqs: Any) -> None:
    """Five records, one failing and one without its key: batchItemFailures names exactly
    those two; the same batch invoked again runs nothing that succeeded (duplicates)."""
    store = MemoryStore()
    effects: list[str] = []
    handler = charge_handler(store, effects)
    bodies = [{"payment_id": "p0"}, {"payment_id": "p1", "declined": True}, {"nokey": 1},
              {"payment_id": "p3"}, {"payment_id": "p0"}]
    event = lambda_event(sqs, bodies)
    ids = {json.loads(r["body"]).get("payment_id", "nokey") + ("" if i != 4 else "-again"):
           r["messageId"] for i, r in enumerate(event["Records"])}
    first = handler.lambda_handler(event, None)
    assert sorted(f["itemIdentifier"] for f in first["batchItemFailures"]) == sorted(
        [ids["p1"], ids["nokey"]])
    assert sorted(effects) == ["p0", "p3"]
    again = handler.lambda_handler(event, None)
    assert again == first and sorted(effects) == ["p0", "p3"]


def test_lambda_fifo_stops_at_the_first_failure(sqs: Any) -> None:
    """On a FIFO queue the records after a failure are not run and are reported too, so
    the group's order holds."""
    effects: list[str] = []
    handler = charge_handler(MemoryStore(), effects)
    event = lambda_event(sqs, [{"payment_id": "f0"}, {"payment_id": "f1", "declined": True},
                               {"payment_id": "f2"}], fifo=True)
    reply = handler.lambda_handler(event, None)
    assert [f["itemIdentifier"] for f in reply["batchItemFailures"]] == [
        r["messageId"] for r in event["Records"][1:]]
    assert effects == ["f0"]


def test_powertools_batch_processor_record_handler(sqs: Any, pg_url: str) -> None:
    """Powertools' BatchProcessor with our record_handler, transactional mode on
    PostgreSQL: the failing record is reported, the others committed once each; a second
    invocation writes nothing new."""
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )

    store = SqlStore(pg_url)
    store.create_schema()
    meta = sa.MetaData()
    rows = sa.Table("lambda_ledger", meta, sa.Column("payment_id", sa.String(50)),
                    sa.Column("cents", sa.Integer))
    meta.create_all(store.engine)

    @sqs_handler(store, key=message_attribute("payment-id"), namespace="tests.lambda.pt",
                 fingerprint=["cents"])
    def apply(message: SqsMessage, *, session: Any) -> str:
        if message.body["cents"] < 0:
            raise Declined("negative")
        session.execute(sa.insert(rows).values(
            payment_id=message.message_attributes["payment-id"], cents=message.body["cents"]))
        return "ok"

    events = [lambda_event(sqs, [{"cents": c}], attributes={
        "payment-id": {"DataType": "String", "StringValue": f"pt-{i}"}})
        for i, c in enumerate([5, -1, 7])]
    event = {"Records": [r for e in events for r in e["Records"]]}
    for _ in range(2):
        reply = process_partial_response(
            event, record_handler=apply.record_handler,
            processor=BatchProcessor(event_type=EventType.SQS))
        assert reply == {"batchItemFailures": [
            {"itemIdentifier": event["Records"][1]["messageId"]}]}
    with store.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(rows.c.payment_id, rows.c.cents)).all()) == [
            ("pt-0", 5), ("pt-2", 7)]
    store.engine.dispose()


def test_record_handler_raises_the_typed_error(sqs: Any) -> None:
    """Called directly, record_handler raises the outcome's typed error."""
    handler = charge_handler(MemoryStore(), [])
    [record] = lambda_event(sqs, [{"nokey": True}])["Records"]
    with pytest.raises(MissingIdempotencyKey):
        handler.record_handler(record)
