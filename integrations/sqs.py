"""Amazon SQS consumers that apply each message once, on workers that crash and redeliver.

Three pieces, each small::

    from idempotent.integrations.sqs import SqsConsumer, body_field, sqs_handler

    @sqs_handler(store, key=body_field("payment_id"))      # the handler: one message
    def apply_payment(message, *, session): ...             # (transactional mode)

    with SqsConsumer(client, queue_url, apply_payment,     # the worker loop (boto3)
                     dead_letter_queue_url=dlq_url) as consumer:
        consumer.run(stop)

    lambda_handler = apply_payment.lambda_handler          # AWS Lambda partial batches

* `sqs_handler` wraps a function with the public `idempotent` decorator. The key is the
  message's ``MessageId`` by default (`message_id`), or a body field (`body_field`) or a
  message attribute (`message_attribute`) when a producer may send one payment twice (two
  sends are two MessageIds). A function that takes ``session`` or ``connection`` runs in
  **transactional mode** (its writes and the key commit together); any other in **lease
  mode**. The payload fingerprint is the decoded body (not the receipt handle or the
  attributes, which change with every receive).
* `SqsHandler.process` turns one received message into an `Outcome`: the message is
  decoded and its key checked *before* anything is written, and every error is classified
  (bad input, the handler's failure, a poison message, not the message's fault).
* `SqsConsumer` is the loop: long-poll receive of up to 10 messages; the visibility
  timeout of every message still in flight extended while handlers run
  (``ChangeMessageVisibilityBatch``, by a heartbeat thread of this module: only messages
  whose timeout is half gone, so a fast batch costs no extension call); delete after
  commit, batched (``DeleteMessageBatch``), failed entries retried or left (a message left
  undeleted comes back as a duplicate and is deleted then: its key is already recorded).
  A failed handler leaves its message for redelivery (after ``retry_delay``); a poison
  message goes to the dead-letter queue, ours (``dead_letter_queue_url``, with its error in
  message attributes) or the queue's redrive policy, which must then exist: never an
  endless loop.

Only the loop does I/O; `SqsHandler` and the classification are shared by the loop and
the Lambda adapters. An ``aioboto3`` loop would reuse them as they are (with an async
handler run through the decorator's async path); it is not built here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import tenacity

from idempotent import (
    DEFAULT_TTL,
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    InvalidIdempotencyKey,
    LeaseLost,
    MissingIdempotencyKey,
    PreviousAttemptFailed,
    ResultNotStored,
    Store,
    StoreUnavailable,
    idempotent,
)
from idempotent import keys as _keys
from idempotent.events import Event

logger = logging.getLogger("idempotent.sqs")

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ERROR_ATTRIBUTE",
    "ERROR_TYPE_ATTRIBUTE",
    "OUTBOX_ID_ATTRIBUTE",
    "RECEIVE_COUNT_ATTRIBUTE",
    "SOURCE_MESSAGE_ID_ATTRIBUTE",
    "BadMessage",
    "Outcome",
    "OversizedMessage",
    "SqsConsumer",
    "SqsHandler",
    "SqsMessage",
    "SqsPublisher",
    "Status",
    "UndecodableMessage",
    "body_field",
    "json_body",
    "message_attribute",
    "message_id",
    "sqs_handler",
]

#: The largest body accepted by default, in UTF-8 bytes (SQS's classic limit, 256 KiB).
DEFAULT_MAX_BODY_BYTES = 262_144
#: Message attributes that a dead-lettered message carries: the error's type name, its
#: text (at most 1,000 characters), the source MessageId and its receive count.
ERROR_TYPE_ATTRIBUTE = "idempotent-error-type"
ERROR_ATTRIBUTE = "idempotent-error"
SOURCE_MESSAGE_ID_ATTRIBUTE = "idempotent-source-message-id"
RECEIVE_COUNT_ATTRIBUTE = "idempotent-receive-count"
_OURS = (ERROR_TYPE_ATTRIBUTE, ERROR_ATTRIBUTE, SOURCE_MESSAGE_ID_ATTRIBUTE,
         RECEIVE_COUNT_ATTRIBUTE)
_MAX_ATTRIBUTES = 10  # SQS: at most 10 message attributes per message
_BATCH = 10  # SQS: at most 10 entries per batch call


# -- errors ------------------------------------------------------------------------------
class BadMessage(IdempotencyError, ValueError):
    """A message this handler cannot take as it is: no retry can fix it. Nothing was
    recorded and the handler did not run; the message is dead-lettered (or left to the
    queue's redrive policy). ``message_id`` is the SQS MessageId."""

    def __init__(self, message: str, *, message_id: str | None = None,
                 namespace: str | None = None, key: str | None = None) -> None:
        super().__init__(message, namespace=namespace, key=key)
        self.message_id = message_id


class UndecodableMessage(BadMessage):
    """The body could not be decoded (not JSON, for the default `json_body`), or the key
    taken from it has a type no key can have. ``__cause__`` is the decoder's error."""


class OversizedMessage(BadMessage):
    """The body is larger than ``max_body_bytes`` (``size`` and ``limit``, in bytes)."""

    def __init__(self, message: str, *, message_id: str | None = None,
                 size: int | None = None, limit: int | None = None) -> None:
        super().__init__(message, message_id=message_id)
        self.size = size
        self.limit = limit


# -- messages ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SqsMessage:
    """One received message, as a handler gets it.

    ``body`` is the decoded body (the ``decode`` of `sqs_handler`; JSON by default),
    ``raw_body`` the text as received. ``attributes`` are the system attributes
    (``ApproximateReceiveCount``, ``SentTimestamp``, ``MessageGroupId`` ...);
    ``message_attributes`` the producer's, by name, as ``str`` (String and Number types)
    or ``bytes`` (Binary). Built from a ``ReceiveMessage`` entry or a Lambda event record.
    """

    message_id: str
    receipt_handle: str
    body: Any
    raw_body: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    message_attributes: Mapping[str, str | bytes] = field(default_factory=dict)

    @property
    def receive_count(self) -> int:
        """``ApproximateReceiveCount`` (1 on the first receive; 0 when not given)."""
        try:
            return int(self.attributes.get("ApproximateReceiveCount", 0))
        except (TypeError, ValueError):
            return 0


def message_id(message: SqsMessage) -> str:
    """The default key: the SQS ``MessageId`` (the same for every redelivery of one send;
    a producer that sends twice makes two)."""
    return message.message_id


def body_field(name: str) -> Callable[[SqsMessage], Any]:
    """A key (or scope) taken from a field of the decoded body: a business key, which
    collapses a producer's double send. A body that is not a mapping has no such field
    (`MissingIdempotencyKey`)."""
    def key_of(message: SqsMessage) -> Any:
        body = message.body
        return body.get(name) if isinstance(body, Mapping) else None
    key_of.__qualname__ = f"body_field({name!r})"
    return key_of


def message_attribute(name: str) -> Callable[[SqsMessage], Any]:
    """A key (or scope) taken from a message attribute (a Binary one as its hex)."""
    def key_of(message: SqsMessage) -> Any:
        return message.message_attributes.get(name)
    key_of.__qualname__ = f"message_attribute({name!r})"
    return key_of


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_body(text: str) -> Any:
    """The default decoder: strict JSON (``NaN`` and ``Infinity`` refused: they have no
    canonical form to fingerprint)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _attribute_value(value: Mapping[str, Any]) -> str | bytes | None:
    """A message attribute's value, from the API's or Lambda's spelling."""
    for name in ("StringValue", "stringValue"):
        if value.get(name) is not None:
            return str(value[name])
    if value.get("BinaryValue") is not None:
        binary = value["BinaryValue"]
        return bytes(binary) if not isinstance(binary, str) else base64.b64decode(binary)
    if value.get("binaryValue") is not None:  # Lambda: base64 text
        return base64.b64decode(value["binaryValue"])
    return None


def _raw_record(record: Any) -> Mapping[str, Any]:
    """The dict of a ``ReceiveMessage`` entry, a Lambda record, or a Powertools
    ``SQSRecord`` (its ``raw_event``)."""
    raw = getattr(record, "raw_event", record)
    if not isinstance(raw, Mapping):
        raise TypeError(f"not an SQS message: {type(record).__qualname__}")
    return raw


# -- outcomes ----------------------------------------------------------------------------
class Status(str, Enum):
    """What became of one message; `SqsConsumer` acts on it."""

    #: the handler ran and its result (and, in transactional mode, its writes) committed
    PROCESSED = "processed"
    #: the key was processed before: the stored result was returned; the body did not run
    DUPLICATE = "duplicate"
    #: the handler raised: the message is left for redelivery (or dead-lettered when its
    #: receives reach ``max_receives``)
    FAILED = "failed"
    #: a failure kept as failed for this key (`PreviousAttemptFailed`): never runs again
    POISON = "poison"
    #: the message cannot be taken as it is (`BadMessage`, `MissingIdempotencyKey`,
    #: `InvalidIdempotencyKey`, `IdempotencyKeyConflict`): nothing recorded
    BAD_INPUT = "bad_input"
    #: not the message's fault (`AlreadyInProgress`, `LeaseLost`, `StoreUnavailable`): left
    #: for redelivery, never dead-lettered by us
    RETRY = "retry"


#: Statuses after which the message is deleted: its key is recorded.
DONE = frozenset({Status.PROCESSED, Status.DUPLICATE})


@dataclass(frozen=True)
class Outcome:
    """One message's outcome: ``result`` for PROCESSED/DUPLICATE, ``error`` otherwise."""

    message_id: str
    status: Status
    result: Any = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether the message is processed (its key recorded): delete it."""
        return self.status in DONE


_BAD_INPUT = (BadMessage, MissingIdempotencyKey, InvalidIdempotencyKey, IdempotencyKeyConflict)
_NOT_THE_MESSAGE = (AlreadyInProgress, LeaseLost, StoreUnavailable)
FingerprintSpec = bool | Iterable[str] | Callable[[SqsMessage], Any] | None


# -- the handler -------------------------------------------------------------------------
class SqsHandler:
    """A function that applies one SQS message, run once per key by `idempotent`.

    Made by `sqs_handler`. Calling it with an `SqsMessage` runs the decorated function
    (raising what it raises); `process` takes a raw message and returns an `Outcome`,
    never raising for a message's fault. `lambda_handler` and `record_handler` adapt it
    to AWS Lambda.
    """

    def __init__(
        self, fn: Callable[..., Any], store: Store, *,
        key: Callable[[SqsMessage], Any] = message_id,
        decode: Callable[[str], Any] | None = json_body,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
        fingerprint: FingerprintSpec = None,
        **options: Any,
    ) -> None:
        if not callable(key):
            raise TypeError("key= must be message_id, body_field(name), "
                            "message_attribute(name) or a callable over the SqsMessage")
        if "listeners" in options:
            options["listeners"] = (*options["listeners"], self._note)
        else:
            options["listeners"] = (self._note,)
        self.fn = fn
        self.key = key
        self.scope: Callable[[SqsMessage], Any] | None = options.get("scope")
        self.decode = decode
        self.max_body_bytes = max_body_bytes
        self._last = threading.local()
        self._call: Callable[..., Any] = idempotent(
            store, key=key, fingerprint=_fingerprint(fingerprint), **options)(fn)
        self.namespace: str = self._call.namespace  # type: ignore[attr-defined]
        self.store = store
        self.ttl = float(options.get("ttl", DEFAULT_TTL))

    def _note(self, event: Event) -> None:
        # which outcome the delivery had (completed / duplicate), for Outcome.status
        self._last.kind = event.kind

    def __call__(self, message: SqsMessage) -> Any:
        """Run the decorated function on ``message`` (once per key)."""
        return self._call(message)

    def parse(self, record: Any) -> SqsMessage:
        """An `SqsMessage` from a ``ReceiveMessage`` entry, a Lambda record or a
        Powertools ``SQSRecord``: the body size checked and the body decoded, the key read
        and checked. Raises `BadMessage` (`OversizedMessage`, `UndecodableMessage`),
        `MissingIdempotencyKey` or `InvalidIdempotencyKey`; writes nothing."""
        raw = _raw_record(record)
        mid = str(raw.get("MessageId") or raw.get("messageId") or "")
        text = raw.get("Body", raw.get("body"))
        if not isinstance(text, str):
            raise UndecodableMessage(f"message {mid}: no text body", message_id=mid)
        limit = self.max_body_bytes
        if limit is not None and len(text) * 4 > limit:  # UTF-8: at most 4 bytes a char
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise OversizedMessage(
                    f"message {mid}: body of {size:,} bytes, over max_body_bytes={limit:,}",
                    message_id=mid, size=size, limit=limit)
        if self.decode is None:
            body: Any = text
        else:
            try:
                body = self.decode(text)
            except Exception as exc:
                raise UndecodableMessage(
                    f"message {mid}: body not decodable ({type(exc).__name__}: {exc})",
                    message_id=mid) from exc
        attrs = raw.get("Attributes", raw.get("attributes")) or {}
        mattrs = raw.get("MessageAttributes", raw.get("messageAttributes")) or {}
        try:
            values = {name: _attribute_value(v) for name, v in mattrs.items()}
        except (binascii.Error, TypeError, ValueError, AttributeError) as exc:
            raise UndecodableMessage(f"message {mid}: message attributes not decodable",
                                     message_id=mid) from exc
        message = SqsMessage(
            message_id=mid,
            receipt_handle=str(raw.get("ReceiptHandle") or raw.get("receiptHandle") or ""),
            body=body, raw_body=text, attributes={k: str(v) for k, v in attrs.items()},
            message_attributes={k: v for k, v in values.items() if v is not None})
        self._check_key(message)
        return message

    def _check_key(self, message: SqsMessage) -> None:
        """The key's refusals, as typed errors, before anything is written (the decorator
        checks again; these are the errors a caller can tell from a handler's own)."""
        for what, of in (("key", self.key), ("scope", self.scope)):
            if of is None:
                continue
            try:
                text = _keys.as_key_text(of(message))
            except TypeError as exc:
                raise UndecodableMessage(
                    f"message {message.message_id}: {exc}", message_id=message.message_id,
                    namespace=self.namespace) from exc
            if text is None:
                raise MissingIdempotencyKey(
                    f"{self.namespace}: message {message.message_id} has no idempotency "
                    f"{what} ({getattr(of, '__qualname__', 'its function')} gave nothing); "
                    "the handler did not run and nothing was recorded",
                    namespace=self.namespace)
            _keys.check_text(what, text)

    def process(self, record: Any) -> Outcome:
        """Decode, check and apply one message; its `Outcome`. Only an exception that is
        not an ``Exception`` (KeyboardInterrupt, SystemExit) escapes."""
        mid = str(_raw_record(record).get("MessageId") or _raw_record(record).get("messageId")
                  or "")
        self._last.kind = None
        try:
            message = self.parse(record)
            result = self._call(message)
        except _BAD_INPUT as exc:
            return Outcome(mid, Status.BAD_INPUT, error=exc)
        except PreviousAttemptFailed as exc:
            return Outcome(mid, Status.POISON, error=exc)
        except ResultNotStored as exc:  # processed once; its result could not be stored
            return Outcome(mid, Status.DUPLICATE, error=exc)
        except _NOT_THE_MESSAGE as exc:
            return Outcome(mid, Status.RETRY, error=exc)
        except Exception as exc:
            return Outcome(mid, Status.FAILED, error=exc)
        status = Status.DUPLICATE if self._last.kind == "duplicate" else Status.PROCESSED
        return Outcome(mid, status, result=result)

    # -- AWS Lambda ----------------------------------------------------------------------
    def lambda_handler(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        """A Lambda function for an SQS event source with ``ReportBatchItemFailures``:
        ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}`` lists every message
        not processed (failed, bad input, poison, in progress elsewhere); SQS deletes the
        others and redelivers these (its redrive policy dead-letters the poison ones).
        On a FIFO queue the records after the first failure are not run and are reported
        too, so their group's order holds."""
        failures: list[dict[str, str]] = []
        failed_fifo = False
        for record in event.get("Records", ()):
            raw = _raw_record(record)
            mid = str(raw.get("messageId") or raw.get("MessageId") or "")
            if failed_fifo:
                failures.append({"itemIdentifier": mid})
                continue
            outcome = self.process(record)
            if not outcome.done:
                logger.warning("SQS message %s %s: %r", mid, outcome.status.value,
                               outcome.error)
                failures.append({"itemIdentifier": mid})
                failed_fifo = str(raw.get("eventSourceARN", "")).endswith(".fifo")
        return {"batchItemFailures": failures}

    def record_handler(self, record: Any) -> Any:
        """A record handler for Powertools' ``BatchProcessor(event_type=EventType.SQS)``
        (``process_partial_response``): returns the result of a processed or duplicate
        message, raises the outcome's error otherwise (Powertools then reports the record
        in ``batchItemFailures``)."""
        outcome = self.process(record)
        if outcome.done:
            return outcome.result
        assert outcome.error is not None  # every status but PROCESSED/DUPLICATE has one
        raise outcome.error


def _fingerprint(spec: FingerprintSpec) -> Any:
    """The decorator's fingerprint over an `SqsMessage`: the decoded body by default
    (what the producer sent; the receipt handle and the attributes change per receive)."""
    if spec is False:
        return False
    if spec is None or spec is True:
        return lambda message: message.body
    if callable(spec):
        return spec
    fields = tuple(spec)

    def of_fields(message: SqsMessage) -> Any:
        body = message.body if isinstance(message.body, Mapping) else {}
        return {f: body.get(f) for f in fields}
    return of_fields


def sqs_handler(
    store: Store, *,
    key: Callable[[SqsMessage], Any] = message_id,
    decode: Callable[[str], Any] | None = json_body,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    fingerprint: FingerprintSpec = None,
    **options: Any,
) -> Callable[[Callable[..., Any]], SqsHandler]:
    """Make a function of one `SqsMessage` an `SqsHandler`, run once per key.

    * ``key``: `message_id` (default), `body_field` (name), `message_attribute` (name),
      or a callable over the `SqsMessage`.
    * ``decode``: the body's decoder (`json_body` by default; None keeps the text).
      A decoder that raises makes the message `UndecodableMessage`.
    * ``max_body_bytes``: larger bodies are `OversizedMessage` (None: no limit).
    * ``fingerprint``: None = the decoded body; a list of body field names; a callable
      over the message; False for no check.
    * the other options are `idempotent`'s: ``namespace`` (default: the function's module
      and name; set it in production), ``scope`` (a callable over the message, e.g.
      ``message_attribute("tenant")``), ``ttl`` (longer than the queue's retention),
      ``lease``, ``retry``, ``serializer``, ``keep_failures``, ``heartbeat``,
      ``optimistic``, ``listeners``.

    A function that takes ``session`` or ``connection`` (with a `SqlStore`) runs in
    transactional mode; any other in lease mode.
    """
    def decorate(fn: Callable[..., Any]) -> SqsHandler:
        return SqsHandler(fn, store, key=key, decode=decode, max_body_bytes=max_body_bytes,
                          fingerprint=fingerprint, **options)
    return decorate


# -- visibility --------------------------------------------------------------------------
def _chunks(items: Sequence[Any], size: int = _BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _Visibility:
    """The heartbeat that keeps in-flight messages invisible while handlers run.

    Every ``timeout / 4`` seconds it extends, by one ``ChangeMessageVisibilityBatch`` per
    10 messages, the messages whose visibility timeout is at least half gone (measured
    from before the receive, so never later than SQS's clock would allow). A batch that is
    done within half the timeout costs no call. A failed extension is logged: the message
    may then be redelivered while its handler runs, and the key's record (a lease, or the
    transaction's unique key) stops the second run."""

    def __init__(self, client: Any, queue_url: str, timeout: int) -> None:
        self.client, self.queue_url, self.timeout = client, queue_url, timeout
        self._deadlines: dict[str, float] = {}  # receipt handle -> when it turns visible
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.extended = 0  # messages extended (for tests and benchmarks)
        self.failed = 0

    def track(self, receipts: Iterable[str], since: float) -> None:
        with self._lock:
            for receipt in receipts:
                self._deadlines[receipt] = since + self.timeout
            if self._thread is None and self._deadlines:
                self._thread = threading.Thread(target=self._run, name="sqs-visibility",
                                                daemon=True)
                self._thread.start()

    def forget(self, receipts: Iterable[str]) -> None:
        with self._lock:
            for receipt in receipts:
                self._deadlines.pop(receipt, None)

    def _run(self) -> None:
        period = max(self.timeout / 4, 0.05)
        while not self._stopped.wait(period):
            try:
                self.extend_due()
            except Exception:  # never let the heartbeat die; the next beat tries again
                logger.warning("SQS visibility extension failed", exc_info=True)

    def extend_due(self) -> None:
        """Extend every tracked message whose timeout is half gone."""
        now = time.monotonic()
        with self._lock:
            due = [r for r, d in self._deadlines.items() if d - now <= self.timeout / 2]
        for chunk in _chunks(due):
            sent = time.monotonic()
            reply = self.client.change_message_visibility_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": self.timeout}
                         for i, r in enumerate(chunk)])
            failed = {int(f["Id"]) for f in reply.get("Failed", ())}
            with self._lock:
                for i, receipt in enumerate(chunk):
                    if i not in failed and receipt in self._deadlines:
                        self._deadlines[receipt] = sent + self.timeout
            self.extended += len(chunk) - len(failed)
            if failed:
                self.failed += len(failed)
                logger.warning("SQS: could not extend the visibility of %d message(s): %s",
                               len(failed), reply.get("Failed"))

    def close(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None:
            thread.join()


# -- the consumer ------------------------------------------------------------------------
def _is_transient(exc: BaseException) -> bool:
    """An SQS call error worth another try: a connection fault or a server-side error."""
    from botocore.exceptions import (  # type: ignore[import-untyped]  # no stubs installed
        BotoCoreError,
        ClientError,
    )

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or "Throttl" in code or code == "RequestThrottled"
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))


