"""RabbitMQ consumers that process each message once and ack it only after it is done.

::

    from idempotent.integrations.amqp import Consumer

    def apply_payment(message: Message, *, session: Session) -> dict:
        session.add(Ledger(payment_id=message.body["payment_id"], ...))
        return {"applied": message.body["payment_id"]}

    Consumer(apply_payment, store, queue="payments", key="payment_id").run(url)

Per delivery (the same for pika, here, and aio-pika, `idempotent.integrations.aio_pika`):

* the body is decoded (JSON by default) into a `Message`; the key is the AMQP
  ``message_id`` property by default, or a business key: the name of a field of the
  decoded body, or a callable over the `Message`; the payload fingerprint is the decoded
  body (not the headers, which change between deliveries);
* the handler runs through `idempotent.idempotent`: **transactional mode** when it takes
  ``session`` or ``connection`` (a `SqlStore`; its writes and the key commit together),
  **lease mode** otherwise;
* the message is **acked after** the handler's transaction committed (or its result was
  stored); a **duplicate** is acked without running the handler;
* a **store fault** (`StoreUnavailable` after the retry policy, or another worker holding
  the key: `AlreadyInProgress`, `LeaseLost`) → the message is nacked with requeue after
  ``retry_delay`` seconds; it is never acked as done, and never dead-lettered for it;
* the **handler raised**: the message is published again (same body and properties, to the
  queue, with publisher confirms) with its failure count in the ``x-idempotent-failures``
  header, and the delivery acked; at the ``max_deliveries``-th delivery (that count, or a
  quorum queue's ``x-delivery-count``) it is dead-lettered instead; with
  ``max_redeliveries``, a message a quorum queue has delivered that many times without it
  being settled (its consumers crashed) is dead-lettered before it runs again;
* **bad input** (`MissingIdempotencyKey`, `InvalidIdempotencyKey`, `UndecodableMessage`,
  `MessageTooLarge`, `IdempotencyKeyConflict`, `PreviousAttemptFailed`,
  `TooManyDeliveries`) is dead-lettered
  at once: no retry can fix it. Nothing is recorded done for it.

Dead-lettering publishes the message (body and properties as received) to
``dead_letter_exchange`` with the error in headers (`ERROR_HEADER`, `ERROR_TYPE_HEADER`,
`DELIVERIES_HEADER`, `QUEUE_HEADER`), confirmed, then acks it; without a
``dead_letter_exchange`` the message is rejected without requeue, so the queue's own
dead-letter exchange (``x-dead-letter-exchange``) gets it, and the error is logged.

The consumer uses manual acks and a prefetch of 10 by default; it reconnects after a
connection loss (a broker restart), and everything unacked at that moment is redelivered
by the broker, which the store makes harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from idempotent import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    InvalidIdempotencyKey,
    LeaseLost,
    MissingIdempotencyKey,
    PreviousAttemptFailed,
    ResultNotStored,
    StoreUnavailable,
    idempotent,
)
from idempotent.stores import Store

if TYPE_CHECKING:
    import pika  # type: ignore[import-untyped]  # pika ships no type hints
    import pika.adapters.blocking_connection  # type: ignore[import-untyped]

__all__ = [
    "BAD_INPUT",
    "DELIVERIES_HEADER",
    "DELIVERY_COUNT",
    "ERROR_HEADER",
    "ERROR_TYPE_HEADER",
    "FAILURES_HEADER",
    "QUEUE_HEADER",
    "STORE_FAULTS",
    "Ack",
    "AmqpPublisher",
    "Consumer",
    "DeadLetter",
    "Message",
    "MessageTooLarge",
    "Processor",
    "Republish",
    "Requeue",
    "TooManyDeliveries",
    "UndecodableMessage",
    "json_body",
]

logger = logging.getLogger("idempotent.amqp")

#: Our count of the handler's failures for this message, carried by its republished copy.
FAILURES_HEADER = "x-idempotent-failures"
#: Headers of a dead-lettered message: the error (``Type: text``), its type's name, the
#: delivery it failed on, the queue it came from.
ERROR_HEADER = "x-idempotent-error"
ERROR_TYPE_HEADER = "x-idempotent-error-type"
DELIVERIES_HEADER = "x-idempotent-deliveries"
QUEUE_HEADER = "x-idempotent-queue"
#: RabbitMQ's count of earlier deliveries of a message (quorum queues).
DELIVERY_COUNT = "x-delivery-count"
_ERROR_TEXT_MAX = 1000  # characters of the error kept in the dead-letter header

DEFAULT_MAX_BODY = 1 << 20


class UndecodableMessage(IdempotencyError, ValueError):
    """The body cannot be decoded (not valid JSON/UTF-8 with the default decoder, or the
    decoder raised). The handler did not run; nothing was recorded; the message is
    dead-lettered."""


class MessageTooLarge(IdempotencyError, ValueError):
    """The body is longer than ``max_body`` bytes. The handler did not run; nothing was
    recorded; the message is dead-lettered. ``size`` is the body's length."""

    def __init__(self, message: str, *, size: int | None = None,
                 namespace: str | None = None, key: str | None = None) -> None:
        super().__init__(message, namespace=namespace, key=key)
        self.size = size


