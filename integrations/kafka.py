"""Kafka consumers whose consumed position commits in the same transaction as their effects.

Kafka's own answer for exactly-once into a database ("storing offsets outside Kafka"):
keep the next offset of each (consumer group, topic, partition) in the database, advance
it in the transaction that writes the messages' effects, and seek to it when a partition
is assigned. This module does that for confluent-kafka::

    from idempotent.integrations.kafka import TransactionalConsumer, header

    def apply(messages, connection):          # one transaction per batch
        connection.execute(insert(ledger), [row(m.value) for m in messages])

    consumer = TransactionalConsumer(
        {"bootstrap.servers": "...", "group.id": "payments"}, store, ["payments"], apply,
        key=header("payment-id"), decode=json.loads, dead_letter_topic="payments.dlq")
    consumer.run()

Per batch (up to ``batch_size`` messages or ``batch_timeout`` seconds), in one database
transaction: the business keys of the batch are recorded with `SqlStore.record_many` (one
statement; a producer's duplicate at a new offset is dropped before the handler sees it),
the handler runs with the transaction's ``connection``, and each partition's stored
position moves from the offset the batch started at to the one after its last message
with a conditional UPDATE that also names the **generation** this consumer got when the
partition was assigned. Every assignment bumps the generation, so a consumer whose
partition moved on (a zombie: stalled past its session timeout) matches no row: its
transaction rolls back, nothing of its batch is written, and it gets `PositionFenced`.
Kafka's own committed offsets are written after the database commit, asynchronously, for
lag monitoring only; they are never read back over the database's.

`LeaseConsumer` is for handlers whose effects leave the database (an HTTP call): the
handler is an ``@idempotent`` lease-mode function keyed by `offset_key` or a business
key, and the consumer commits Kafka offsets after it returned.

Both consumers: a handler that fails ``max_attempts`` times on one message, or a message
that cannot be decoded or has no key (bad input: no retry), goes to ``dead_letter_topic``
with the error in its headers, and the partition moves on; without a dead-letter topic
the error is raised and nothing moves (the message is delivered again after a restart).
Transient database faults (a dropped connection, a deadlock) retry the batch and never
count as attempts.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import tenacity

from idempotent import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    InvalidIdempotencyKey,
    LeaseLost,
    MissingIdempotencyKey,
    SqlStore,
    StoreUnavailable,
    is_transient,
)
from idempotent import keys as _keys
from idempotent.stores import DEFAULT_TTL

try:
    import confluent_kafka
    from confluent_kafka import KafkaError, KafkaException, TopicPartition
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "idempotent.integrations.kafka needs confluent-kafka: pip install 'idempotent-py[kafka]'"
    ) from exc

__all__ = [
    "OUTBOX_ID_HEADER",
    "InvalidPosition",
    "KafkaPublisher",
    "LeaseConsumer",
    "Message",
    "PositionFenced",
    "TransactionalConsumer",
    "UndecodableMessage",
    "each",
    "header",
    "message_key",
    "offset_key",
]

_LOG = logging.getLogger("idempotent.kafka")

#: Headers a dead-lettered message carries besides its own.
DLQ_HEADERS = ("idempotent-error", "idempotent-error-type", "idempotent-attempts",
               "idempotent-group", "idempotent-topic", "idempotent-partition",
               "idempotent-offset")


# -- errors -------------------------------------------------------------------------------
class PositionFenced(IdempotencyError):
    """This consumer's partition was assigned to another consumer (a newer generation)
    after this batch was read: its transaction was rolled back, nothing of the batch was
    written. Close this consumer; the new owner processes the messages.

    ``found`` is the stored ``(next_offset, generation)`` (None: no row), ``generation``
    and ``start`` what this consumer expected."""

    def __init__(self, message: str, *, group: str | None = None, topic: str | None = None,
                 partition: int | None = None, generation: int | None = None,
                 start: int | None = None, found: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.group, self.topic, self.partition = group, topic, partition
        self.generation, self.start, self.found = generation, start, found


class InvalidPosition(IdempotencyError, ValueError):
    """A stored position is negative, or outside the partition's offsets (``low`` ..
    ``high``: the log was truncated past it, or the topic recreated). Nothing is consumed
    from that partition; fix or delete the row (``idempotency_positions``)."""

    def __init__(self, message: str, *, group: str | None = None, topic: str | None = None,
                 partition: int | None = None, offset: int | None = None,
                 low: int | None = None, high: int | None = None) -> None:
        super().__init__(message)
        self.group, self.topic, self.partition = group, topic, partition
        self.offset, self.low, self.high = offset, low, high


class UndecodableMessage(IdempotencyError, ValueError):
    """``decode`` failed on a message's value (``__cause__`` says why): bad input, sent to
    the dead-letter topic at once, never recorded as done."""

    def __init__(self, message: str, *, topic: str | None = None,
                 partition: int | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.topic, self.partition, self.offset = topic, partition, offset


#: Bad input: a new attempt cannot cure it, the message is dead-lettered at once.
_BAD_INPUT = (UndecodableMessage, MissingIdempotencyKey, InvalidIdempotencyKey,
              IdempotencyKeyConflict)
#: Not the message's fault: retried (the store policy), never counted as an attempt.
_NOT_THE_MESSAGE = (AlreadyInProgress, LeaseLost, StoreUnavailable)


# -- messages and keys --------------------------------------------------------------------
@dataclass(slots=True)
class Message:
    """One consumed message: its coordinates, raw key, value (decoded by ``decode=``;
    the bytes without it), headers and the value's bytes as received."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    headers: tuple[tuple[str, bytes | None], ...]
    raw_value: bytes | None

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (None when absent)."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found


