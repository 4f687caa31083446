"""idempotent.integrations.sqs against moto's real SQS HTTP API and a real PostgreSQL:
the consumer loop, slow handlers, poison messages, delete failures and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _moto import (
    Feeder,
    MotoServer,
    count_calls,
    drain,
    make_queue,
    queue_counts,
    wait_until,
    worker_env,
)
from _sqs_app import NS, ledger, ledger_rows, make_handler, make_store, setup
from idempotent.integrations.sqs import (
    ERROR_ATTRIBUTE,
    ERROR_TYPE_ATTRIBUTE,
    RECEIVE_COUNT_ATTRIBUTE,
    SOURCE_MESSAGE_ID_ATTRIBUTE,
    OversizedMessage,
    SqsConsumer,
    SqsMessage,
    Status,
    UndecodableMessage,
    body_field,
    message_attribute,
    message_id,
    sqs_handler,
)

from idempotent import IdempotencyKeyConflict, InvalidIdempotencyKey, MissingIdempotencyKey

pytestmark = [pytest.mark.postgres]

APP = Path(__file__).resolve().parent / "_sqs_app.py"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def sqs(moto: MotoServer) -> Iterator[Any]:
    client = moto.client()
    yield client
    client.close()


@pytest.fixture
def db(pg_url: str) -> Iterator[Any]:
    """The ledger database: (url, store, engine); the store's engine disposed after."""
    setup(pg_url)
    store = make_store(pg_url)
    yield pg_url, store, store.engine
    store.engine.dispose()


def send(sqs: Any, url: str, bodies: list[Any], **extra: Any) -> list[str]:
    """Send bodies (JSON-encoded unless str), 10 a call; their MessageIds."""
    ids = []
    for i in range(0, len(bodies), 10):
        entries = [{"Id": str(j), "MessageBody": b if isinstance(b, str) else json.dumps(b),
                    **extra} for j, b in enumerate(bodies[i:i + 10])]
        reply = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert not reply.get("Failed"), reply["Failed"]
        ids.extend(r["MessageId"] for r in sorted(reply["Successful"], key=lambda r: int(r["Id"])))
    return ids


def store_keys(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text(
            "SELECT key FROM idempotency_records WHERE namespace = :ns"), {"ns": NS})]


def consume(consumer: SqsConsumer, url: str, expected: int, timeout: float = 60) -> list[Any]:
    """Poll until ``expected`` outcomes came back, or fail after ``timeout``."""
    outcomes: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(outcomes) < expected:
        assert time.monotonic() < deadline, (len(outcomes), expected, consumer.stats)
        outcomes.extend(consumer.poll())
    return outcomes


# -- the flow ----------------------------------------------------------------------------
def test_each_payment_applied_once_producer_duplicates_deleted(sqs: Any, db: Any) -> None:
    """30 payments each sent twice (two MessageIds): 30 ledger rows, 30 PROCESSED and 30
    DUPLICATE outcomes, all 60 deleted in batches, the queue empty; the calls per message
    are receive + delete batches only (no visibility change for a fast batch)."""
    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True)
    payments = [{"payment_id": f"p{i}", "cents": 100 + i} for i in range(30)]
    send(sqs, url, payments + payments)
    calls = count_calls(sqs)
    with SqsConsumer(sqs, url, make_handler(store), wait_time=1,
                     dead_letter_queue_url=dlq) as consumer:
        outcomes = consume(consumer, url, 60)
        assert consumer.poll() == []
    statuses = Counter(o.status for o in outcomes)
    assert statuses == {Status.PROCESSED: 30, Status.DUPLICATE: 30}
    assert sorted(ledger_rows(engine)) == sorted((p["payment_id"], p["cents"]) for p in payments)
    assert consumer.stats["deleted"] == 60 and consumer.stats["delete_failed"] == 0
    assert queue_counts(sqs, url) == (0, 0)
    assert calls.get("ChangeMessageVisibilityBatch", 0) == 0
    assert calls["DeleteMessageBatch"] <= calls["ReceiveMessage"]
    dup = next(o for o in outcomes if o.status is Status.DUPLICATE)
    assert dup.result["applied"] == dup.result["applied"] and dup.result["by"] == "test"