class TooManyDeliveries(IdempotencyError):
    """A quorum queue has delivered the message ``max_redeliveries`` times or more
    (``x-delivery-count``) without it being settled: each consumer that got it died or lost
    its channel before acking (a message that crashes its consumer, OOM). Dead-lettered
    without running the handler; ``deliveries`` is the broker's count."""

    def __init__(self, message: str, *, deliveries: int | None = None,
                 namespace: str | None = None, key: str | None = None) -> None:
        super().__init__(message, namespace=namespace, key=key)
        self.deliveries = deliveries


#: Errors no redelivery can fix: dead-lettered at once.
BAD_INPUT: tuple[type[BaseException], ...] = (
    MissingIdempotencyKey, InvalidIdempotencyKey, UndecodableMessage, MessageTooLarge,
    IdempotencyKeyConflict, PreviousAttemptFailed, TooManyDeliveries,
)
#: Faults of the store or of another delivery holding the key: nacked with requeue.
STORE_FAULTS: tuple[type[BaseException], ...] = (StoreUnavailable, AlreadyInProgress, LeaseLost)


def json_body(raw: bytes, content_type: str | None) -> Any:
    """The default decoder: the body as JSON (UTF-8), whatever the content type says."""
    return json.loads(raw.decode("utf-8"))


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery as the handler sees it. ``body`` is the decoded body; ``raw`` the bytes;
    ``deliveries`` counts this delivery (1 the first time) from our failure header and a
    quorum queue's ``x-delivery-count``; ``properties`` is the client library's own
    properties object (pika ``BasicProperties`` or the aio-pika message)."""

    body: Any
    raw: bytes
    message_id: str | None
    headers: Mapping[str, Any]
    routing_key: str
    exchange: str
    redelivered: bool
    deliveries: int
    content_type: str | None = None
    properties: Any = field(default=None, repr=False, compare=False)


# -- what to do with a delivery: small values the broker adapters carry out -----------

@dataclass(frozen=True, slots=True)
class Ack:
    """Processed (or a duplicate): ack it. ``result`` is the handler's (or the stored)."""

    result: Any = None


@dataclass(frozen=True, slots=True)
class Requeue:
    """Not processed through no fault of the message: nack with requeue after ``delay``."""

    error: BaseException
    delay: float


