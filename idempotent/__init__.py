"""idempotent: effectively-exactly-once message handlers under at-least-once delivery.

The whole public API is re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._context import current, current_key
from ._decorator import idempotent
from ._record import Claimed, Completed, InProgress, Record, State, StateCount, StoreStats
from .events import Event, add_listener, listening, remove_listener
from .exceptions import (
    AlreadyInProgress,
    EvictionPolicyError,
    IdempotencyError,
    IdempotencyKeyConflict,
    IncompatibleRecord,
    InvalidIdempotencyKey,
    LeaseLost,
    MissingIdempotencyKey,
    PreviousAttemptFailed,
    ResultNotSerializable,
    ResultNotStored,
    StoreUnavailable,
    TransactionEnded,
)
from .retry import is_transient, no_retry, transient_retry
from .serializers import JSONSerializer, Serializer
from .stores import DEFAULT_LEASE, DEFAULT_TTL, MemoryStore, SqlStore, Store, open_store

__version__ = "0.2.0"

if TYPE_CHECKING:
    from .stores.redis import RedisStore


def __getattr__(name: str) -> Any:
    # RedisStore needs redis-py (the ``redis`` extra): imported on first use only.
    if name == "RedisStore":
        from .stores.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "AlreadyInProgress",
    "Claimed",
    "Completed",
    "Event",
    "EvictionPolicyError",
    "IdempotencyError",
    "IdempotencyKeyConflict",
    "InProgress",
    "IncompatibleRecord",
    "InvalidIdempotencyKey",
    "JSONSerializer",
    "LeaseLost",
    "MemoryStore",
    "MissingIdempotencyKey",
    "PreviousAttemptFailed",
    "Record",
    "RedisStore",
    "ResultNotSerializable",
    "ResultNotStored",
    "Serializer",
    "SqlStore",
    "State",
    "StateCount",
    "Store",
    "StoreStats",
    "StoreUnavailable",
    "TransactionEnded",
    "add_listener",
    "current",
    "current_key",
    "idempotent",
    "is_transient",
    "listening",
    "no_retry",
    "open_store",
    "remove_listener",
    "transient_retry",
]