def test_message_id_key_lease_mode(sqs: Any, db: Any) -> None:
    """The default key is the MessageId; a handler without session/connection runs in lease
    mode, and a redelivery of one MessageId (its delete lost) is a duplicate."""
    _, store, _ = db
    url, dlq = make_queue(sqs, dlq=True, visibility=1)
    effects: list[str] = []

    @sqs_handler(store, key=message_id, namespace="tests.sqs.lease")
    def charge(message: SqsMessage) -> str:
        effects.append(message.body["payment_id"])
        return f"charged {message.body['payment_id']}"

    [mid] = send(sqs, url, [{"payment_id": "p1", "cents": 5}])
    lose_deletes = {"on": True}

    def drop_delete(params: dict[str, Any], **_: Any) -> None:
        if lose_deletes["on"]:  # the receipt handle mangled: SQS refuses the delete entry
            for entry in params["Entries"]:
                entry["ReceiptHandle"] = "not-a-receipt-handle"

    sqs.meta.events.register("provide-client-params.sqs.DeleteMessageBatch", drop_delete)
    with SqsConsumer(sqs, url, charge, wait_time=1, visibility_timeout=1,
                     dead_letter_queue_url=dlq) as consumer:
        [first] = consume(consumer, url, 1)
        assert first.status is Status.PROCESSED and first.message_id == mid
        assert consumer.stats["delete_failed"] == 1
        lose_deletes["on"] = False
        [again] = consume(consumer, url, 1)  # back after its 1 s visibility timeout
    assert again.status is Status.DUPLICATE and again.message_id == mid
    assert again.result == "charged p1" and effects == ["p1"]
    assert queue_counts(sqs, url) == (0, 0)


def test_slow_handler_runs_once_its_visibility_extended(sqs: Any, db: Any) -> None:
    """A handler that runs for 3 visibility timeouts (2 s each) is not redelivered: a
    second consumer polling the queue all along receives nothing, the heartbeat extended
    the message, and the payment is applied once."""
    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True, visibility=2)
    release = threading.Event()
    started = threading.Event()
    runs: list[str] = []

    @sqs_handler(store, key=message_id, namespace="tests.sqs.slow", lease=30)
    def slow(message: SqsMessage) -> None:
        runs.append(message.message_id)
        started.set()
        assert release.wait(60)

    send(sqs, url, [{"payment_id": "slow", "cents": 1}])
    other_client = make_client_like(sqs)
    got: list[Any] = []
    with SqsConsumer(sqs, url, slow, visibility_timeout=2, wait_time=1,
                     dead_letter_queue_url=dlq) as first, \
         SqsConsumer(other_client, url, slow, visibility_timeout=2, wait_time=1,
                     dead_letter_queue_url=dlq) as second:
        worker = threading.Thread(target=lambda: got.extend(consume(first, url, 1)))
        worker.start()
        assert started.wait(30)
        since = time.monotonic()
        seen: list[Any] = []
        while time.monotonic() - since < 6:  # three visibility timeouts of polling
            seen.extend(second.poll())
        release.set()
        worker.join(60)
        assert not worker.is_alive()
        assert seen == [] and second.stats["received"] == 0
        assert first.extended >= 2  # at least one extension per elapsed timeout after the first
    other_client.close()
    assert [o.status for o in got] == [Status.PROCESSED] and len(runs) == 1
    assert queue_counts(sqs, url) == (0, 0)
    del engine


def make_client_like(sqs: Any) -> Any:
    from _moto import sqs_client

    return sqs_client(sqs.meta.endpoint_url)


