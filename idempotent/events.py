"""Events: what happened to each delivery, for metrics, tracing and logs.

A listener is any callable taking one `Event`. Register it for every handler with
`add_listener` (or the `listening` context manager), or for one handler with
``@idempotent(..., listeners=[...])``. Listeners run synchronously in the delivering
thread, after the fact they report; a listener that raises is logged and ignored, so it
can never break processing. Keep them quick (count, record, enqueue).

Every event is also logged on the ``idempotent`` logger, naming the namespace and key and
never the payload or the result: ``conflict``, ``lease_lost`` and ``result_not_stored`` at WARNING,
``store_retry`` at INFO, the others at DEBUG. With no listener registered and DEBUG off,
a delivery pays one cheap check for all of this.

The events (`Event.kind`):

============== ==========================================================================
claimed        the key is new (or its lease ran out): the handler runs now
duplicate      the key was processed before: the stored result (or failure) is replayed
conflict       the key came back with another payload (`IdempotencyKeyConflict`)
in_progress    another worker holds the key (`AlreadyInProgress`)
completed      the handler returned and its result is stored (transactional mode:
               committed, or recorded in the caller's transaction)
failed         the handler raised an exception listed in ``keep_failures``; kept as failed
released       the handler raised; the key is given back (transactional mode: rolled
               back) so a redelivery can run it
lease_lost     the handler finished but another worker had taken the key over: its
               result was not stored (`LeaseLost`)
result_not_    lease mode: the handler ran but its result cannot be stored (not JSON, or
stored         too large); the key is completed without it, duplicates get
               `ResultNotStored` (logged at WARNING)
store_retry    a transient store fault; the retry policy tries again
============== ==========================================================================

A delivery reports ``claimed`` and then one outcome; in transactional optimistic mode, a
delivery whose handler ran but lost the race for the key at commit reports ``claimed`` then
``duplicate``. A transient store fault that the retry policy cures adds ``store_retry``
events (and, in transactional mode, a ``released`` for the attempt rolled back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["EVENTS", "OUTBOX_EVENTS", "Event", "Listener", "add_listener", "listening",
           "remove_listener"]

#: Every event kind, in the order of a delivery's life.
EVENTS = (
    "claimed", "duplicate", "conflict", "in_progress", "completed", "failed", "released",
    "lease_lost", "result_not_stored", "store_retry",
)
#: The outbox's events (`idempotent.outbox`): ``namespace`` is ``publisher:target``,
#: ``key`` the message id.
OUTBOX_EVENTS = (
    "outbox_published", "outbox_republished", "outbox_confirmed", "outbox_publish_failed",
    "outbox_unconfirmed",
)

log = logging.getLogger("idempotent")

# (outbox_unconfirmed has its own WARNING line, on the idempotent.outbox logger)
_WARNING = frozenset({"conflict", "lease_lost", "result_not_stored"})


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to one delivery of ``key`` in ``namespace``.

    ``elapsed`` is in seconds: for ``claimed``, ``duplicate``, ``conflict`` and
    ``in_progress`` the store call that claimed or read the key (transactional mode:
    opening the transaction with it); for ``completed``, ``failed``, ``released`` and
    ``lease_lost`` the handler's run (transactional mode: handler and commit); for
    ``store_retry`` the time since the first attempt of that store call began.
    ``attempt`` (``store_retry`` only) is the number of the attempt that failed, from 1.
    ``error`` is the exception's class name (``failed``, ``released``, ``store_retry``),
    never its message, which may quote the payload.
    """

    kind: str
    namespace: str
    key: str
    elapsed: float | None = None
    attempt: int | None = None
    error: str | None = None


Listener = Callable[[Event], None]

#: Listeners of every handler. Mutated in place only, so that a module holding a reference
#: to it (the decorator's one cheap check) sees every change.
LISTENERS: list[Listener] = []


def add_listener(listener: Listener) -> Listener:
    """Call ``listener`` with the events of every handler; returns it (usable as a
    decorator)."""
    LISTENERS.append(listener)
    return listener


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``; a listener that was not registered is ignored."""
    if listener in LISTENERS:
        LISTENERS.remove(listener)


@contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Register ``listener`` for the events of every handler inside the block."""
    add_listener(listener)
    try:
        yield listener
    finally:
        remove_listener(listener)


def _detail(event: Event) -> str:
    parts = []
    if event.attempt is not None:
        parts.append(f"attempt {event.attempt} failed")
    if event.error is not None:
        parts.append(event.error)
    if event.elapsed is not None:
        parts.append(f"{event.elapsed * 1000:.2f} ms")
    return f" ({', '.join(parts)})" if parts else ""


def emit(event: Event, own: tuple[Listener, ...]) -> None:
    """Log ``event`` and hand it to ``own`` and the global listeners."""
    kind = event.kind
    level = (logging.WARNING if kind in _WARNING
             else logging.INFO if kind == "store_retry" else logging.DEBUG)
    if log.isEnabledFor(level):
        log.log(level, "%s %s/%s%s", kind, event.namespace, event.key, _detail(event),
                extra={"idempotent_event": kind, "idempotent_namespace": event.namespace,
                       "idempotent_key": event.key, "idempotent_elapsed": event.elapsed})
    for listener in (*own, *LISTENERS):
        try:
            listener(event)
        except Exception:
            log.exception("listener %r failed on the %s event of %s/%s; ignored",
                          listener, kind, event.namespace, event.key)