KeyFunction = Callable[[Message], Any]


def _text(raw: bytes | None, what: str, m: Message) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UndecodableMessage(
            f"{m.topic}[{m.partition}]@{m.offset}: the {what} is not UTF-8 text",
            topic=m.topic, partition=m.partition, offset=m.offset) from None


def header(name: str) -> KeyFunction:
    """A key function: the UTF-8 text of header ``name``."""
    def key(m: Message) -> str | None:
        return _text(m.header(name), f"header {name!r}", m)
    key.__qualname__ = f"header({name!r})"
    return key


def message_key(m: Message) -> str | None:
    """A key function: the message key, as UTF-8 text."""
    return _text(m.key, "message key", m)


def offset_key(m: Message) -> str:
    """``topic/partition/offset``: the key of one delivery position (lease mode), the same
    on every redelivery of that message."""
    return f"{m.topic}/{m.partition}/{m.offset}"


def each(fn: Callable[[Message, sa.Connection], Any]) -> Callable[[list[Message], sa.Connection],
                                                                  None]:
    """A batch handler that calls ``fn(message, connection)`` for each message, in order,
    in the batch's one transaction."""
    def batch(messages: list[Message], connection: sa.Connection) -> None:
        for m in messages:
            fn(m, connection)
    batch.__qualname__ = getattr(fn, "__qualname__", "each")
    batch.__module__ = getattr(fn, "__module__", __name__)
    return batch


def _not_the_message(exc: BaseException) -> bool:
    """A fault a new attempt may cure and that no message caused: a transient database
    error (SQLAlchemy's: a dropped connection, a deadlock, a lock timeout), another worker
    holding the key, a lost lease, a store that gave up."""
    if isinstance(exc, _NOT_THE_MESSAGE):
        return True
    return isinstance(exc, sa.exc.SQLAlchemyError) and is_transient(exc)


def _default_retry() -> tenacity.Retrying:
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(_not_the_message),
        wait=tenacity.wait_exponential(multiplier=0.05, max=2.0) + tenacity.wait_random(0, 0.05),
        stop=tenacity.stop_after_delay(60), reraise=True)


