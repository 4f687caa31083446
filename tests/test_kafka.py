"""The Kafka integration against librdkafka's mock cluster and a real PostgreSQL: positions
committed with the effects, resumption from the database, business-key dedup, rebalances,
poison messages and bad input."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from _kafka import PARTITIONS, MockKafka
from _kafka_payments import apply_batch, ledger, ledger_figures, metadata, payments
from idempotent.integrations.kafka import (
    InvalidPosition,
    TransactionalConsumer,
    UndecodableMessage,
    header,
)

from idempotent import MissingIdempotencyKey, SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def kafka() -> Iterator[MockKafka]:
    with MockKafka() as cluster:
        yield cluster


@pytest.fixture
def store(pg_url: str) -> Iterator[SqlStore]:
    s = SqlStore(pg_url)
    s.create_schema()
    metadata.create_all(s.engine)
    yield s
    s.engine.dispose()


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"pay-{tag}", f"group-{tag}"


def at_end(c: TransactionalConsumer, topic: str, ends: dict[int, int]) -> bool:
    """Every partition's stored position is its end offset."""
    return all((c.position(topic, p) or (None,))[0] == ends[p] for p in range(PARTITIONS))


def drain(consumers: list[TransactionalConsumer], kafka: MockKafka, topic: str,
          deadline: float = 60.0) -> None:
    """Poll every consumer in turn until each partition's stored position is its end."""
    ends = kafka.end_offsets(topic)
    stop = time.monotonic() + deadline
    while not at_end(consumers[0], topic, ends):
        assert time.monotonic() < stop, "positions never reached the end offsets"
        for c in consumers:
            c.poll_batch(0.05)


def consume_all(kafka: MockKafka, store: SqlStore, topic: str, group: str,
                **kw: Any) -> TransactionalConsumer:
    """A consumer (`consumer`) run until every position is at its end, then closed."""
    c = consumer(kafka, store, topic, group, **kw)
    try:
        drain([c], kafka, topic)
    finally:
        c.close()
    return c


def consumer(kafka: MockKafka, store: SqlStore, topic: str, group: str, worker: str = "t",
             **kw: Any) -> TransactionalConsumer:
    conf = kafka.consumer_config(group, **kw.pop("conf", {}))
    kw.setdefault("decode", json.loads)
    return TransactionalConsumer(conf, store, [topic], apply_batch(worker), **kw)


def test_business_key_dedup_and_exact_positions(kafka: MockKafka, store: SqlStore) -> None:
    """2,000 payments sent 1-3 times: one ledger row each, the amounts exact, every stored
    position at its partition's end, Kafka's committed offsets written after."""
    topic, group = names()
    msgs, amounts = payments(2000, copies=(1, 3))
    kafka.produce(topic, msgs)
    c = consume_all(kafka, store, topic, group, key=header("payment-id"))
    assert ledger_figures(store.engine) == (2000, 2000, sum(amounts.values()))
    assert len(msgs) > 3000
    ends = kafka.end_offsets(topic)
    assert {p: c.position(topic, p)[0] for p in ends} == ends  # type: ignore[index]
    assert kafka.committed(group, topic) == ends  # written after, for monitoring