@pytest.mark.slow
def test_slow_handler_sigkilled_reappears_and_is_applied_once(
        moto: MotoServer, sqs: Any, db: Any) -> None:
    """A consumer process SIGKILLed inside a slow handler (transaction open): the message
    reappears after the 2 s visibility timeout, another consumer applies it, once."""
    url_db, store, engine = db
    url, dlq = make_queue(sqs, dlq=True, visibility=2)
    slow_dir = tempfile.mkdtemp(prefix="idem-sqs-slow-")
    [mid] = send(sqs, url, [{"payment_id": "slow-1", "cents": 42, "slow": True}])
    proc = subprocess.Popen(
        [sys.executable, str(APP)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=worker_env(moto, queue=url, dlq=dlq, db=url_db, visibility=2, slow_dir=slow_dir))
    try:
        marker = Path(slow_dir, str(proc.pid))
        wait_until(marker.exists, 60, "the slow handler started")
        assert marker.read_text() == mid
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    # in this process the payment is not slow (no slow_dir): it is applied, once
    with SqsConsumer(sqs, url, make_handler(store, by="survivor"), visibility_timeout=2,
                     wait_time=1, dead_letter_queue_url=dlq) as consumer:
        [outcome] = consume(consumer, url, 1)
    assert outcome.status is Status.PROCESSED and outcome.message_id == mid
    assert ledger_rows(engine) == [("slow-1", 42)]
    with engine.connect() as conn:
        assert conn.execute(sa.select(ledger.c.applied_by)).scalar_one() == "survivor"
    assert queue_counts(sqs, url) == (0, 0)


# -- poison ------------------------------------------------------------------------------
class Declined(Exception):
    """The handler's own error for the poison payment."""


@pytest.mark.slow
def test_poison_message_dead_lettered_with_its_error_rest_applied_once(
        sqs: Any, db: Any) -> None:
    """One payment that always fails among 1,000: the 999 others are applied once, the
    poison one ends in our dead-letter queue after max_receives=3 receives, carrying its
    error, with nothing recorded for its key; the queue drains."""
    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True, visibility=30)
    payments = [{"payment_id": f"p{i}", "cents": i} for i in range(1000)]
    payments[537]["poison"] = True

    def fail_poison(msg: dict[str, Any], conn: Any) -> None:
        if msg.get("poison"):
            raise Declined(f"card declined for {msg['payment_id']}")

    handler = make_poison_handler(store, fail_poison)
    feeder = Feeder(make_client_like(sqs), url, payments)
    with SqsConsumer(sqs, url, handler, wait_time=1, dead_letter_queue_url=dlq,
                     max_receives=3, retry_delay=0) as consumer:
        wait_until(lambda: consumer.poll() == [] and feeder.done
                   and queue_counts(sqs, url) == (0, 0), 120,
                   "the queue drained", poll=0, describe=lambda: str(consumer.stats))
    feeder.join()
    feeder.client.close()
    rows = ledger_rows(engine)
    assert len(rows) == 999 and len(set(rows)) == 999
    assert sum(c for _, c in rows) == sum(range(1000)) - 537
    assert consumer.stats["failed"] == 3 and consumer.stats["dead_lettered"] == 1
    [dead] = drain(sqs, dlq)
    assert json.loads(dead["Body"])["payment_id"] == "p537"
    attrs = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attrs[ERROR_TYPE_ATTRIBUTE] == "Declined"
    assert attrs[ERROR_ATTRIBUTE] == "card declined for p537"
    assert attrs[RECEIVE_COUNT_ATTRIBUTE] == "3" and attrs[SOURCE_MESSAGE_ID_ATTRIBUTE]
    assert "p537" not in store_keys(engine) and len(store_keys(engine)) == 999


def make_poison_handler(store: Any, check: Any) -> Any:
    @sqs_handler(store, key=lambda m: m.body.get("payment_id"), namespace=NS)
    def apply_payment(message: SqsMessage, *, connection: Any) -> None:
        connection.execute(sa.insert(ledger).values(
            payment_id=message.body["payment_id"], cents=message.body["cents"],
            applied_by="test"))
        check(message.body, connection)
    return apply_payment


def test_poison_left_to_the_queues_redrive_policy(sqs: Any, db: Any) -> None:
    """Without a dead-letter queue of ours, failures are left to the queue's redrive
    policy (maxReceiveCount=2): the poison message ends in the queue's DLQ, the others are
    applied once."""
    _, store, engine = db
    url, dlq = make_queue(sqs, max_receive=2, visibility=30)
    payments = [{"payment_id": f"r{i}", "cents": 10} for i in range(20)]
    payments[7]["poison"] = True

    def fail_poison(msg: dict[str, Any], conn: Any) -> None:
        if msg.get("poison"):
            raise Declined("no")

    send(sqs, url, payments)
    assert dlq is not None
    with SqsConsumer(sqs, url, make_poison_handler(store, fail_poison), wait_time=1,
                     retry_delay=0) as consumer:
        wait_until(lambda: consumer.poll() == [] and queue_counts(sqs, url) == (0, 0), 60,
                   "the queue drained", poll=0, describe=lambda: str(consumer.stats))
    assert sorted(p for p, _ in ledger_rows(engine)) == sorted(
        p["payment_id"] for p in payments if not p.get("poison"))
    [dead] = drain(sqs, dlq)
    assert json.loads(dead["Body"])["payment_id"] == "r7"
    assert consumer.stats["failed"] == 2 and consumer.stats["dead_lettered"] == 0


