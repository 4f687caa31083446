"""The pika consumer on a real RabbitMQ node and a real PostgreSQL: acks after commit,
duplicates acked without running, business keys, bad input and poison messages
dead-lettered with their error, store faults nacked with requeue."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
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
    running,
    wait_until,
)
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture
from _servers import PostgresServer
from idempotent.integrations.amqp import (
    DELIVERIES_HEADER,
    ERROR_HEADER,
    ERROR_TYPE_HEADER,
    FAILURES_HEADER,
    QUEUE_HEADER,
    Ack,
    Consumer,
    DeadLetter,
    Message,
    Processor,
    Republish,
    Requeue,
)

from idempotent import Event, SqlStore, StoreUnavailable, current_key, listening

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def db(pg_url: str) -> Iterator[tuple[sa.Engine, SqlStore]]:
    engine = sa.create_engine(pg_url)
    metadata.create_all(engine)
    store = SqlStore(engine)
    store.create_schema()
    yield engine, store
    engine.dispose()


@pytest.fixture
def queue(rabbit: RabbitServer) -> tuple[str, str, str]:  # noqa: F811
    """A fresh durable queue and its dead-letter exchange/queue: (url, queue, dlx)."""
    name = f"q-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, name, dlx=f"{name}.dlx")
    return rabbit.url, name, f"{name}.dlx"


def rows(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as c:
        return Counter(r[0] for r in c.execute(sa.select(ledger.c.payment_id)))


def record_count(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text("SELECT count(*) FROM idempotency_records")).scalar() or 0)


def payments(n: int) -> list[dict[str, Any]]:
    return [{"payment_id": f"pay-{i:05d}", "cents": 100 + i} for i in range(n)]


def test_each_message_once_duplicates_acked(db: tuple[sa.Engine, SqlStore],
                                            queue: tuple[str, str, str]) -> None:
    """300 payments, a third of them sent twice with the same message_id: one ledger row
    each, the copies acked as duplicates without running, the queue empty."""
    engine, store = db
    url, q, dlx = queue
    pays = payments(300)
    sends = [(p, {"message_id": p["payment_id"]}) for p in pays]
    sends += [(p, {"message_id": p["payment_id"]}) for p in pays[::3]]
    publish(url, q, sends)
    events: Counter[str] = Counter()
    with listening(lambda e: events.update([e.kind])):
        consumer = Consumer(apply_payment, store, queue=q, dead_letter_exchange=dlx,
                            namespace="amqp.apply")
        with running(consumer, url):
            wait_until(lambda: events["completed"] + events["duplicate"] == len(sends), 60,
                       "every delivery handled", lambda: str(events))
            wait_until(lambda: ready_count(url, q) == 0, 30, "queue empty")
    got = rows(engine)
    assert got == Counter({p["payment_id"]: 1 for p in pays})
    assert events["duplicate"] == len(pays[::3])
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.sum(ledger.c.cents))).scalar() == sum(
            p["cents"] for p in pays)
    assert drain(url, dlx) == []


def test_business_key_collapses_producer_duplicates(db: tuple[sa.Engine, SqlStore],
                                                    queue: tuple[str, str, str]) -> None:
    """key="payment_id": a producer that sent a payment twice with two message ids (or
    none) still makes one ledger row."""
    engine, store = db
    url, q, dlx = queue
    pays = payments(50)
    sends = [(p, {"message_id": str(uuid.uuid4())}) for p in pays] + [(p, {}) for p in pays]
    publish(url, q, sends)
    consumer = Consumer(apply_payment, store, queue=q, key="payment_id",
                        dead_letter_exchange=dlx, namespace="amqp.by_payment")
    with running(consumer, url):
        wait_until(lambda: len(rows(engine)) == 50 and ready_count(url, q) == 0, 60,
                   "all applied")
    assert rows(engine) == Counter({p["payment_id"]: 1 for p in pays})
    assert record_count(engine) == 50


def test_bad_input_dead_lettered_with_its_error(db: tuple[sa.Engine, SqlStore],
                                                queue: tuple[str, str, str]) -> None:
    """No message_id, a body that is not JSON, a body over max_body, and a key reused with
    another payload: each is dead-lettered at once with a typed error in its headers, nothing
    recorded for it, while the good messages around them are applied."""
    engine, store = db
    url, q, dlx = queue
    good = payments(3)
    publish(url, q, [
        (good[0], {"message_id": "good-0"}),
        ({"payment_id": "no-id", "cents": 1}, {}),
        (b"\xff{not json", {"message_id": "garbage"}),
        ({"payment_id": "huge", "cents": 1, "pad": "x" * 5000}, {"message_id": "huge"}),
        (good[1], {"message_id": "good-1"}),
        ({"payment_id": "pay-00001", "cents": 999_999}, {"message_id": "good-1"}),  # conflict
        (good[2], {"message_id": "good-2"}),
    ])
    consumer = Consumer(apply_payment, store, queue=q, dead_letter_exchange=dlx,
                        max_body=4096, namespace="amqp.bad")
    dead: list[tuple[bytes, Any]] = []
    with running(consumer, url):
        def four_dead() -> bool:
            dead.extend(drain(url, dlx))
            return len(dead) >= 4
        wait_until(four_dead, 60, "4 dead letters", lambda: f"{len(dead)}")
        wait_until(lambda: len(rows(engine)) == 3, 30, "good ones applied")
    types = {(props.message_id, props.headers[ERROR_TYPE_HEADER]) for _, props in dead}
    assert types == {(None, "MissingIdempotencyKey"), ("garbage", "UndecodableMessage"),
                     ("huge", "MessageTooLarge"), ("good-1", "IdempotencyKeyConflict")}
    for _body, props in dead:
        assert props.headers[QUEUE_HEADER] == q
        assert props.headers[DELIVERIES_HEADER] == 1
        assert props.headers[ERROR_HEADER].startswith(props.headers[ERROR_TYPE_HEADER])
        assert props.delivery_mode == 2
    # the dead letter carries the original body, byte for byte
    assert b"\xff{not json" in [b for b, _ in dead]
    assert rows(engine) == Counter({p["payment_id"]: 1 for p in good})
    assert record_count(engine) == 3  # nothing recorded for the bad ones
    with engine.connect() as c:
        assert c.execute(sa.select(ledger.c.cents).where(
            ledger.c.payment_id == "pay-00001")).scalar() == good[1]["cents"]


def test_poison_message_dead_lettered_after_n_deliveries(
        db: tuple[sa.Engine, SqlStore], rabbit: RabbitServer) -> None:  # noqa: F811
    """One message that always fails among 1,000 on a quorum queue: the others apply once,
    it runs exactly max_deliveries=3 times and ends in the dead-letter queue carrying its
    error, and the queue drains."""
    engine, store = db
    q = f"qq-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, q, quorum=True, dlx=f"{q}.dlx")
    pays = payments(1000)
    pays[437]["poison"] = True
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(message: Message, *, connection: sa.Connection) -> Any:
        with lock:
            runs[message.body["payment_id"]] += 1
        if message.body.get("poison"):
            raise ValueError(f"cannot apply {message.body['payment_id']}")
        return apply_payment(message, connection=connection)

    publish(rabbit.url, q, [(p, {"message_id": p["payment_id"]}) for p in pays])
    consumer = Consumer(handler, store, queue=q, dead_letter_exchange=f"{q}.dlx",
                        max_deliveries=3, retry_delay=0.01, namespace="amqp.poison")
    dead: list[tuple[bytes, Any]] = []
    with running(consumer, rabbit.url):
        def dead_and_applied() -> bool:
            dead.extend(drain(rabbit.url, f"{q}.dlx"))
            return bool(dead) and len(rows(engine)) == 999
        wait_until(dead_and_applied, 120, "999 applied and 1 dead letter",
                   lambda: f"{len(rows(engine))} applied, {len(dead)} dead")
        wait_until(lambda: ready_count(rabbit.url, q) == 0, 30, "queue drained")
    assert len(dead) == 1
    body, props = dead[0]
    assert json.loads(body)["payment_id"] == "pay-00437"
    assert props.headers[ERROR_TYPE_HEADER] == "ValueError"
    assert props.headers[ERROR_HEADER] == "ValueError: cannot apply pay-00437"
    assert props.headers[DELIVERIES_HEADER] == 3
    assert props.headers[FAILURES_HEADER] == 2  # the copy that failed the third time
    assert runs["pay-00437"] == 3
    assert sum(runs.values()) == 999 + 3  # no good payment ran twice
    got = rows(engine)
    assert "pay-00437" not in got and len(got) == 999 and set(got.values()) == {1}
    assert record_count(engine) == 999


def test_store_fault_nacks_with_requeue(pg_server: PostgresServer, db: tuple[sa.Engine, SqlStore],
                                        queue: tuple[str, str, str], pg_url: str) -> None:
    """The store's database refuses connections: the message is nacked with requeue (it
    comes back redelivered, is never acked, never dead-lettered); once the database is back
    it is applied once."""
    engine, _ = db
    url, q, dlx = queue
    dbname = sa.make_url(pg_url).database
    store = SqlStore(sa.create_engine(pg_url, pool_pre_ping=True))
    seen: list[Event] = []
    publish(url, q, [(payments(1)[0], {"message_id": "p-1"})])
    pg_server.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    try:
        pg_server.terminate_backends(dbname=dbname)
        consumer = Consumer(apply_payment, store, queue=q, dead_letter_exchange=dlx,
                            retry=None, retry_delay=0.05, namespace="amqp.fault")
        outcomes: list[Any] = []
        original = consumer.processor.outcome

        def spy(exc: BaseException, message: Message | None) -> Any:
            out = original(exc, message)
            outcomes.append((out, message))
            return out
        consumer.processor.outcome = spy  # type: ignore[method-assign]
        with listening(seen.append), running(consumer, url):
            wait_until(lambda: len(outcomes) >= 3, 60, "three failed deliveries")
            pg_server.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            engine.dispose()  # its pooled connection was terminated too
            wait_until(lambda: rows(engine) == Counter({"pay-00000": 1}), 60, "applied")
            wait_until(lambda: ready_count(url, q) == 0, 30, "queue empty")
    finally:
        pg_server.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        store.engine.dispose()
    assert all(isinstance(o, Requeue) and isinstance(o.error, StoreUnavailable)
               for o, _ in outcomes)
    assert [m.redelivered for _, m in outcomes[:2]] == [False, True]
    assert {m.deliveries for _, m in outcomes} == {1}  # requeues do not count as failures
    assert drain(url, dlx) == []
    assert [e.kind for e in seen if e.kind in ("completed", "duplicate")] == ["completed"]


def test_outcomes_of_the_processor(db: tuple[sa.Engine, SqlStore]) -> None:
    """The decision table, on the processor alone: a handler error below the limit is
    republished with its failure count, at the limit dead-lettered; a quorum queue's
    x-delivery-count counts too; a store fault is requeued whatever the count."""
    _, store = db

    def fails(message: Message) -> None:
        raise RuntimeError("boom")

    p = Processor(fails, store, queue="q", max_deliveries=3, namespace="amqp.table", lease=5)

    def msg(headers: dict[str, Any]) -> Any:
        return lambda: p.message(json.dumps({"payment_id": "x"}).encode(), message_id="m-1",
                                 headers=headers, routing_key="q", exchange="",
                                 redelivered=False, content_type=None, properties=None)
    first = p.process(msg({}))
    assert isinstance(first, Republish) and first.headers == {FAILURES_HEADER: 1}
    assert isinstance(p.process(msg({FAILURES_HEADER: 1})), Republish)
    last = p.process(msg({FAILURES_HEADER: 2}))
    assert isinstance(last, DeadLetter) and last.headers[DELIVERIES_HEADER] == 3
    assert isinstance(p.process(msg({"x-delivery-count": 2})), DeadLetter)
    assert isinstance(p.outcome(StoreUnavailable("down"), None), Requeue)
    with pytest.raises(ValueError):
        Processor(fails, store, queue="q", max_deliveries=0)
    # a crash loop on a quorum queue: at max_redeliveries the handler does not run again
    ran: list[int] = []
    crashy = Processor(lambda m: ran.append(m.deliveries), store, queue="q",
                       max_redeliveries=4, namespace="amqp.crashy", lease=5)

    def counted(n: int) -> Any:
        return lambda: crashy.message(b"{}", message_id=f"c-{n}", headers={
            "x-delivery-count": n}, routing_key="q", exchange="", redelivered=True,
            content_type=None, properties=None)
    assert isinstance(crashy.process(counted(3)), Ack) and ran == [4]
    looped = crashy.process(counted(4))
    assert isinstance(looped, DeadLetter) and ran == [4]
    assert looped.headers[ERROR_TYPE_HEADER] == "TooManyDeliveries"
    assert looped.headers[DELIVERIES_HEADER] == 5


def test_consumer_timeout_redelivery_is_a_duplicate(db: tuple[sa.Engine, SqlStore],
                                                    queue: tuple[str, str, str],
                                                    rabbit: RabbitServer) -> None:  # noqa: F811
    """A handler slower than RabbitMQ's consumer_timeout: the broker closes the channel
    while the handler still runs; the handler's transaction commits, its ack is lost with
    the channel, the consumer reconnects, and the redelivery is acked as a duplicate without
    running: one ledger row, one run."""
    engine, store = db
    url, q, dlx = queue
    runs: list[bool] = []
    timed_out = "delivery acknowledgement on channel"
    before = rabbit.log_text().count(timed_out)

    def slow(message: Message, *, connection: sa.Connection) -> Any:
        runs.append(message.redelivered)
        out = apply_payment(message, connection=connection)
        # hold the first run until the broker has given up on its ack
        wait_until(lambda: rabbit.log_text().count(timed_out) > before, 60,
                   "the broker closed the channel (consumer_timeout)")
        return out

    events: list[str] = []
    rabbit.set_env("consumer_timeout", "1500")  # for channels opened from now on
    try:
        publish(url, q, [(payments(1)[0], {"message_id": "slow-1"})])
        consumer = Consumer(slow, store, queue=q, dead_letter_exchange=dlx,
                            namespace="amqp.slow", reconnect_delay=0.1)
        with listening(lambda e: events.append(e.kind)), running(consumer, url):
            wait_until(lambda: events.count("duplicate") == 1, 60, "redelivery acked",
                       lambda: str(events))
            wait_until(lambda: ready_count(url, q) == 0, 30, "queue empty")
    finally:
        rabbit.set_env("consumer_timeout", "1800000")  # RabbitMQ's default, 30 min
    assert rows(engine) == Counter({"pay-00000": 1})
    assert runs == [False]  # the redelivery did not run the handler
    assert events.count("completed") == 1 and events.count("duplicate") == 1


def test_prefetch_and_manual_acks_by_default(db: tuple[sa.Engine, SqlStore],
                                             queue: tuple[str, str, str]) -> None:
    """While the handler holds its first message, the broker has handed out exactly 10
    (prefetch 10) and keeps the other 20 ready: acks are manual, one per processed message."""
    engine, store = db
    url, q, _ = queue
    publish(url, q, [(p, {"message_id": p["payment_id"]}) for p in payments(30)])
    release = threading.Event()

    def held(message: Message, *, connection: sa.Connection) -> Any:
        assert release.wait(60), "never released"
        return apply_payment(message, connection=connection)

    consumer = Consumer(held, store, queue=q, namespace="amqp.prefetch")
    with running(consumer, url):
        try:
            wait_until(lambda: ready_count(url, q) == 20, 30, "10 messages handed out")
        finally:
            release.set()
        wait_until(lambda: len(rows(engine)) == 30 and ready_count(url, q) == 0, 60,
                   "all applied")
    assert rows(engine) == Counter({p["payment_id"]: 1 for p in payments(30)})


def test_lease_mode_handler_runs_once_per_key(db: tuple[sa.Engine, SqlStore],
                                              queue: tuple[str, str, str]) -> None:
    """A handler without session/connection runs in lease mode on the same SqlStore: its
    external effect (a provider call keyed by current_key()) happens once per payment,
    duplicates are acked with the stored result."""
    engine, store = db
    url, q, dlx = queue
    calls: Counter[str] = Counter()

    def charge(message: Message) -> dict[str, Any]:
        calls[current_key() or "?"] += 1
        return {"charged": message.body["payment_id"]}

    pays = payments(40)
    publish(url, q, [(p, {"message_id": p["payment_id"]}) for p in pays + pays])
    events: Counter[str] = Counter()
    with listening(lambda e: events.update([e.kind])):
        consumer = Consumer(charge, store, queue=q, dead_letter_exchange=dlx, lease=10,
                            namespace="amqp.charge")
        with running(consumer, url):
            wait_until(lambda: events["completed"] + events["duplicate"] == 80, 60,
                       "every delivery handled", lambda: str(events))
            wait_until(lambda: ready_count(url, q) == 0, 30, "queue empty")
    assert calls == Counter({p["payment_id"]: 1 for p in pays})
    assert events["duplicate"] == 40
    assert record_count(engine) == 40


def test_hostile_input(db: tuple[sa.Engine, SqlStore]) -> None:
    """A message id with a NUL, JSON nested 100,000 deep, a body that is a list, a header
    count that is not a number: each a typed error and a dead letter, nothing recorded. Two
    1,000-character message ids that differ in their last character are two keys (hashed,
    not truncated)."""
    engine, store = db

    def apply(message: Message, *, connection: sa.Connection) -> Any:
        return apply_payment(message, connection=connection)

    by_id = Processor(apply, store, queue="q", namespace="amqp.hostile")
    by_field = Processor(apply, store, queue="q", key="payment_id", namespace="amqp.hostile2")

    def deliver(p: Processor, raw: bytes, message_id: str | None = "m",
                headers: dict[str, Any] | None = None) -> Any:
        return p.process(lambda: p.message(
            raw, message_id=message_id, headers=headers, routing_key="q", exchange="",
            redelivered=False, content_type=None, properties=None))

    body = json.dumps({"payment_id": "pay-h", "cents": 1}).encode()
    cases = {
        "InvalidIdempotencyKey": deliver(by_id, body, message_id="a\x00b"),
        "UndecodableMessage": deliver(by_id, b"[" * 100_000 + b"]" * 100_000),
        "MissingIdempotencyKey": deliver(by_field, b'[{"payment_id": "pay-h"}]'),
    }
    for name, outcome in cases.items():
        assert isinstance(outcome, DeadLetter), (name, outcome)
        assert outcome.headers[ERROR_TYPE_HEADER] == name
    assert record_count(engine) == 0 and rows(engine) == Counter()
    # a header count that is not a number counts as none: the first delivery
    odd = by_field.message(body, message_id=None, headers={FAILURES_HEADER: "lots"},
                           routing_key="q", exchange="", redelivered=True, content_type=None,
                           properties=None)
    assert odd.deliveries == 1
    long_a, long_b = "x" * 999 + "a", "x" * 999 + "b"
    for mid in (long_a, long_b, long_a):
        assert not isinstance(deliver(by_id, json.dumps(
            {"payment_id": mid[-1], "cents": 2}).encode(), message_id=mid), DeadLetter)
    assert rows(engine) == Counter({"a": 1, "b": 1})
    with engine.connect() as c:
        keys = c.execute(sa.text("SELECT key FROM idempotency_records")).scalars().all()
    assert len(keys) == 2 and all(k.startswith("sha256:") for k in keys)