@dataclass(frozen=True, slots=True)
class Republish:
    """The handler failed: publish a copy to the queue with ``headers`` (the failure count),
    confirmed, then ack this delivery; after ``delay`` seconds."""

    error: BaseException
    headers: dict[str, Any]
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Bad input or too many failed deliveries: to the dead-letter exchange with the
    error in ``headers``, then ack (or reject without requeue when no exchange is set)."""

    error: BaseException
    headers: dict[str, Any]


Outcome = Ack | Requeue | Republish | DeadLetter


def _count(value: Any) -> int:
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__qualname__}: {exc}"[:_ERROR_TEXT_MAX]


class Processor:
    """What a delivery means, whatever the client library: decode, identify, run the
    handler through `idempotent`, and say what to do with the message (an `Ack`,
    `Requeue`, `Republish` or `DeadLetter`). `Consumer` (pika) and
    `idempotent.integrations.aio_pika.Consumer` carry the answer out.

    * ``handler(message, [session=|connection=])``: sync, or ``async def`` (aio-pika only);
    * ``key``: None (the ``message_id`` property), a field name of the decoded body, or a
      callable over the `Message`;
    * ``fingerprint``: None (the decoded body), a list of body field names, a callable over
      the `Message`, or False;
    * ``decode(raw, content_type)``: the body decoder (default `json_body`);
    * ``max_body``: longest body in bytes (default 1 MiB), longer → `MessageTooLarge`;
    * ``max_deliveries``: the delivery at which a failing message is dead-lettered;
    * ``max_redeliveries``: None, or the quorum-queue ``x-delivery-count`` at which a message
      is dead-lettered before its handler runs (`TooManyDeliveries`): a crash loop. That
      count also grows with every requeue after a store fault and with every return of a
      prefetched message when a consumer dies, so keep it well above both;
    * ``retry_delay``: seconds before a requeue or republish (doubled per failure, with
      jitter, at most 30 s);
    * other keyword arguments go to `idempotent.idempotent` (``namespace``, ``scope``,
      ``ttl``, ``lease``, ``retry``, ``optimistic``, ...).
    """

    def __init__(
        self,
        handler: Callable[..., Any],
        store: Store,
        *,
        queue: str,
        key: str | Callable[[Message], Any] | None = None,
        fingerprint: bool | Iterable[str] | Callable[[Message], Any] | None = None,
        decode: Callable[[bytes, str | None], Any] = json_body,
        max_body: int = DEFAULT_MAX_BODY,
        max_deliveries: int = 5,
        max_redeliveries: int | None = None,
        retry_delay: float = 1.0,
        **options: Any,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.queue = queue
        self.decode = decode
        self.max_body = max_body
        self.max_deliveries = max_deliveries
        self.max_redeliveries = max_redeliveries
        self.retry_delay = retry_delay
        self.is_async = asyncio.iscoroutinefunction(handler)
        self.handler = idempotent(store, key=_key_of(key), fingerprint=_fingerprint_of(fingerprint),
                                  **options)(handler)
        self.namespace: str = self.handler.namespace  # type: ignore[attr-defined]

    # -- the message -----------------------------------------------------------------
    def message(self, raw: bytes, *, message_id: str | None, headers: Mapping[str, Any] | None,
                routing_key: str, exchange: str, redelivered: bool,
                content_type: str | None, properties: Any) -> Message:
        """The `Message` of a delivery; raises `MessageTooLarge` / `UndecodableMessage`."""
        headers = dict(headers or {})
        deliveries = max(_count(headers.get(FAILURES_HEADER)),
                         _count(headers.get(DELIVERY_COUNT))) + 1
        redeliveries = _count(headers.get(DELIVERY_COUNT))
        if self.max_redeliveries is not None and redeliveries >= self.max_redeliveries:
            raise TooManyDeliveries(
                f"{self.namespace}: delivered {redeliveries} times before without being "
                "settled (each consumer died or lost its channel first); dead-lettered "
                "without running the handler", deliveries=redeliveries,
                namespace=self.namespace)
        if len(raw) > self.max_body:
            raise MessageTooLarge(
                f"{self.namespace}: a body of {len(raw)} bytes, more than max_body="
                f"{self.max_body}; the handler did not run and nothing was recorded",
                size=len(raw), namespace=self.namespace)
        try:
            body = self.decode(raw, content_type)
        except Exception as exc:
            raise UndecodableMessage(
                f"{self.namespace}: the body cannot be decoded ({type(exc).__name__}: {exc}); "
                "the handler did not run and nothing was recorded",
                namespace=self.namespace) from exc
        return Message(body=body, raw=raw, message_id=message_id, headers=headers,
                       routing_key=routing_key, exchange=exchange, redelivered=redelivered,
                       deliveries=deliveries, content_type=content_type,
                       properties=properties)

    # -- one delivery ----------------------------------------------------------------
    def process(self, build: Callable[[], Message]) -> Outcome:
        """Build the message, run a sync handler, and say what to do with the delivery."""
        message: Message | None = None
        try:
            message = build()
            return Ack(self.handler(message))
        except Exception as exc:
            return self.outcome(exc, message)

    async def aprocess(self, build: Callable[[], Message]) -> Outcome:
        """`process` for asyncio: an ``async def`` handler is awaited, a sync one runs in a
        worker thread so the event loop (and the broker connection) stays responsive."""
        message: Message | None = None
        try:
            message = build()
            if self.is_async:
                return Ack(await self.handler(message))
            return Ack(await asyncio.to_thread(self.handler, message))
        except Exception as exc:
            return self.outcome(exc, message)

    def outcome(self, exc: BaseException, message: Message | None) -> Outcome:
        """What an exception of a delivery means for its message."""
        deliveries = message.deliveries if message is not None else 1
        if isinstance(exc, TooManyDeliveries) and exc.deliveries is not None:
            deliveries = exc.deliveries + 1
        if isinstance(exc, ResultNotStored):  # the handler ran once: done
            logger.warning("%s", exc)
            return Ack(None)
        if isinstance(exc, STORE_FAULTS):
            logger.warning("%s: %s; requeued", self.namespace, _error_text(exc))
            return Requeue(exc, self._delay(deliveries))
        if isinstance(exc, BAD_INPUT) or deliveries >= self.max_deliveries:
            logger.error("%s: dead-lettered at delivery %d: %s", self.namespace, deliveries,
                         _error_text(exc))
            return DeadLetter(exc, {
                ERROR_HEADER: _error_text(exc), ERROR_TYPE_HEADER: type(exc).__qualname__,
                DELIVERIES_HEADER: deliveries, QUEUE_HEADER: self.queue})
        logger.warning("%s: handler failed at delivery %d of %d: %s", self.namespace,
                       deliveries, self.max_deliveries, _error_text(exc))
        failures = _count((message.headers if message else {}).get(FAILURES_HEADER)) + 1
        return Republish(exc, {FAILURES_HEADER: failures}, self._delay(deliveries))

    def _delay(self, deliveries: int) -> float:
        base = self.retry_delay * 2.0 ** min(deliveries - 1, 10)
        return float(min(base, 30.0) * random.uniform(0.5, 1.0))


def _key_of(spec: str | Callable[[Message], Any] | None) -> Callable[..., Any]:
    """The decorator's key function over ``(message, **kwargs)``."""
    if spec is None:
        return lambda message, **_: message.message_id
    if callable(spec):
        fn = spec
        return lambda message, **_: fn(message)
    name = spec

    def field_of(message: Message, **_: Any) -> Any:
        body = message.body
        return body.get(name) if isinstance(body, Mapping) else getattr(body, name, None)
    return field_of