def test_resumes_from_the_database_not_kafkas_committed_offsets(
        kafka: MockKafka, store: SqlStore) -> None:
    """Kafka's committed offsets rewritten to disagree (partition 0 back at 0, the others
    past messages never applied): a new consumer seeks to the database positions, so
    nothing is applied twice and nothing is skipped."""
    topic, group = names()
    first, amounts = payments(400, prefix="a")
    kafka.produce(topic, first)
    c = consume_all(kafka, store, topic, group)
    stored = {p: c.position(topic, p) for p in range(PARTITIONS)}
    assert kafka.committed(group, topic) == {p: stored[p][0] for p in range(PARTITIONS)}
    more, more_amounts = payments(400, prefix="b", seed=8)
    kafka.produce(topic, more)
    ends = kafka.end_offsets(topic)
    lie = {0: 0, **{p: ends[p] for p in range(1, PARTITIONS)}}
    kafka.commit_offsets(group, topic, lie)
    assert kafka.committed(group, topic) == lie
    c = consume_all(kafka, store, topic, group, worker="second")
    amounts.update(more_amounts)
    assert ledger_figures(store.engine) == (800, 800, sum(amounts.values()))
    with store.engine.connect() as conn:  # the second consumer applied exactly the new ones
        second = set(conn.execute(sa.select(ledger.c.payment_id)
                                  .where(ledger.c.worker == "second")).scalars())
    assert second == set(more_amounts)
    # every assignment took a new generation
    assert all(c.position(topic, p)[1] > stored[p][1] for p in range(PARTITIONS))


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_rebalances(kafka: MockKafka, store: SqlStore, strategy: str) -> None:
    """A second member joins mid-stream and the first leaves (eager and cooperative
    assignors): each payment applied once, positions at the end, both consumers wrote."""
    topic, group = names()
    msgs, amounts = payments(3000, copies=(1, 2))
    half = len(msgs) // 2
    kafka.produce(topic, msgs[:half])
    conf = {"partition.assignment.strategy": strategy}
    a = consumer(kafka, store, topic, group, worker="a", batch_size=50, conf=conf,
                 key=header("payment-id"))
    b = None
    try:
        while ledger_figures(store.engine)[0] < 200:
            a.poll_batch(0.05)
        b = consumer(kafka, store, topic, group, worker="b", batch_size=50, conf=conf,
                     key=header("payment-id"))
        deadline = time.monotonic() + 30
        while len(b.owned) == 0 or len(a.owned) == PARTITIONS:  # the group rebalanced
            assert time.monotonic() < deadline, "the second member never got partitions"
            a.poll_batch(0.02)
            b.poll_batch(0.02)
        kafka.produce(topic, msgs[half:])
        for _ in range(5):
            a.poll_batch(0.02)
            b.poll_batch(0.02)
        a.close()
        a = None
        drain([b], kafka, topic)
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
    assert ledger_figures(store.engine) == (3000, 3000, sum(amounts.values()))
    with store.engine.connect() as conn:
        workers = set(conn.execute(sa.select(ledger.c.worker).distinct()).scalars())
    assert workers == {"a", "b"}


def test_poison_message_is_dead_lettered_after_n_attempts(
        kafka: MockKafka, store: SqlStore) -> None:
    """One poison payment among 1,000: the good ones apply once, the poison one runs
    ``max_attempts`` times, lands in the dead-letter topic with its error, and the
    partition's position moves past it."""
    topic, group = names()
    msgs, amounts = payments(1000)
    poison = {"value": json.dumps({"payment_id": "bad", "cents": 1}).encode(),
              "headers": [("payment-id", b"bad")], "partition": 2}
    msgs.insert(500, poison)
    kafka.produce(topic, msgs)
    runs = []
    inner = apply_batch("t")

    def apply(messages: list[Any], connection: sa.Connection) -> None:
        if any(m.value["payment_id"] == "bad" for m in messages):
            runs.append(len(messages))
            raise ValueError("account closed")
        inner(messages, connection)

    c = TransactionalConsumer(kafka.consumer_config(group), store, [topic], apply,
                              key=header("payment-id"), decode=json.loads, max_attempts=3,
                              dead_letter_topic=f"{topic}.dlq")
    try:
        drain([c], kafka, topic)
    finally:
        c.close()
    assert ledger_figures(store.engine) == (1000, 1000, sum(amounts.values()))
    assert runs[-3:] == [1, 1, 1] and len(runs) in (3, 4)  # 3 attempts alone (+ its batch)
    assert c.dead_lettered == 1
    [dead] = kafka.read_all(f"{topic}.dlq", 1)
    h = dict(dead.headers())
    assert h["idempotent-error"] == b"ValueError: account closed"
    assert h["idempotent-error-type"] == b"builtins.ValueError"
    assert h["idempotent-attempts"] == b"3"
    assert (h["idempotent-topic"], h["idempotent-partition"]) == (topic.encode(), b"2")
    assert dead.value() == poison["value"] and h["payment-id"] == b"bad"
    assert store.get(c.namespace, "bad") is None  # its key was never recorded as done