# -- the loop both consumers share ----------------------------------------------------------
class _Loop:
    """Consume, hand batches to the strategy (`_apply`), dead-letter poison messages."""

    def __init__(self, config: Mapping[str, Any], topics: Sequence[str], *,
                 decode: Callable[[bytes | None], Any] | None, batch_size: int,
                 batch_timeout: float, max_attempts: int, dead_letter_topic: str | None,
                 producer_config: Mapping[str, Any] | None,
                 retry: tenacity.Retrying | None) -> None:
        conf = dict(config)
        group = conf.get("group.id")
        if not group:
            raise ValueError("the consumer config needs a group.id")
        for name in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(conf.get(name, False)).lower() in ("true", "1"):
                raise ValueError(f"{name} must be off: offsets are committed after the "
                                 "messages' effects, by the consumer")
            conf[name] = False
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be at least 1")
        self.group = str(group)
        self.topics = list(topics)
        self.decode = decode
        self.batch_size, self.batch_timeout = batch_size, batch_timeout
        self.max_attempts = max_attempts
        self.dead_letter_topic = dead_letter_topic
        self.retry = retry if retry is not None else _default_retry()
        self.cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        reset = str(conf.get("auto.offset.reset", "latest")).lower()
        self.from_start = reset in ("earliest", "smallest", "beginning")
        self._producer_conf = dict(producer_config or {
            k: v for k, v in conf.items()
            if k in ("bootstrap.servers", "security.protocol", "client.id")
            or k.startswith(("sasl.", "ssl."))})
        self._producer: confluent_kafka.Producer | None = None
        #: (topic, partition) -> [next offset, generation] while this consumer owns it
        self.owned: dict[tuple[str, int], list[int]] = {}
        self.attempts: dict[tuple[str, int, int], int] = {}
        self.dead_lettered = 0
        self._pending: Exception | None = None
        self.consumer = confluent_kafka.Consumer(conf)
        self.consumer.subscribe(self.topics, on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)

    # rebalance callbacks run inside consume(); an exception there reaches its caller
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            placed = self._positions_for(partitions) if partitions else []
        except Exception as exc:  # raised from poll_batch, after consume() returned
            self._pending = exc
            placed = []
        if self.cooperative:
            consumer.incremental_assign(placed)
        else:
            consumer.assign(placed)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # between batches: the batch in flight committed (or rolled back) before consume()
        for tp in partitions:
            self.owned.pop((tp.topic, tp.partition), None)

    def _positions_for(self, partitions: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _apply(self, batch: list[Message]) -> None:
        raise NotImplementedError

    def _skip(self, m: Message) -> None:
        """Move the partition past ``m`` (after it was dead-lettered)."""
        raise NotImplementedError

    # -- one batch ---------------------------------------------------------------------------
    def poll_batch(self, timeout: float | None = None) -> int:
        """Consume up to ``batch_size`` messages (waiting at most ``timeout``, default
        ``batch_timeout`` seconds) and process them; returns how many were consumed."""
        raw: list[Any] = self.consumer.consume(
            self.batch_size, self.batch_timeout if timeout is None else timeout)
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        batch: list[Message] = []
        for m in raw:
            err = m.error()
            if err is not None:  # an event, not a message: librdkafka retries what it can
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    _LOG.warning("consumer %s: %s", self.group, err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            owned = self.owned.get((topic, partition))
            # a message of a partition given up in this consume(), or one already applied
            if owned is None or offset < owned[0]:
                continue
            value = m.value()
            batch.append(Message(topic, partition, offset, m.key(), value,
                                 tuple(m.headers() or ()), value))
        if batch:
            self._process(batch)
        return len(raw)

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Process batches until ``stop()`` is true (checked between batches)."""
        while not stop():
            self.poll_batch()

    def _decoded(self, m: Message) -> Message:
        """``m`` with ``value`` decoded from ``raw_value`` (`UndecodableMessage`)."""
        if self.decode is not None:
            try:
                m.value = self.decode(m.raw_value)
            except Exception as exc:
                raise UndecodableMessage(
                    f"{m.topic}[{m.partition}]@{m.offset}: decode failed: "
                    f"{type(exc).__name__}: {exc}",
                    topic=m.topic, partition=m.partition, offset=m.offset) from exc
        return m

    def _process(self, batch: list[Message]) -> None:
        try:
            self._retried(self._apply, [self._decoded(m) for m in batch])
            return
        except (PositionFenced, StoreUnavailable):
            raise
        except Exception as exc:
            if len(batch) == 1:
                self._one(batch[0], exc)
                return
        for m in batch:  # find the poison: one message per transaction, in order
            self._one(m, None)

    def _one(self, m: Message, failed: Exception | None) -> None:
        """Apply one message, up to ``max_attempts`` times; then dead-letter it."""
        coords = (m.topic, m.partition, m.offset)
        owned = self.owned.get((m.topic, m.partition))
        if owned is None or m.offset < owned[0]:
            return  # given up or applied meanwhile
        while True:
            if failed is None:
                try:
                    self._retried(self._apply, [self._decoded(m)])
                    self.attempts.pop(coords, None)
                    return
                except (PositionFenced, StoreUnavailable):
                    raise
                except Exception as exc:
                    failed = exc
            n = self.attempts[coords] = self.attempts.get(coords, 0) + 1
            if isinstance(failed, _BAD_INPUT) or n >= self.max_attempts:
                break
            _LOG.warning("%s[%d]@%d failed (attempt %d of %d): %r", *coords, n,
                         self.max_attempts, failed)
            failed = None
        if self.dead_letter_topic is None:
            raise failed
        self._dead_letter(m, failed, n)
        self.attempts.pop(coords, None)
        self._retried(self._skip, m)
        self.dead_lettered += 1

    def _retried(self, fn: Callable[[Any], None], arg: Any) -> None:
        """``fn(arg)`` under the retry policy; a fault that is not the message's, when the
        policy gives up, becomes `StoreUnavailable` (nothing moves, nothing is dead-lettered)."""
        try:
            for attempt in self.retry:
                with attempt:
                    fn(arg)
        except tenacity.RetryError as exc:  # a policy without reraise=True
            last = exc.last_attempt.exception()
            raise StoreUnavailable(f"gave up on {self.group}: {last!r}", cause=last) from last
        except Exception as exc:
            if _not_the_message(exc) and not isinstance(exc, StoreUnavailable):
                raise StoreUnavailable(f"gave up on {self.group}: {exc!r}",
                                       cause=exc) from exc
            raise

    def _dead_letter(self, m: Message, exc: BaseException, attempts: int) -> None:
        """Publish ``m`` (its raw value, key and headers) to the dead-letter topic, its error
        in the headers, and wait for the broker's acknowledgement (a failure raises: the
        partition does not move)."""
        if self._producer is None:
            self._producer = confluent_kafka.Producer({"acks": "all", **self._producer_conf})
        outcome: list[Any] = []
        headers: list[tuple[str, str | bytes | None]] = [
            *m.headers,
            ("idempotent-error", f"{type(exc).__name__}: {exc}"[:4000].encode()),
            ("idempotent-error-type", f"{type(exc).__module__}.{type(exc).__qualname__}"
             .encode()),
            ("idempotent-attempts", str(attempts).encode()),
            ("idempotent-group", self.group.encode()),
            ("idempotent-topic", m.topic.encode()),
            ("idempotent-partition", str(m.partition).encode()),
            ("idempotent-offset", str(m.offset).encode()),
        ]
        assert self.dead_letter_topic is not None
        self._producer.produce(self.dead_letter_topic, value=m.raw_value, key=m.key,
                               headers=headers, on_delivery=lambda e, _m: outcome.append(e))
        deadline = time.monotonic() + 30
        while not outcome and time.monotonic() < deadline:
            self._producer.flush(1.0)
        if not outcome or outcome[0] is not None:
            raise KafkaException(outcome[0] if outcome else KafkaError(KafkaError._TIMED_OUT))
        _LOG.error("%s[%d]@%d dead-lettered to %s after %d attempt(s): %r", m.topic,
                   m.partition, m.offset, self.dead_letter_topic, attempts, exc)

    def close(self) -> None:
        """Leave the group and close the Kafka clients."""
        self.consumer.close()
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None

    def __enter__(self) -> _Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watermarks(self, tp: Any) -> tuple[int, int]:
        low, high = self.consumer.get_watermark_offsets(
            TopicPartition(tp.topic, tp.partition), timeout=10, cached=False)
        return int(low), int(high)


# -- transactional: positions in the database -----------------------------------------------
class _PositionsSql:
    """The statements on the positions table (`idempotent.stores.SqlStore.positions`)."""

    def __init__(self, store: SqlStore, group: str) -> None:
        t = store.positions
        self.group = _keys.fit(group)
        dialect = store.engine.dialect.name
        insert: Any
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            raise TypeError(f"the Kafka positions need PostgreSQL or SQLite, not {dialect}")
        P = sa.bindparam
        pk = ((t.c.consumer_group == P("g_group")) & (t.c.topic == P("g_topic"))
              & (t.c.partition == P("g_partition")))
        # a partition never seen: its row, at the start Kafka gives (committed/reset)
        self.create = insert(t).values(
            consumer_group=P("g_group"), topic=P("g_topic"), partition=P("g_partition"),
            next_offset=P("g_start"), generation=0, updated_at=P("g_now"),
        ).on_conflict_do_nothing()
        # assignment: a new generation fences every earlier owner of the partition
        self.take = sa.update(t).where(pk).values(
            generation=t.c.generation + 1, updated_at=P("g_now"),
        ).returning(t.c.next_offset, t.c.generation)
        # the fence: only the owner of this generation, from the offset its batch began at
        self.advance = sa.update(t).where(
            pk & (t.c.generation == P("g_gen")) & (t.c.next_offset == P("g_from"))
        ).values(next_offset=P("g_to"), updated_at=P("g_now"))
        self.read = sa.select(t.c.next_offset, t.c.generation).where(pk)
        self.pg = dialect == "postgresql"
        # PostgreSQL: the fence of every partition of a batch in one statement, an UPDATE
        # joined to the arrays of (topic, partition, generation, from, to); its row count
        # says how many partitions matched. One fixed text, prepared once by the driver.
        q = store.engine.dialect.identifier_preparer
        table, part = q.format_table(t), q.quote("partition")
        self.advance_all = sa.text(
            f"UPDATE {table} SET next_offset = v.dst, updated_at = :g_now "
            "FROM unnest(CAST(:v_topic AS text[]), CAST(:v_part AS integer[]), "
            "CAST(:v_gen AS bigint[]), CAST(:v_from AS bigint[]), CAST(:v_to AS bigint[])) "
            "AS v(topic, part, gen, src, dst) "
            f"WHERE {table}.consumer_group = :g_group AND {table}.topic = v.topic "
            f"AND {table}.{part} = v.part AND {table}.generation = v.gen "
            f"AND {table}.next_offset = v.src")

    def params(self, topic: str, partition: int, **more: Any) -> dict[str, Any]:
        return {"g_group": self.group, "g_topic": topic, "g_partition": partition,
                "g_now": time.time(), **more}


class TransactionalConsumer(_Loop):
    """A consumer group member whose batches commit with their positions (see the module).

    * ``config``: the confluent-kafka consumer config (``group.id`` required; auto-commit
      and auto offset store are turned off; ``auto.offset.reset`` picks the start of a
      partition with no stored position and no Kafka committed offset).
    * ``store``: a `SqlStore` (PostgreSQL or SQLite, sync engine) whose database holds the
      handler's tables; ``create_schema()`` or ``idempotent db upgrade`` makes the
      positions table.
    * ``handler(messages, connection)``: the batch's writes, on the transaction's
      connection; it must not commit. `each` adapts a per-message handler.
    * ``key``: business-key dedup (`header`, `message_key`, or a callable over a
      `Message`): messages whose key was recorded before (in ``namespace``, for ``ttl``
      seconds) are dropped before the handler; None: positions only.
    * ``decode``: bytes -> value (``json.loads``); its failure is bad input.
    * ``batch_size``, ``batch_timeout``: up to N messages or T seconds per transaction.
    * ``max_attempts``, ``dead_letter_topic``: poison handling (see the module).
    * ``retry``: the tenacity policy for transient database faults (default: exponential
      backoff up to 60 s, then `StoreUnavailable`).
    * ``lag_commit_interval``: seconds between Kafka offset commits (lag monitoring only;
      also on revoke and close).
    """

    def __init__(self, config: Mapping[str, Any], store: SqlStore, topics: Sequence[str],
                 handler: Callable[[list[Message], sa.Connection], Any], *,
                 key: KeyFunction | None = None, namespace: str | None = None,
                 ttl: float = DEFAULT_TTL, decode: Callable[[bytes | None], Any] | None = None,
                 batch_size: int = 500, batch_timeout: float = 0.1, max_attempts: int = 3,
                 dead_letter_topic: str | None = None,
                 producer_config: Mapping[str, Any] | None = None,
                 retry: tenacity.Retrying | None = None,
                 lag_commit_interval: float = 1.0) -> None:
        if not isinstance(store, SqlStore) or store.is_async:
            raise TypeError("TransactionalConsumer needs a SqlStore with a sync engine")
        self.store, self.handler, self.key, self.ttl = store, handler, key, ttl
        name = namespace or f"{handler.__module__}.{handler.__qualname__}"
        _keys.check_text("namespace", name)
        self.namespace = name
        _keys.check_text("consumer group", str(config.get("group.id", "")))
        self.sql = _PositionsSql(store, str(config.get("group.id", "")))
        self.lag_commit_interval = lag_commit_interval
        self._lag: dict[tuple[str, int], int] = {}
        self._lag_due = 0.0
        super().__init__(config, topics, decode=decode, batch_size=batch_size,
                         batch_timeout=batch_timeout, max_attempts=max_attempts,
                         dead_letter_topic=dead_letter_topic,
                         producer_config=producer_config, retry=retry)

    def position(self, topic: str, partition: int) -> tuple[int, int] | None:
        """The stored ``(next_offset, generation)`` of a partition (None: no row)."""
        with self.store.engine.connect() as conn:
            row = conn.execute(self.sql.read, self.sql.params(topic, partition)).first()
        return None if row is None else (int(row[0]), int(row[1]))

    def _positions_for(self, partitions: list[Any]) -> list[Any]:
        """Take each assigned partition (a new generation) and seek it to its stored
        position; a partition without a row starts at Kafka's committed offset, else at
        ``auto.offset.reset``."""
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in self.consumer.committed(partitions, timeout=10)}
        marks = {(tp.topic, tp.partition): self._watermarks(tp) for tp in partitions}
        taken: dict[tuple[str, int], tuple[int, int]] = {}

        def take(_: Any) -> None:
            taken.clear()
            with self.store.engine.begin() as conn:
                for tp in partitions:
                    tpk = (tp.topic, tp.partition)
                    low, high = marks[tpk]
                    start = committed.get(tpk, -1)
                    if start is None or start < 0:
                        start = low if self.from_start else high
                    params = self.sql.params(tp.topic, tp.partition, g_start=start)
                    conn.execute(self.sql.create, params)
                    offset, generation = conn.execute(self.sql.take, params).one()
                    if offset < 0 or not low <= offset <= high:
                        raise InvalidPosition(
                            f"{self.group}: the stored position of {tp.topic}[{tp.partition}] "
                            f"is {offset}, outside the partition's offsets {low}..{high}; "
                            "nothing consumed from it",
                            group=self.group, topic=tp.topic, partition=tp.partition,
                            offset=int(offset), low=low, high=high)
                    taken[tpk] = (int(offset), int(generation))

        self._retried(take, None)
        placed = []
        for tp in partitions:
            offset, generation = taken[(tp.topic, tp.partition)]
            self.owned[(tp.topic, tp.partition)] = [offset, generation]
            placed.append(TopicPartition(tp.topic, tp.partition, offset))
        return placed

    def _keys_of(self, batch: list[Message]) -> list[str]:
        assert self.key is not None
        out = []
        for m in batch:
            text = _keys.as_key_text(self.key(m))
            if text is None:
                raise MissingIdempotencyKey(
                    f"{self.namespace}: {m.topic}[{m.partition}]@{m.offset} has no key; not "
                    "processed, nothing recorded", namespace=self.namespace)
            _keys.check_text("key", text)
            out.append(text)
        return out

    def _apply(self, batch: list[Message]) -> None:
        """One transaction: business keys, the handler, the fenced positions."""
        spans: dict[tuple[str, int], tuple[int, int]] = {}
        for m in batch:
            tpk = (m.topic, m.partition)
            first = spans[tpk][0] if tpk in spans else m.offset
            spans[tpk] = (first, m.offset + 1)
        fresh = batch
        keys = self._keys_of(batch) if self.key is not None else None
        try:
            with self.store.engine.begin() as conn:
                if keys is not None:
                    new = self.store.record_many(conn, self.namespace, keys, ttl=self.ttl)
                    fresh, seen = [], set()
                    for m, k in zip(batch, keys, strict=True):
                        if k in new and k not in seen:
                            fresh.append(m)
                            seen.add(k)
                if fresh:
                    self.handler(fresh, conn)
                self._advance(conn, spans)
        except _Moved as moved:
            self._after_refusal(moved, spans)
        self._committed(spans)

    def _skip(self, m: Message) -> None:
        spans = {(m.topic, m.partition): (m.offset, m.offset + 1)}
        try:
            with self.store.engine.begin() as conn:
                self._advance(conn, spans)
        except _Moved as moved:
            self._after_refusal(moved, spans)
        self._committed(spans)

    def _advance(self, conn: sa.Connection, spans: dict[tuple[str, int], tuple[int, int]]
                 ) -> None:
        rows = []
        for (topic, partition), (_, end) in spans.items():
            owned = self.owned.get((topic, partition))
            if owned is None:
                raise _Moved(topic, partition)
            rows.append(self.sql.params(topic, partition, g_gen=owned[1], g_from=owned[0],
                                        g_to=end))
        if len(rows) > 1 and self.sql.pg:  # one round trip for every partition of the batch
            arrays = {"g_group": self.sql.group, "g_now": time.time(),
                      **{name: [r[col] for r in rows] for name, col in (
                          ("v_topic", "g_topic"), ("v_part", "g_partition"),
                          ("v_gen", "g_gen"), ("v_from", "g_from"), ("v_to", "g_to"))}}
            if conn.execute(self.sql.advance_all, arrays).rowcount != len(rows):
                raise _Moved(*next(iter(spans)))  # which one: `_after_refusal` finds out
            return
        for params in rows:
            if conn.execute(self.sql.advance, params).rowcount != 1:
                # rolls the whole transaction back
                raise _Moved(params["g_topic"], params["g_partition"])

    def _after_refusal(self, moved: _Moved, spans: dict[tuple[str, int], tuple[int, int]]
                       ) -> None:
        """The fence refused the batch (rolled back). If the row holds exactly what this
        batch would have written, under our generation, an earlier attempt of this very
        batch committed (its COMMIT's answer was lost): done. Otherwise: fenced."""
        found = {tpk: self.position(*tpk) for tpk in spans}
        mismatch = [tpk for tpk, (_, end) in spans.items()
                    if tpk not in self.owned or found[tpk] != (end, self.owned[tpk][1])]
        if not mismatch:
            return
        # the partition another generation took (the statement may not have said which)
        topic, partition = next(
            (tpk for tpk in mismatch if tpk not in self.owned
             or (row := found[tpk]) is None or row[1] != self.owned[tpk][1]),
            (moved.topic, moved.partition))
        owned = self.owned.pop((topic, partition), None)
        raise PositionFenced(
            f"{self.group}: {topic}[{partition}] belongs to a newer generation "
            f"(stored {found.get((topic, partition))}, ours {owned}); the batch was rolled "
            "back, nothing written",
            group=self.group, topic=topic, partition=partition,
            generation=None if owned is None else owned[1],
            start=None if owned is None else owned[0], found=found.get((topic, partition)))

    def _committed(self, spans: dict[tuple[str, int], tuple[int, int]]) -> None:
        """After COMMIT: our next offsets; Kafka's committed offsets (monitoring only) at
        most every ``lag_commit_interval`` seconds, and when partitions are revoked."""
        for tpk, (_, end) in spans.items():
            owned = self.owned.get(tpk)
            if owned is not None:
                owned[0] = end
            self._lag[tpk] = end
        if time.monotonic() >= self._lag_due:
            self._commit_lag()

    def _commit_lag(self) -> None:
        self._lag_due = time.monotonic() + self.lag_commit_interval
        if not self._lag:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._lag.items()]
        self._lag.clear()
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # lag monitoring only; the database has the truth
            _LOG.debug("Kafka offset commit (monitoring only) failed: %r", exc)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self._commit_lag()
        super()._on_revoke(consumer, partitions)

    def close(self) -> None:
        """Commit the lag offsets not yet sent, leave the group, close the clients."""
        self._commit_lag()
        super().close()


class _Moved(Exception):
    """Internal: the fenced UPDATE matched no row."""

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


# -- lease mode: effects outside the database -------------------------------------------------
class LeaseConsumer(_Loop):
    """A consumer for handlers whose effects leave the database.

    ``handler(message)`` is called once per message, in order; make it an ``@idempotent``
    lease-mode handler keyed by `offset_key` (one key per delivery position) or by a
    business key, so a redelivery after a crash or a rebalance returns the stored result
    instead of repeating the effect. Kafka offsets are committed (synchronously) after
    each batch's handlers returned; a crash before that redelivers the batch, which the
    records deduplicate. `AlreadyInProgress` (the previous owner still runs the message),
    `LeaseLost` and `StoreUnavailable` are retried, not counted as attempts. Other
    arguments as `TransactionalConsumer`.
    """

    def __init__(self, config: Mapping[str, Any], topics: Sequence[str],
                 handler: Callable[[Message], Any], *,
                 decode: Callable[[bytes | None], Any] | None = None, batch_size: int = 100,
                 batch_timeout: float = 0.1, max_attempts: int = 3,
                 dead_letter_topic: str | None = None,
                 producer_config: Mapping[str, Any] | None = None,
                 retry: tenacity.Retrying | None = None) -> None:
        if inspect.iscoroutinefunction(handler):
            raise TypeError("LeaseConsumer runs sync handlers (confluent-kafka is sync)")
        self.handler = handler
        super().__init__(config, topics, decode=decode, batch_size=batch_size,
                         batch_timeout=batch_timeout, max_attempts=max_attempts,
                         dead_letter_topic=dead_letter_topic,
                         producer_config=producer_config, retry=retry)

    def _positions_for(self, partitions: list[Any]) -> list[Any]:
        """Kafka's committed offsets (``auto.offset.reset`` without one)."""
        committed = self.consumer.committed(partitions, timeout=10)
        placed = []
        for tp in committed:
            offset: int = tp.offset
            if offset < 0:
                low, high = self._watermarks(tp)
                offset = low if self.from_start else high
            self.owned[(str(tp.topic), int(tp.partition))] = [offset, 0]
            placed.append(TopicPartition(tp.topic, tp.partition, offset))
        return placed

    def _apply(self, batch: list[Message]) -> None:
        ends: dict[tuple[str, int], int] = {}
        for m in batch:
            if (m.topic, m.partition) not in self.owned:
                continue
            self.handler(m)
            ends[(m.topic, m.partition)] = m.offset + 1
            self._commit(ends)
        ends.clear()

    def _skip(self, m: Message) -> None:
        self._commit({(m.topic, m.partition): m.offset + 1})

    def _commit(self, ends: Mapping[tuple[str, int], int]) -> None:
        for tpk, end in ends.items():
            owned = self.owned.get(tpk)
            if owned is not None:
                owned[0] = max(owned[0], end)

    def poll_batch(self, timeout: float | None = None) -> int:
        """As `TransactionalConsumer.poll_batch`; then Kafka's offsets are committed."""
        n = super().poll_batch(timeout)
        if n:
            self._commit_offsets(list(self.owned))
        return n

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # what this consumer applied, committed before the next owner starts from it
        self._commit_offsets([(tp.topic, tp.partition) for tp in partitions])
        super()._on_revoke(consumer, partitions)

    def _commit_offsets(self, which: list[tuple[str, int]]) -> None:
        offsets = [TopicPartition(t, p, self.owned[(t, p)][0]) for t, p in which
                   if (t, p) in self.owned]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # a rebalance: the records dedup the redelivery
            _LOG.warning("Kafka offset commit failed: %r", exc)


# -- the outbox's publisher --------------------------------------------------------------
#: The header that carries an outbox entry's id: key a consumer of those messages with
#: ``header(OUTBOX_ID_HEADER)``, so a re-publish (a new offset) is a duplicate it drops.
OUTBOX_ID_HEADER = "idempotent-message-id"


class KafkaPublisher:
    """Publishes `idempotent.outbox` entries to Kafka with a confluent-kafka ``Producer``:
    the entry's target is the topic, its body the value (JSON), its id the
    `OUTBOX_ID_HEADER` header, and ``key`` (a function of the entry; default: none) the
    message key. ``publish`` returns once the broker acknowledged the message (it flushes
    the producer), and raises when it did not, so the entry is retried."""

    def __init__(self, producer: Any, name: str = "kafka", *,
                 key: Callable[[Any], bytes | str | None] | None = None,
                 timeout: float = 30.0) -> None:
        self.producer = producer
        self.name = name
        self.key = key
        self.timeout = timeout

    def publish(self, entry: Any) -> None:
        errors: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        self.producer.produce(
            entry.target,
            json.dumps(entry.body, sort_keys=True, separators=(",", ":")).encode(),
            key=self.key(entry) if self.key else None,
            headers=[(OUTBOX_ID_HEADER, entry.id.encode())], on_delivery=delivered)
        left = self.producer.flush(self.timeout)
        if errors or left:
            raise ConnectionError(f"Kafka did not acknowledge {entry.id!r} on "
                                  f"{entry.target}: {errors[0] if errors else 'timed out'}")
