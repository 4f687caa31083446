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
``prefetch`` messages are processed at once. The connection is aio-pika's robust one: after
a connection loss it reconnects and consumes again, and the broker redelivers what was
unacked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

try:
    import aio_pika
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
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

__all__ = ["Consumer", "Message"]

logger = logging.getLogger("idempotent.amqp")


class Consumer:
    """An aio-pika consumer of one queue, running ``handler`` once per key. Arguments:
    those of `idempotent.integrations.amqp.Processor`, and ``prefetch`` (default 10),
    ``dead_letter_exchange`` / ``dead_letter_routing_key`` as for the pika `Consumer`."""

    def __init__(self, handler: Callable[..., Any], store: Store, *, queue: str,
                 prefetch: int = 10, dead_letter_exchange: str | None = None,
                 dead_letter_routing_key: str | None = None, **options: Any) -> None:
        self.processor = Processor(handler, store, queue=queue, **options)
        self.queue = queue
        self.prefetch = prefetch
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_routing_key = dead_letter_routing_key
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: AbstractChannel | None = None

    async def run(self, url: str | AbstractRobustConnection, *,
                  on_ready: Callable[[], Any] | None = None) -> None:
        """Consume until `stop`. ``url``: an AMQP URL (a robust connection is opened and
        closed here) or a connection of the caller's."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        own = isinstance(url, str)
        connection = await aio_pika.connect_robust(url) if isinstance(url, str) else url
        try:
            channel = await connection.channel(publisher_confirms=True)
            self._channel = channel
            await channel.set_qos(prefetch_count=self.prefetch)
            # declared (passively) through the robust channel, so a reconnection declares
            # it again and restores the consumer
            queue = await channel.declare_queue(self.queue, passive=True)
            tag = await queue.consume(self._on_message, no_ack=False)
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            await queue.cancel(tag)
            await channel.close()
        finally:
            self._channel = None
            if own:
                await connection.close()

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