def test_bad_input_is_dead_lettered_at_once(kafka: MockKafka, store: SqlStore) -> None:
    """A message without the key header and one whose bytes are not JSON: dead-lettered
    on the first attempt with `MissingIdempotencyKey` / `UndecodableMessage`, nothing
    recorded for them; the good messages around them apply once."""
    topic, group = names()
    msgs, amounts = payments(50)
    msgs[10:10] = [{"value": b'{"payment_id": "nokey", "cents": 5}', "partition": 1},
                   {"value": b"\xff\xfe not json", "headers": [("payment-id", b"raw")],
                    "partition": 1}]
    kafka.produce(topic, msgs)
    c = consume_all(kafka, store, topic, group, key=header("payment-id"),
                 dead_letter_topic=f"{topic}.dlq")
    assert ledger_figures(store.engine) == (50, 50, sum(amounts.values()))
    dead = {dict(m.headers())["idempotent-error-type"]: dict(m.headers())
            for m in kafka.read_all(f"{topic}.dlq", 2)}
    missing = f"{MissingIdempotencyKey.__module__}.MissingIdempotencyKey".encode()
    undecodable = f"{UndecodableMessage.__module__}.UndecodableMessage".encode()
    assert set(dead) == {missing, undecodable}
    assert dead[missing]["idempotent-attempts"] == b"1"
    assert dead[undecodable]["idempotent-attempts"] == b"1"
    where = b"[1]@" + dead[undecodable]["idempotent-offset"]
    assert where + b": decode failed: UnicodeDecodeError" in dead[undecodable]["idempotent-error"]
    assert store.get(c.namespace, "raw") is None


def test_bad_input_without_dead_letter_topic_stops_and_moves_nothing(
        kafka: MockKafka, store: SqlStore) -> None:
    """Without a dead-letter topic, an undecodable message raises its typed error and its
    partition stays before it (the message comes back after a restart)."""
    topic, group = names()
    kafka.produce(topic, [{"value": b'{"payment_id": "ok", "cents": 1}', "partition": 0},
                          {"value": b"not json", "partition": 0}])
    c = consumer(kafka, store, topic, group)
    try:
        with pytest.raises(UndecodableMessage) as err:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                c.poll_batch(0.1)
        assert (err.value.topic, err.value.partition, err.value.offset) == (topic, 0, 1)
        assert c.position(topic, 0)[0] == 1  # the good message before it committed
    finally:
        c.close()
    assert ledger_figures(store.engine)[0] == 1


@pytest.mark.parametrize("stored", [-5, 10**9])
def test_out_of_range_stored_offset_is_a_typed_error(
        kafka: MockKafka, store: SqlStore, stored: int) -> None:
    """A negative or past-the-end stored position: `InvalidPosition` with the partition's
    offsets, nothing consumed, the row untouched."""
    topic, group = names()
    msgs, _ = payments(20)
    kafka.produce(topic, msgs)
    c = consume_all(kafka, store, topic, group)
    with store.engine.begin() as conn:
        conn.execute(store.positions.update().where(store.positions.c.partition == 3)
                     .values(next_offset=stored))
    before = c.position(topic, 3)
    rows = ledger_figures(store.engine)
    c = consumer(kafka, store, topic, group)
    try:
        with pytest.raises(InvalidPosition) as err:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                c.poll_batch(0.1)
    finally:
        c.close()
    e = err.value
    assert (e.topic, e.partition, e.offset) == (topic, 3, stored)
    assert e.low == 0 and e.high == kafka.end_offsets(topic)[3]
    assert c.position(topic, 3) == before
    assert ledger_figures(store.engine) == rows