def test_no_dead_letter_queue_and_no_redrive_policy_is_refused(sqs: Any, db: Any) -> None:
    """A consumer that could receive a poison message forever is refused at construction."""
    url, _ = make_queue(sqs)
    with pytest.raises(ValueError, match="no redrive policy"):
        SqsConsumer(sqs, url, make_handler(db[1]))
    url2, _ = make_queue(sqs, max_receive=3)
    with pytest.raises(ValueError, match="max_receives"):
        SqsConsumer(sqs, url2, make_handler(db[1]), max_receives=2)


# -- deletes -----------------------------------------------------------------------------
def test_delete_batch_partial_failure(sqs: Any, db: Any) -> None:
    """DeleteMessageBatch refuses 1 entry of 10 (a bad receipt handle): the other 9 are
    deleted; the refused one comes back after its visibility timeout and is deleted as a
    duplicate, without a second ledger row."""
    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True, visibility=1)
    payments = [{"payment_id": f"d{i}", "cents": i} for i in range(10)]
    send(sqs, url, payments)
    spoil = {"left": 1}

    def spoil_one(params: dict[str, Any], **_: Any) -> None:
        if spoil["left"] and len(params["Entries"]) > 1:
            spoil["left"] -= 1
            params["Entries"][3]["ReceiptHandle"] = "spoiled"

    sqs.meta.events.register("provide-client-params.sqs.DeleteMessageBatch", spoil_one)
    with SqsConsumer(sqs, url, make_handler(store), wait_time=1, visibility_timeout=1,
                     dead_letter_queue_url=dlq, max_messages=10) as consumer:
        outcomes = consume(consumer, url, 11)
    statuses = Counter(o.status for o in outcomes)
    assert statuses == {Status.PROCESSED: 10, Status.DUPLICATE: 1}, consumer.stats
    assert consumer.stats["deleted"] == 10 and consumer.stats["delete_failed"] == 1
    assert sorted(ledger_rows(engine)) == sorted((p["payment_id"], p["cents"]) for p in payments)
    assert queue_counts(sqs, url) == (0, 0)


def test_delete_call_failing_is_retried_then_left(sqs: Any, db: Any) -> None:
    """The delete call itself fails (a connection error): retried (3 attempts); when
    every attempt fails the messages stay, come back, and are deleted as duplicates."""
    from botocore.exceptions import EndpointConnectionError

    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True, visibility=1)
    send(sqs, url, [{"payment_id": f"c{i}", "cents": 1} for i in range(3)])
    failures = {"left": 3}

    def fail(**_: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise EndpointConnectionError(endpoint_url="http://test")

    sqs.meta.events.register("before-call.sqs.DeleteMessageBatch", fail)
    with SqsConsumer(sqs, url, make_handler(store), wait_time=1, visibility_timeout=1,
                     dead_letter_queue_url=dlq) as consumer:
        outcomes = consume(consumer, url, 6)
    assert failures["left"] == 0 and consumer.stats["delete_failed"] == 3
    assert Counter(o.status for o in outcomes) == {Status.PROCESSED: 3, Status.DUPLICATE: 3}
    assert len(ledger_rows(engine)) == 3 and queue_counts(sqs, url) == (0, 0)


# -- bad input ---------------------------------------------------------------------------
def test_bad_input_typed_dead_lettered_nothing_recorded(sqs: Any, db: Any) -> None:
    """Missing key, undecodable body, NaN, oversized body, a NUL in the key, a key of the
    wrong type and a reused key with another payload: each a typed error, dead-lettered at
    once with its error type, nothing recorded; the good payment is applied."""
    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True)
    bad = {
        "missing": {"cents": 1},
        "undecodable": "{not json",
        "nan": '{"payment_id": "n", "cents": NaN}',
        "oversized": {"payment_id": "big", "cents": 1, "pad": "x" * 3000},
        "nul": {"payment_id": "a\u0000b", "cents": 1},
        "dict_key": {"payment_id": {"x": 1}, "cents": 1},
        "not_a_mapping": [1, 2, 3],
    }
    expected = {
        "missing": MissingIdempotencyKey, "undecodable": UndecodableMessage,
        "nan": UndecodableMessage, "oversized": OversizedMessage,
        "nul": InvalidIdempotencyKey, "dict_key": UndecodableMessage,
        "not_a_mapping": MissingIdempotencyKey,
    }
    good = {"payment_id": "good", "cents": 7}
    ids = dict(zip(bad, send(sqs, url, list(bad.values())), strict=True))
    send(sqs, url, [good])
    handler = make_handler(store, max_body_bytes=2048)
    with SqsConsumer(sqs, url, handler, wait_time=1, dead_letter_queue_url=dlq) as consumer:
        outcomes = consume(consumer, url, len(bad) + 1)
        # the same key with another payload: a conflict, after the good one is recorded
        [conflict_id] = send(sqs, url, [{"payment_id": "good", "cents": 8}])
        [conflict] = consume(consumer, url, 1)
    by_id = {o.message_id: o for o in outcomes}
    for name, mid in ids.items():
        assert by_id[mid].status is Status.BAD_INPUT, name
        assert type(by_id[mid].error) is expected[name], (name, by_id[mid].error)
    assert conflict.message_id == conflict_id and conflict.status is Status.BAD_INPUT
    assert isinstance(conflict.error, IdempotencyKeyConflict)
    oversized = by_id[ids["oversized"]].error
    assert isinstance(oversized, OversizedMessage) and oversized.limit == 2048
    assert oversized.size is not None and oversized.size > 2048
    assert ledger_rows(engine) == [("good", 7)] and store_keys(engine) == ["good"]
    dead = drain(sqs, dlq)
    kinds = Counter(d["MessageAttributes"][ERROR_TYPE_ATTRIBUTE]["StringValue"] for d in dead)
    assert kinds == Counter([e.__name__ for e in expected.values()] + ["IdempotencyKeyConflict"])
    assert queue_counts(sqs, url) == (0, 0)


