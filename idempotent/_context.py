"""The key of the message being handled, for handlers that pass it downstream."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(slots=True)
class Current:
    """What the running handler may want to know about its own delivery (read-only by
    convention; not frozen, as it is built on every call)."""

    namespace: str
    key: str
    token: str | None  # lease token in lease mode; None in transactional mode


#: Set by the decorator around the handler call (``CURRENT.set`` / ``CURRENT.reset``).
CURRENT: contextvars.ContextVar[Current | None] = contextvars.ContextVar(
    "idempotent_current", default=None
)


def current_key() -> str:
    """The stored key of the message this handler is processing.

    Pass it as the idempotency key of downstream calls (a payment provider's
    ``Idempotency-Key``): that is what keeps external effects single in lease mode.
    Raises ``LookupError`` outside an idempotent handler.
    """
    cur = CURRENT.get()
    if cur is None:
        raise LookupError("current_key() is only available inside an @idempotent handler")
    return cur.key


def current() -> Current | None:
    """The namespace, key and lease token of the running handler, or ``None``."""
    return CURRENT.get()