def test_lease_consumer_redelivery_runs_no_effect_twice(
        kafka: MockKafka, store: SqlStore) -> None:
    """Lease mode: an ``@idempotent`` handler keyed by `offset_key`; after Kafka's offsets
    are rewound to 0 (a redelivery of everything) the body runs for none of them again,
    and a handler failing every time is dead-lettered after ``max_attempts``."""
    from idempotent.integrations.kafka import LeaseConsumer, offset_key

    from idempotent import idempotent

    topic, group = names()
    msgs, _ = payments(60)
    msgs.append({"value": b'{"payment_id": "boom", "cents": 1}', "partition": 0})
    kafka.produce(topic, msgs)
    effects: list[str] = []

    @idempotent(store, key=offset_key, lease=30, namespace=f"psp-{group}")
    def charge(message: Any) -> dict[str, int]:
        if message.value["payment_id"] == "boom":
            raise ConnectionRefusedError("provider down")
        effects.append(message.value["payment_id"])
        return {"cents": message.value["cents"]}

    ends = kafka.end_offsets(topic)

    def run_until_done() -> LeaseConsumer:
        c = LeaseConsumer(kafka.consumer_config(group), [topic], charge, decode=json.loads,
                          max_attempts=2, dead_letter_topic=f"{topic}.dlq")
        try:
            deadline = time.monotonic() + 30
            while {p: (c.owned.get((topic, p)) or [-1])[0] for p in ends} != ends:
                assert time.monotonic() < deadline, "the lease consumer never finished"
                c.poll_batch(0.05)
        finally:
            c.close()
        return c

    first = run_until_done()
    assert sorted(effects) == sorted(m["headers"][0][1].decode() for m in msgs[:-1])
    assert first.dead_lettered == 1
    assert kafka.committed(group, topic) == ends
    kafka.commit_offsets(group, topic, dict.fromkeys(ends, 0))
    run_until_done()
    assert len(effects) == 60  # every redelivered message replayed its stored result
    # the failure was released, not kept: the redelivery tried it again, dead-lettered again
    dead = kafka.read_all(f"{topic}.dlq", 2)
    assert [dict(d.headers())["idempotent-attempts"] for d in dead] == [b"2", b"2"]
    assert {dict(d.headers())["idempotent-error"] for d in dead} == {
        b"ConnectionRefusedError: provider down"}


def test_a_commit_whose_answer_was_lost_is_not_redone(
        kafka: MockKafka, store: SqlStore) -> None:
    """The batch committed but the consumer did not learn it (COMMIT's answer lost): the
    retry's fence fails, the stored row holds exactly the batch's end under this
    consumer's generation, so the batch counts as done; the retry's writes rolled back."""
    topic, group = names()
    msgs, amounts = payments(30)
    kafka.produce(topic, [dict(m, partition=0) for m in msgs])
    seen: list[list[Any]] = []
    inner = apply_batch("t")

    def apply(messages: list[Any], connection: sa.Connection) -> None:
        seen.append(messages)
        inner(messages, connection)

    c = TransactionalConsumer(kafka.consumer_config(group), store, [topic], apply,
                              decode=json.loads)
    try:
        drain([c], kafka, topic)
        batch = seen[-1]
        start = batch[0].offset
        c.owned[(topic, 0)][0] = start  # as if the last COMMIT's answer never came
        c._apply(batch)  # the retry of that batch
        assert c.owned[(topic, 0)][0] == 30 and len(seen[-1]) == len(batch)
    finally:
        c.close()
    assert ledger_figures(store.engine) == (30, 30, sum(amounts.values()))


def test_a_terminated_backend_is_retried_not_counted_as_an_attempt(
        kafka: MockKafka, store: SqlStore, pg_server: Any) -> None:
    """A handler whose transaction's backend is terminated mid-batch (pg_terminate_backend):
    the batch is retried whole, never counted as an attempt (``max_attempts=1``) and never
    dead-lettered; every payment applied once."""
    topic, group = names()
    msgs, amounts = payments(200)
    kafka.produce(topic, msgs)
    inner = apply_batch("t")
    kills: list[int] = []

    def apply(messages: list[Any], connection: sa.Connection) -> None:
        inner(messages, connection)
        if len(kills) < 3:  # three batches lose their connection after writing
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            kills.extend(pg_server.terminate_backends(pid=pid))
            connection.exec_driver_sql("SELECT 1")  # the dead connection fails here

    c = TransactionalConsumer(kafka.consumer_config(group), store, [topic], apply,
                              decode=json.loads, max_attempts=1,
                              dead_letter_topic=f"{topic}.dlq")
    try:
        drain([c], kafka, topic)
    finally:
        c.close()
    assert len(kills) == 3 and c.dead_lettered == 0
    assert ledger_figures(store.engine) == (200, 200, sum(amounts.values()))