def test_bad_input_without_our_dlq_is_left_for_the_redrive(sqs: Any, db: Any) -> None:
    """Without a dead-letter queue of ours, a message without its key is left (not
    deleted, not recorded): the queue's redrive policy moves it after 2 receives."""
    _, store, engine = db
    url, dlq = make_queue(sqs, max_receive=2)
    assert dlq is not None
    send(sqs, url, [{"cents": 3}])
    with SqsConsumer(sqs, url, make_handler(store), wait_time=1, retry_delay=0) as consumer:
        wait_until(lambda: consumer.poll() == [] and queue_counts(sqs, url) == (0, 0), 60,
                   "the queue drained", poll=0)
    assert consumer.stats["bad_input"] == 2 and consumer.stats["deleted"] == 0
    assert len(drain(sqs, dlq)) == 1
    assert ledger_rows(engine) == [] and store_keys(engine) == []


def test_store_down_is_not_the_messages_fault(sqs: Any, pg_url: str) -> None:
    """With the database unreachable every delivery is RETRY (StoreUnavailable): the
    message is neither deleted nor dead-lettered, whatever its receive count."""
    store = make_store("postgresql+psycopg://nobody@127.0.0.1:1/none")
    url, dlq = make_queue(sqs, dlq=True)
    send(sqs, url, [{"payment_id": "x", "cents": 1}])
    from idempotent import StoreUnavailable, no_retry

    handler = make_handler(store, retry=no_retry())
    with SqsConsumer(sqs, url, handler, wait_time=1, dead_letter_queue_url=dlq,
                     max_receives=1, retry_delay=0) as consumer:
        outcomes = consume(consumer, url, 3)
    store.engine.dispose()
    assert {o.status for o in outcomes} == {Status.RETRY}
    assert all(isinstance(o.error, StoreUnavailable) for o in outcomes)
    assert consumer.stats["dead_lettered"] == 0 and consumer.stats["deleted"] == 0
    assert queue_counts(sqs, url)[0] + queue_counts(sqs, url)[1] == 1


