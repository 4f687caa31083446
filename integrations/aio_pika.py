"""The asyncio form of `idempotent.integrations.amqp`, for aio-pika.

::

    from idempotent.integrations.aio_pika import Consumer

    async def apply_payment(message: Message, *, session: AsyncSession) -> dict: ...

    consumer = Consumer(apply_payment, store, queue="payments", key="payment_id")
    await consumer.run("amqp://guest:guest@localhost/")     # until consumer.stop()

The same `Processor` decides every delivery as for pika: ack after commit, duplicates
acked without running, store faults nacked with requeue, failures republished with their
count and dead-lettered at ``max_deliveries``, bad input dead-lettered at once (see
`idempotent.integrations.amqp`). An ``async def`` handler is awaited (transactional mode
needs a `SqlStore` on an async engine); a sync handler runs in a worker thread, so the
event loop keeps the connection's heartbeats going however long it runs. Up to
``prefetch`` messages are processed at once. After a connection loss (or a channel closed
by the broker) the consumer connects again and consumes again, and the broker redelivers
what was unacked. This is the pika consumer's loop, not aio-pika's robust connection: one
behaviour for both, and a channel the broker closed (``consumer_timeout``) is opened again
with the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

try:
    import aio_pika
    import aio_pika.exceptions
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "idempotent.integrations.aio_pika needs aio-pika: pip install 'idempotent-py[aio-pika]'"
    ) from exc

from idempotent.stores import Store

from .amqp import (
    DELIVERY_COUNT,
    Ack,
    Message,
    Processor,
    Republish,
    Requeue,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

__all__ = ["Consumer", "Message"]

logger = logging.getLogger("idempotent.amqp")


class Consumer:
    """An aio-pika consumer of one queue, running ``handler`` once per key. Arguments:
    those of `idempotent.integrations.amqp.Processor`, and ``prefetch`` (default 10),
    ``dead_letter_exchange`` / ``dead_letter_routing_key`` and ``reconnect_delay`` as for the
    pika `Consumer`."""

    def __init__(self, handler: Callable[..., Any], store: Store, *, queue: str,
                 prefetch: int = 10, dead_letter_exchange: str | None = None,
                 dead_letter_routing_key: str | None = None, reconnect_delay: float = 1.0,
                 **options: Any) -> None:
        self.reconnect_delay = reconnect_delay
        self.processor = Processor(handler, store, queue=queue, **options)
        self.queue = queue
        self.prefetch = prefetch
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_routing_key = dead_letter_routing_key
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: AbstractChannel | None = None

    async def run(self, url: str | AbstractConnection, *,
                  on_ready: Callable[[], Any] | None = None) -> None:
        """Consume until `stop`. ``url``: an AMQP URL, or a connection of the caller's.

        With a URL the consumer owns its connections: after a connection loss (a broker
        restart) or a channel closed by the broker (``consumer_timeout``) it connects again
        after ``reconnect_delay`` seconds and consumes again; the broker redelivers what was
        not acked. With a connection of the caller's it consumes on it once, until `stop`
        or until that connection or its channel closes. ``on_ready`` is called each time the
        consumer is registered."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if not isinstance(url, str):
            await self._session(url, on_ready)
            return
        while not self._stop.is_set():
            try:
                connection = await aio_pika.connect(url)
            except (aio_pika.exceptions.AMQPError, OSError, asyncio.TimeoutError) as exc:
                logger.warning("%s: cannot connect (%r); retrying", self.queue, exc)
                await self._pause()
                continue
            try:
                await self._session(connection, on_ready)
            except (aio_pika.exceptions.AMQPError, OSError, asyncio.TimeoutError) as exc:
                logger.warning("%s: connection lost (%r); reconnecting", self.queue, exc)
            finally:
                if not connection.is_closed:
                    with contextlib.suppress(Exception):  # already broken: nothing to close
                        await connection.close()
            if not self._stop.is_set():
                await self._pause()

    async def _pause(self) -> None:
        """``reconnect_delay`` seconds, or less if `stop` is called meanwhile."""
        assert self._stop is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.reconnect_delay)

    async def _session(self, connection: AbstractConnection,
                       on_ready: Callable[[], Any] | None) -> None:
        """Consume on one connection until `stop`, or until it or its channel closes."""
        assert self._stop is not None
        channel = await connection.channel(publisher_confirms=True)
        self._channel = channel
        try:
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.declare_queue(self.queue, passive=True)
            tag = await queue.consume(self._on_message, no_ack=False)
            if on_ready is not None:
                on_ready()
            stop = asyncio.ensure_future(self._stop.wait())
            closed = asyncio.ensure_future(asyncio.wait(
                [asyncio.ensure_future(channel.closed()),
                 asyncio.ensure_future(connection.closed())],
                return_when=asyncio.FIRST_COMPLETED))
            try:
                await asyncio.wait([stop, closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (stop, closed):
                    waiter.cancel()
            if self._stop.is_set() and not channel.is_closed:
                await queue.cancel(tag)
                await channel.close()
        finally:
            self._channel = None

    def stop(self) -> None:
        """Stop consuming (callable from any thread, or from the loop)."""
        loop, event = self._loop, self._stop
        if loop is None or event is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        processor = self.processor

        def build() -> Message:
            return processor.message(
                incoming.body, message_id=incoming.message_id, headers=incoming.headers,
                routing_key=incoming.routing_key or "", exchange=incoming.exchange or "",
                redelivered=bool(incoming.redelivered), content_type=incoming.content_type,
                properties=incoming)

        outcome = await processor.aprocess(build)
        channel = self._channel
        if isinstance(outcome, Ack):
            await incoming.ack()
        elif isinstance(outcome, Requeue):
            await asyncio.sleep(outcome.delay)
            await incoming.nack(requeue=True)
        elif isinstance(outcome, Republish):
            await asyncio.sleep(outcome.delay)
            assert channel is not None
            await channel.default_exchange.publish(
                _copy(incoming, outcome.headers), routing_key=self.queue)
            await incoming.ack()
        elif self.dead_letter_exchange is None:
            await incoming.reject(requeue=False)
        else:
            assert channel is not None
            exchange = await channel.get_exchange(self.dead_letter_exchange, ensure=False)
            await exchange.publish(
                _copy(incoming, outcome.headers),
                routing_key=self.dead_letter_routing_key or incoming.routing_key or "")
            await incoming.ack()


def _copy(incoming: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    """The message as received, with ``headers`` added (without the broker's own count and
    without ``user_id``/``expiration``: a copy must not be refused or expire)."""
    merged = {k: v for k, v in (incoming.headers or {}).items() if k != DELIVERY_COUNT}
    merged.update(headers)
    return aio_pika.Message(
        incoming.body, headers=merged, content_type=incoming.content_type,
        content_encoding=incoming.content_encoding, delivery_mode=incoming.delivery_mode,
        priority=incoming.priority, correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to, message_id=incoming.message_id,
        timestamp=incoming.timestamp, type=incoming.type, app_id=incoming.app_id)