def _fingerprint_of(spec: bool | Iterable[str] | Callable[[Message], Any] | None
                    ) -> bool | Callable[..., Any]:
    if spec is False:
        return False
    if spec is None or spec is True:
        return lambda message, **_: message.body
    if callable(spec):
        fn = spec
        return lambda message, **_: fn(message)
    names = tuple(spec)

    def fields(message: Message, **_: Any) -> Any:
        body = message.body if isinstance(message.body, Mapping) else {}
        return {n: body.get(n) for n in names}
    return fields


# -- pika ------------------------------------------------------------------------------

class Consumer:
    """A pika (``BlockingConnection``) consumer of one queue, running ``handler`` once per
    key. Arguments: those of `Processor`, and

    * ``prefetch``: ``basic_qos(prefetch_count=)`` (default 10); acks are always manual;
    * ``dead_letter_exchange`` / ``dead_letter_routing_key``: where dead-lettered messages
      go (routing key default: the message's own); None: rejected without requeue;
    * ``reconnect_delay``: seconds between two connection attempts after a loss.

    `run` consumes until `stop` (thread-safe) is called. A handler that runs longer than
    the connection's AMQP heartbeat timeout blocks pika's I/O: raise ``heartbeat=`` in the
    connection parameters, or use the aio-pika consumer, which runs sync handlers in a
    thread.
    """

    def __init__(self, handler: Callable[..., Any], store: Store, *, queue: str,
                 prefetch: int = 10, dead_letter_exchange: str | None = None,
                 dead_letter_routing_key: str | None = None, reconnect_delay: float = 1.0,
                 **options: Any) -> None:
        try:
            import pika  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "idempotent.integrations.amqp needs pika: pip install 'idempotent-py[amqp]'"
            ) from exc
        self.processor = Processor(handler, store, queue=queue, **options)
        if self.processor.is_async:
            raise TypeError("an async handler needs idempotent.integrations.aio_pika.Consumer")
        self.queue = queue
        self.prefetch = prefetch
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_routing_key = dead_letter_routing_key
        self.reconnect_delay = reconnect_delay
        self._stopping = False
        self._connection: pika.BlockingConnection | None = None
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None

    def run(self, parameters: str | pika.connection.Parameters,
            *, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until `stop`; reconnect after a connection loss. ``parameters``: an
        AMQP URL or pika connection parameters. ``on_ready`` is called each time the
        consumer is registered."""
        import pika
        import pika.exceptions  # type: ignore[import-untyped]  # pika ships no type hints

        params = pika.URLParameters(parameters) if isinstance(parameters, str) else parameters
        while not self._stopping:
            try:
                self._connection = pika.BlockingConnection(params)
                self._consume(self._connection, on_ready)
            except (pika.exceptions.AMQPError, ConnectionError) as exc:
                # the connection or the channel was lost or closed by the broker (a
                # restart, consumer_timeout): what we had not acked is redelivered
                if self._stopping:
                    break
                logger.warning("%s: connection lost (%r); reconnecting", self.queue, exc)
                time.sleep(self.reconnect_delay)
            finally:
                conn, self._connection = self._connection, None
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except Exception:  # already broken: nothing to close cleanly
                        logger.debug("%s: close after a loss failed", self.queue, exc_info=True)

    def _consume(self, connection: pika.BlockingConnection,
                 on_ready: Callable[[], None] | None) -> None:
        channel = connection.channel()
        channel.confirm_delivery()  # republish / dead-letter are confirmed before the ack
        channel.basic_qos(prefetch_count=self.prefetch)

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            self._handle(ch, method, props, body)

        channel.basic_consume(self.queue, on_message, auto_ack=False)
        self._channel = channel
        if on_ready is not None:
            on_ready()
        if self._stopping:
            return
        channel.start_consuming()

    def stop(self) -> None:
        """Stop consuming after the message in hand (callable from any thread)."""
        self._stopping = True
        conn, channel = self._connection, self._channel
        if conn is not None and channel is not None:
            try:
                conn.add_callback_threadsafe(channel.stop_consuming)
            except Exception:  # the connection is closing anyway
                logger.debug("%s: stop on a closing connection", self.queue, exc_info=True)

    def _handle(self, ch: pika.adapters.blocking_connection.BlockingChannel, method: Any,
                props: Any, body: bytes) -> None:
        processor = self.processor

        def build() -> Message:
            return processor.message(
                body, message_id=props.message_id, headers=props.headers,
                routing_key=method.routing_key, exchange=method.exchange,
                redelivered=method.redelivered, content_type=props.content_type,
                properties=props)

        outcome = processor.process(build)
        tag = method.delivery_tag
        if isinstance(outcome, Ack):
            ch.basic_ack(tag)
        elif isinstance(outcome, Requeue):
            ch.connection.sleep(outcome.delay)  # pika keeps the connection alive meanwhile
            ch.basic_nack(tag, requeue=True)
        elif isinstance(outcome, Republish):
            ch.connection.sleep(outcome.delay)
            ch.basic_publish("", self.queue, body, _with_headers(props, outcome.headers))
            ch.basic_ack(tag)
        elif self.dead_letter_exchange is None:
            ch.basic_reject(tag, requeue=False)
        else:
            ch.basic_publish(self.dead_letter_exchange,
                             self.dead_letter_routing_key or method.routing_key, body,
                             _with_headers(props, outcome.headers))
            ch.basic_ack(tag)


def _with_headers(props: Any, headers: Mapping[str, Any]) -> Any:
    """A copy of pika properties with ``headers`` added (persistent if the original was),
    without the broker's own count and without ``user_id``/``expiration``: a copy must not
    be refused (another user's id) or expire."""
    import pika

    merged = {k: v for k, v in (props.headers or {}).items() if k != DELIVERY_COUNT}
    merged.update(headers)
    return pika.BasicProperties(
        content_type=props.content_type, content_encoding=props.content_encoding,
        headers=merged, delivery_mode=props.delivery_mode, priority=props.priority,
        correlation_id=props.correlation_id, reply_to=props.reply_to,
        message_id=props.message_id, timestamp=props.timestamp, type=props.type,
        app_id=props.app_id)


# -- the outbox's publisher --------------------------------------------------------------
class AmqpPublisher:
    """Publishes `idempotent.outbox` entries to RabbitMQ with pika: the entry's target is
    the routing key (on ``exchange``, the default exchange by default: the queue name), its
    body the message body (JSON, persistent), and its id the ``message_id`` property, which
    is what a `Consumer` keys by default, so a re-publish is a duplicate it acks.

    ``connect`` returns a pika ``BlockingConnection`` (called again after the connection
    was lost); the channel is in confirm mode and ``mandatory`` is set, so ``publish``
    returns once the broker took the message into a queue, and raises otherwise (the entry
    is retried)."""

    def __init__(self, connect: Callable[[], Any], name: str = "amqp", *,
                 exchange: str = "") -> None:
        self._connect = connect
        self.name = name
        self.exchange = exchange
        self._connection: Any = None
        self._channel: Any = None

    def publish(self, entry: Any) -> None:
        import pika

        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connection = self._connect()
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        try:
            self._channel.basic_publish(
                self.exchange, entry.target,
                json.dumps(entry.body, sort_keys=True, separators=(",", ":")).encode(),
                pika.BasicProperties(message_id=entry.id, delivery_mode=2,
                                     content_type="application/json"),
                mandatory=True)
        except Exception:
            self.close()  # a broken or unroutable channel: the next publish reconnects
            raise

    def close(self) -> None:
        """Close the publisher's connection (the next publish opens a new one)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # already broken: nothing to close
                logger.debug("closing the publisher's connection failed", exc_info=True)