def test_fifo_group_order_holds_after_a_failure(sqs: Any, db: Any) -> None:
    """FIFO: f0 fails once; f1, of the same group and in the same batch, is not run before
    f0 succeeds; g0 of another group goes on. Each is applied once, f0 before f1."""
    _, store, _ = db
    url, dlq = make_queue(sqs, dlq=True, fifo=True)
    order: list[str] = []
    failed_once: set[str] = set()

    @sqs_handler(store, key=message_id, namespace="tests.sqs.fifo")
    def apply(message: SqsMessage) -> None:
        pid = message.body["payment_id"]
        if pid == "f0" and pid not in failed_once:
            failed_once.add(pid)
            raise Declined("first attempt fails")
        order.append(pid)

    for i, (pid, group) in enumerate([("f0", "f"), ("f1", "f"), ("g0", "g")]):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"payment_id": pid}),
                         MessageGroupId=group, MessageDeduplicationId=str(i))
    with SqsConsumer(sqs, url, apply, wait_time=1, dead_letter_queue_url=dlq,
                     retry_delay=0) as consumer:
        first = consumer.poll()
        assert Status.FAILED in {o.status for o in first} and "f1" not in order
        wait_until(lambda: consumer.poll() == [] and queue_counts(sqs, url) == (0, 0), 30,
                   "the queue drained", poll=0)
    assert sorted(order) == ["f0", "f1", "g0"] and order.index("f0") < order.index("f1")


