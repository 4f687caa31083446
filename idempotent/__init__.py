"""idempotent: effectively-exactly-once message handlers under at-least-once delivery.

The whole public API is re-exported here.
"""

from ._context import current, current_key
from ._decorator import idempotent
from ._record import Claimed, Completed, InProgress, Record, State
from .exceptions import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    LeaseLost,
    MissingIdempotencyKey,
    PreviousAttemptFailed,
    ResultNotSerializable,
    StoreUnavailable,
)
from .retry import is_transient, no_retry, transient_retry
from .serializers import JSONSerializer, Serializer
from .stores import DEFAULT_LEASE, DEFAULT_TTL, MemoryStore, SqlStore, Store

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "AlreadyInProgress",
    "Claimed",
    "Completed",
    "IdempotencyError",
    "IdempotencyKeyConflict",
    "InProgress",
    "JSONSerializer",
    "LeaseLost",
    "MemoryStore",
    "MissingIdempotencyKey",
    "PreviousAttemptFailed",
    "Record",
    "ResultNotSerializable",
    "Serializer",
    "SqlStore",
    "State",
    "Store",
    "StoreUnavailable",
    "current",
    "current_key",
    "idempotent",
    "is_transient",
    "no_retry",
    "transient_retry",
]