class _EntriesFailed(Exception):
    """Some batch entries failed on the server's side (not the sender's): retry them."""


RetryDelay = float | Callable[[SqsMessage | None, int], float] | None


class SqsConsumer:
    """The worker loop of one queue: receive, apply (an `SqsHandler`), delete, extend.

    * ``client``: a boto3 SQS client (yours: close it yourself); ``queue_url``.
    * ``visibility_timeout``: seconds, sent with each receive; the heartbeat extends it
      by as much while a message is in flight.
    * ``wait_time``: long-poll seconds (0-20); ``max_messages``: per receive (1-10).
    * ``dead_letter_queue_url``: where this consumer moves a message that cannot be
      processed: bad input at once, a failing handler once ``ApproximateReceiveCount``
      reaches ``max_receives`` (default 5), a kept failure (`Status.POISON`) at once; it
      carries its error in message attributes (`ERROR_TYPE_ATTRIBUTE` ...). Without
      it, the queue must have a redrive policy (checked here, `ValueError` otherwise) and
      failures are left to it; a kept failure is then deleted (the store keeps it).
    * ``retry_delay``: seconds before a failed message comes back (a number, or a
      callable of (message, receive count)); None leaves its visibility timeout to run
      out. Messages not the message's fault (`Status.RETRY`) come back after the store's
      ``retry_after`` when it gives one.
    * ``delete_attempts``: attempts of a delete whose entries failed on the server side.

    ``stats`` counts what happened (received, deleted, delete_failed, dead_lettered,
    extended, failed, bad_input, ...). Use it as a context manager, or call `close`.
    """

    def __init__(
        self, client: Any, queue_url: str, handler: SqsHandler, *,
        visibility_timeout: int = 30,
        wait_time: int = 20,
        max_messages: int = 10,
        dead_letter_queue_url: str | None = None,
        max_receives: int | None = None,
        retry_delay: RetryDelay = None,
        delete_attempts: int = 3,
    ) -> None:
        if not isinstance(handler, SqsHandler):
            raise TypeError("handler must be an SqsHandler (decorate it with sqs_handler)")
        if not 1 <= max_messages <= _BATCH:
            raise ValueError("max_messages must be 1..10")
        if not 0 <= wait_time <= 20:
            raise ValueError("wait_time must be 0..20 seconds")
        if not 1 <= visibility_timeout <= 43_200:
            raise ValueError("visibility_timeout must be 1..43200 seconds")
        if max_receives is not None and max_receives < 1:
            raise ValueError("max_receives must be at least 1")
        self.client, self.queue_url, self.handler = client, queue_url, handler
        self.visibility_timeout, self.wait_time = int(visibility_timeout), int(wait_time)
        self.max_messages = max_messages
        self.dead_letter_queue_url = dead_letter_queue_url
        self.retry_delay = retry_delay
        self.fifo = queue_url.endswith(".fifo")
        # older botocore (boto3 1.28, the extra's floor) knows only AttributeNames, now deprecated
        receive = client.meta.service_model.operation_model("ReceiveMessage").input_shape
        name = ("MessageSystemAttributeNames" if "MessageSystemAttributeNames"
                in receive.members else "AttributeNames")
        self._system_attributes = {name: ["All"]}
        self.stats: dict[str, int] = dict.fromkeys(
            ("received", "processed", "duplicate", "failed", "poison", "bad_input", "retry",
             "deleted", "delete_failed", "dead_lettered", "dead_letter_failed"), 0)
        if dead_letter_queue_url is None and max_receives is not None:
            raise ValueError("max_receives= is for dead_letter_queue_url=; the queue's "
                             "redrive policy has its own maxReceiveCount")
        self._check_queue()
        self.max_receives = max_receives if max_receives is not None else 5
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(delete_attempts, 1)),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, _EntriesFailed) or _is_transient(e)),
            reraise=True)
        self._visibility = _Visibility(client, queue_url, self.visibility_timeout)

    def _check_queue(self) -> None:
        """One GetQueueAttributes: without a dead-letter queue of ours the queue must have
        a redrive policy (`ValueError`); a key ``ttl`` shorter than the queue's retention
        period is logged (a message redelivered after its key expired runs again)."""
        reply = self.client.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy", "MessageRetentionPeriod"])
        attrs = reply.get("Attributes", {})
        if self.dead_letter_queue_url is None and not attrs.get("RedrivePolicy"):
            raise ValueError(
                f"{self.queue_url} has no redrive policy and no dead_letter_queue_url= was "
                "given: a message that always fails would be received forever. Give the "
                "queue a RedrivePolicy (deadLetterTargetArn, maxReceiveCount) or pass "
                "dead_letter_queue_url=")
        retention = float(attrs.get("MessageRetentionPeriod") or 0)
        if retention > self.handler.ttl:
            logger.warning(
                "%s keeps messages %.0f s, longer than the ttl of %s's keys (%.0f s): a "
                "message redelivered after its key expired would run again; give "
                "sqs_handler(ttl=) at least the retention period", self.queue_url,
                retention, self.handler.namespace, self.handler.ttl)

    @property
    def extended(self) -> int:
        """Messages whose visibility the heartbeat extended so far."""
        return self._visibility.extended

    # -- one batch ---------------------------------------------------------------------
    def poll(self, stop: threading.Event | None = None) -> list[Outcome]:
        """One long-poll receive and its messages applied in order; the processed ones
        deleted in one batch call, the others left for redelivery or dead-lettered.
        ``stop`` set between messages: the rest are made visible again at once. On a FIFO
        queue, the messages of a group after one that was not processed are not run in
        this batch (they come back after it, in order)."""
        since = time.monotonic()
        reply = self.client.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=self.max_messages,
            WaitTimeSeconds=self.wait_time, VisibilityTimeout=self.visibility_timeout,
            MessageAttributeNames=["All"], **self._system_attributes)
        messages: list[dict[str, Any]] = reply.get("Messages", [])
        if not messages:
            return []
        self.stats["received"] += len(messages)
        self._visibility.track([m["ReceiptHandle"] for m in messages], since)
        outcomes: list[Outcome] = []
        to_delete: list[dict[str, Any]] = []
        later: list[tuple[dict[str, Any], float]] = []
        blocked: set[str] = set()  # FIFO message groups with a failed message in this batch
        taken = 0  # messages handled (processed or held back), in order
        try:
            for m in messages:
                if stop is not None and stop.is_set():
                    break
                group = (m.get("Attributes") or {}).get("MessageGroupId")
                if group is not None and group in blocked:
                    # FIFO: a later message of a group whose earlier one failed must not
                    # overtake it; SQS holds the group back while the failed one is away
                    self._visibility.forget([m["ReceiptHandle"]])
                    later.append((m, 0.0))
                    taken += 1
                    continue
                outcome = self.handler.process(m)
                outcomes.append(outcome)
                self.stats[outcome.status.value] += 1
                action, delay = self._decide(m, outcome)
                if action == "delete":
                    to_delete.append(m)
                else:
                    self._visibility.forget([m["ReceiptHandle"]])
                    if delay is not None:
                        later.append((m, delay))
                    if group is not None and self.fifo:
                        blocked.add(group)
                taken += 1
        finally:
            # also on KeyboardInterrupt: what committed is deleted, the rest made visible
            deleting = {id(m) for m in to_delete}
            self._visibility.forget(m["ReceiptHandle"] for m in messages
                                    if id(m) not in deleting)
            try:
                self._delete(to_delete)
            finally:
                self._visibility.forget(m["ReceiptHandle"] for m in to_delete)
                not_run = [(m, 0.0) for m in messages[taken:]]
                self._set_visibility(later + not_run)
        return outcomes

    def _decide(self, m: dict[str, Any], outcome: Outcome) -> tuple[str, float | None]:
        """("delete" | "leave", visibility delay or None) for one outcome; dead-letters
        (sends to our dead-letter queue) on the way when it is time."""
        status = outcome.status
        if status in DONE:
            return "delete", None
        receives = _receive_count(m)
        dlq = self.dead_letter_queue_url
        if status is Status.RETRY:
            exc = outcome.error
            wait = exc.retry_after if isinstance(exc, AlreadyInProgress) else None
            return "leave", wait if wait is not None else self._delay(m, receives)
        if dlq is None:
            logger.warning("SQS message %s %s (receive %d): %r; left to the queue's redrive "
                           "policy", outcome.message_id, status.value, receives, outcome.error)
            if status is Status.POISON:  # kept as failed in the store: it never runs again
                return "delete", None
            return "leave", self._delay(m, receives)
        if status is Status.FAILED and receives < self.max_receives:
            logger.info("SQS message %s failed (receive %d of %d): %r", outcome.message_id,
                        receives, self.max_receives, outcome.error)
            return "leave", self._delay(m, receives)
        if self._dead_letter(m, outcome):
            return "delete", None
        return "leave", self._delay(m, receives)

    def _delay(self, m: dict[str, Any], receives: int) -> float | None:
        spec = self.retry_delay
        if spec is None or isinstance(spec, (int, float)):
            return spec
        try:
            message: SqsMessage | None = self.handler.parse(m)
        except Exception:
            message = None
        return float(spec(message, receives))

    def _dead_letter(self, m: dict[str, Any], outcome: Outcome) -> bool:
        """Send the message to our dead-letter queue with its error; True when sent."""
        error = outcome.error
        ours: dict[str, dict[str, str]] = {
            ERROR_TYPE_ATTRIBUTE: {"DataType": "String",
                                   "StringValue": type(error).__name__},
            ERROR_ATTRIBUTE: {"DataType": "String",
                              "StringValue": (str(error) or type(error).__name__)[:1000]},
            SOURCE_MESSAGE_ID_ATTRIBUTE: {"DataType": "String",
                                          "StringValue": str(m.get("MessageId"))},
            RECEIVE_COUNT_ATTRIBUTE: {"DataType": "Number",
                                      "StringValue": str(_receive_count(m))},
        }
        theirs = {k: {f: v[f] for f in ("DataType", "StringValue", "BinaryValue") if f in v}
                  for k, v in (m.get("MessageAttributes") or {}).items() if k not in ours}
        kept = dict(list(theirs.items())[:_MAX_ATTRIBUTES - len(ours)])
        if len(kept) < len(theirs):
            logger.warning("SQS message %s: %d message attribute(s) dropped to make room "
                           "for the error", m.get("MessageId"), len(theirs) - len(kept))
        params: dict[str, Any] = {
            "QueueUrl": self.dead_letter_queue_url, "MessageBody": m.get("Body") or "-",
            "MessageAttributes": {**kept, **ours}}
        if str(self.dead_letter_queue_url).endswith(".fifo"):
            attrs = m.get("Attributes") or {}
            params["MessageGroupId"] = attrs.get("MessageGroupId", "idempotent-dead-letter")
            params["MessageDeduplicationId"] = str(m.get("MessageId"))
        try:
            self.client.send_message(**params)
        except Exception:
            self.stats["dead_letter_failed"] += 1
            logger.exception("SQS message %s: could not be dead-lettered; left in the queue",
                             m.get("MessageId"))
            return False
        self.stats["dead_lettered"] += 1
        logger.error("SQS message %s dead-lettered (%s): %s", m.get("MessageId"),
                     outcome.status.value, ours[ERROR_ATTRIBUTE]["StringValue"])
        return True

    def _delete(self, messages: Sequence[dict[str, Any]]) -> None:
        """DeleteMessageBatch, 10 a call. Entries that failed on the server side are
        retried (``delete_attempts``); the others (an expired receipt handle: the message
        was received again meanwhile) are counted and logged. An undeleted message comes
        back, finds its key recorded and is deleted then: nothing is lost or redone."""
        for chunk in _chunks(messages):
            pending = {str(i): m["ReceiptHandle"] for i, m in enumerate(chunk)}
            try:
                for attempt in self._retrying:
                    with attempt:
                        self._delete_entries(pending)
            except Exception as exc:
                self.stats["delete_failed"] += len(pending)
                logger.warning("SQS: %d processed message(s) not deleted (%r); they will be "
                               "received again and deleted as duplicates", len(pending), exc)

    def _delete_entries(self, pending: dict[str, str]) -> None:
        """One DeleteMessageBatch of ``pending`` (entry id -> receipt handle), which keeps
        only the entries worth another try; `_EntriesFailed` when there are some."""
        reply = self.client.delete_message_batch(
            QueueUrl=self.queue_url,
            Entries=[{"Id": i, "ReceiptHandle": r} for i, r in pending.items()])
        for done in reply.get("Successful", ()):
            pending.pop(done["Id"], None)
            self.stats["deleted"] += 1
        for failure in reply.get("Failed", ()):
            if failure.get("SenderFault", True):
                pending.pop(failure["Id"], None)
                self.stats["delete_failed"] += 1
                logger.warning("SQS: message not deleted (%s: %s); it will be received again "
                               "and deleted as a duplicate", failure.get("Code"),
                               failure.get("Message"))
        if pending:
            raise _EntriesFailed(sorted(pending))

    def _set_visibility(self, entries: Sequence[tuple[dict[str, Any], float]]) -> None:
        """Make messages visible again after their delay (one batch call per 10)."""
        for chunk in _chunks(list(entries)):
            try:
                reply = self.client.change_message_visibility_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"],
                              "VisibilityTimeout": _seconds(delay)}
                             for i, (m, delay) in enumerate(chunk)])
            except Exception:
                logger.warning("SQS: could not set the retry delay of %d message(s); they "
                               "come back when their visibility timeout ends", len(chunk),
                               exc_info=True)
                continue
            if reply.get("Failed"):
                logger.warning("SQS: retry delay not set: %s", reply["Failed"])

    # -- the loop ----------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, *,
            max_idle_polls: int | None = None,
            on_outcome: Callable[[Outcome], None] | None = None) -> None:
        """Poll until ``stop`` is set (checked between messages and between polls), or
        until ``max_idle_polls`` receives in a row returned nothing. ``on_outcome`` gets
        every `Outcome` (for logs and metrics), after its batch was deleted. A failing
        receive is logged and retried with backoff, up to 30 s apart."""
        idle = errors = 0
        while stop is None or not stop.is_set():
            try:
                outcomes = self.poll(stop)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                errors += 1
                pause = min(0.1 * 2 ** min(errors, 9), 30.0)
                logger.warning("SQS receive failed (%r); again in %.1f s", exc, pause)
                if stop is not None:
                    stop.wait(pause)
                else:
                    time.sleep(pause)
                continue
            errors = 0
            if on_outcome is not None:
                for outcome in outcomes:
                    on_outcome(outcome)
            idle = 0 if outcomes else idle + 1
            if max_idle_polls is not None and idle >= max_idle_polls:
                return

    def close(self) -> None:
        """Stop the visibility heartbeat (the client stays yours)."""
        self._visibility.close()

    def __enter__(self) -> SqsConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _receive_count(m: Mapping[str, Any]) -> int:
    try:
        return int((m.get("Attributes") or {}).get("ApproximateReceiveCount", 0))
    except (TypeError, ValueError):
        return 0