def test_interrupt_mid_batch_deletes_what_committed_and_releases_the_rest(
        sqs: Any, db: Any) -> None:
    """KeyboardInterrupt inside the third handler of a batch of five: it reaches the
    caller; the two committed messages are deleted, the interrupted one (rolled back) and
    the two not run are visible again at once, and a new consumer applies those three."""
    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True)
    send(sqs, url, [{"payment_id": f"i{i}", "cents": i} for i in range(5)])
    seen: list[str] = []

    def interrupt_third(msg: dict[str, Any], conn: Any) -> None:
        seen.append(msg["payment_id"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    got: list[Any] = []
    with SqsConsumer(sqs, url, make_poison_handler(store, interrupt_third), wait_time=1,
                     dead_letter_queue_url=dlq) as consumer:
        while not got:  # moto may hand out fewer than 5 at first: until the interrupt
            try:
                got.extend(consumer.poll())
            except KeyboardInterrupt:
                break
            got.clear()
            assert len(seen) < 3
    assert len(seen) == 3 and consumer.stats["deleted"] == len(ledger_rows(engine))
    interrupted = seen[2]
    assert interrupted not in [p for p, _ in ledger_rows(engine)]
    assert interrupted not in store_keys(engine)
    wait_until(lambda: queue_counts(sqs, url) == (5 - len(ledger_rows(engine)), 0), 10,
               "the interrupted and unrun messages visible again at once")
    with SqsConsumer(sqs, url, make_handler(store), wait_time=1,
                     dead_letter_queue_url=dlq) as again:
        wait_until(lambda: again.poll() == [] and queue_counts(sqs, url) == (0, 0), 30,
                   "the queue drained", poll=0)
    assert sorted(ledger_rows(engine)) == [(f"i{i}", i) for i in range(5)]


def test_failing_extension_lets_a_second_consumer_in_but_not_a_second_run(
        sqs: Any, db: Any) -> None:
    """The heartbeat's ChangeMessageVisibilityBatch fails (a connection error) on the
    first consumer: its message reappears while the handler runs (lease mode), a second
    consumer receives it and gets RETRY (the lease is live); the handler ran once."""
    from botocore.exceptions import EndpointConnectionError

    _, store, _ = db
    url, dlq = make_queue(sqs, dlq=True, visibility=1)
    first_client = make_client_like(sqs)

    def fail(**_: Any) -> None:
        raise EndpointConnectionError(endpoint_url="http://test")

    first_client.meta.events.register("before-call.sqs.ChangeMessageVisibilityBatch", fail)
    runs: list[str] = []
    release = threading.Event()
    started = threading.Event()

    @sqs_handler(store, key=message_id, namespace="tests.sqs.noextend", lease=30)
    def slow(message: SqsMessage) -> None:
        runs.append(message.message_id)
        started.set()
        assert release.wait(60)

    send(sqs, url, [{"payment_id": "x", "cents": 1}])
    got: list[Any] = []
    with SqsConsumer(first_client, url, slow, visibility_timeout=1, wait_time=1,
                     dead_letter_queue_url=dlq) as first, \
         SqsConsumer(sqs, url, slow, visibility_timeout=1, wait_time=1,
                     dead_letter_queue_url=dlq, retry_delay=30) as second:
        worker = threading.Thread(target=lambda: got.extend(consume(first, url, 1)))
        worker.start()
        assert started.wait(30)
        [other] = consume(second, url, 1)
        release.set()
        worker.join(60)
    first_client.close()
    assert other.status is Status.RETRY and type(other.error).__name__ == "AlreadyInProgress"
    assert [o.status for o in got] == [Status.PROCESSED] and len(runs) == 1


def test_binary_message_attribute_key(sqs: Any, db: Any) -> None:
    """A Binary message attribute is a key as its hex; the same bytes in two sends are
    one key."""
    _, store, _ = db
    url, dlq = make_queue(sqs, dlq=True)
    runs: list[str] = []

    @sqs_handler(store, key=message_attribute("pid"), namespace="tests.sqs.binary")
    def apply(message: SqsMessage) -> None:
        runs.append(message.message_attributes["pid"].hex())  # type: ignore[union-attr]

    attr = {"pid": {"DataType": "Binary", "BinaryValue": b"\x00\xffpay"}}
    send(sqs, url, [{"n": 1}, {"n": 1}], MessageAttributes=attr)
    with SqsConsumer(sqs, url, apply, wait_time=1, dead_letter_queue_url=dlq) as consumer:
        outcomes = consume(consumer, url, 2)
    assert sorted(o.status for o in outcomes) == [Status.DUPLICATE, Status.PROCESSED]
    assert runs == ["00ff706179"]


def test_scope_by_tenant_and_dead_letter_keeps_attributes(sqs: Any, db: Any) -> None:
    """scope=message_attribute("tenant"): two tenants' pay-1 are two keys, each applied
    once; a message without a tenant is bad input, dead-lettered with its own attributes
    kept beside the error's."""
    _, store, _ = db
    url, dlq = make_queue(sqs, dlq=True)
    runs: list[tuple[str, str]] = []

    @sqs_handler(store, key=body_field("payment_id"), scope=message_attribute("tenant"),
                 namespace="tests.sqs.tenants")
    def apply(message: SqsMessage) -> None:
        runs.append((str(message.message_attributes["tenant"]), message.body["payment_id"]))

    for tenant in ("a", "b", "a"):
        send(sqs, url, [{"payment_id": "pay-1"}], MessageAttributes={
            "tenant": {"DataType": "String", "StringValue": tenant}})
    send(sqs, url, [{"payment_id": "pay-1"}], MessageAttributes={
        "trace": {"DataType": "String", "StringValue": "t-1"}})
    with SqsConsumer(sqs, url, apply, wait_time=1, dead_letter_queue_url=dlq) as consumer:
        outcomes = consume(consumer, url, 4)
    assert sorted(runs) == [("a", "pay-1"), ("b", "pay-1")]
    assert Counter(o.status for o in outcomes) == {
        Status.PROCESSED: 2, Status.DUPLICATE: 1, Status.BAD_INPUT: 1}
    [dead] = drain(sqs, dlq)
    attrs = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attrs["trace"] == "t-1" and attrs[ERROR_TYPE_ATTRIBUTE] == "MissingIdempotencyKey"


def test_run_survives_a_failing_receive_and_stops_on_a_wrong_queue(sqs: Any, db: Any) -> None:
    """run(): two receives failing with a connection error are retried with backoff and
    the message is then applied; a queue that does not exist is raised at once (not a
    transient fault); on_outcome sees every outcome."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    _, store, engine = db
    url, dlq = make_queue(sqs, dlq=True)
    send(sqs, url, [{"payment_id": "r1", "cents": 9}])
    client = make_client_like(sqs)
    failures = {"left": 2}

    def fail(**_: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise EndpointConnectionError(endpoint_url="http://test")

    client.meta.events.register("before-call.sqs.ReceiveMessage", fail)
    seen: list[Any] = []
    try:
        with SqsConsumer(client, url, make_handler(store), wait_time=1,
                         dead_letter_queue_url=dlq) as consumer:
            consumer.run(max_idle_polls=1, on_outcome=seen.append)
        assert failures["left"] == 0 and [o.status for o in seen] == [Status.PROCESSED]
        assert ledger_rows(engine) == [("r1", 9)]
        with SqsConsumer(client, url, make_handler(store), wait_time=1,
                         dead_letter_queue_url=dlq) as wrong:
            wrong.queue_url = url + "-missing"
            with pytest.raises(ClientError):
                wrong.run(max_idle_polls=1)
    finally:
        client.close()