def _seconds(delay: float) -> int:
    """A visibility timeout SQS takes: whole seconds, 0..43200."""
    if not math.isfinite(delay):
        return 43_200
    return min(max(math.ceil(delay), 0), 43_200)


# -- the outbox's publisher ------------------------------------------------------------
#: The message attribute that carries an outbox entry's id: key a consumer of those
#: messages with ``message_attribute(OUTBOX_ID_ATTRIBUTE)``, so a re-publish is a duplicate.
OUTBOX_ID_ATTRIBUTE = "idempotent-message-id"


class SqsPublisher:
    """Publishes `idempotent.outbox` entries to SQS: the entry's target is the queue URL,
    its body the message body (JSON), and its id the `OUTBOX_ID_ATTRIBUTE` attribute (on
    a FIFO queue also the deduplication id, hashed to fit, and by default the group).

    ``group``: a FIFO queue's ``MessageGroupId`` for an entry (default: its id, so no
    ordering between messages)."""

    def __init__(self, client: Any, name: str = "sqs", *,
                 group: Callable[[Any], str] | None = None) -> None:
        self.client = client
        self.name = name
        self.group = group

    def publish(self, entry: Any) -> None:
        params: dict[str, Any] = {
            "QueueUrl": entry.target,
            "MessageBody": json.dumps(entry.body, sort_keys=True, separators=(",", ":")),
            "MessageAttributes": {OUTBOX_ID_ATTRIBUTE: {"DataType": "String",
                                                         "StringValue": entry.id}},
        }
        if entry.target.endswith(".fifo"):
            import hashlib

            params["MessageDeduplicationId"] = hashlib.sha256(entry.id.encode()).hexdigest()
            params["MessageGroupId"] = self.group(entry) if self.group else params[
                "MessageDeduplicationId"]
        self.client.send_message(**params)
