"""Every exception `idempotent` raises.

One root, :class:`IdempotencyError`; each subclass carries the data a caller needs to
decide what to do (the key, the stored record, the cause).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._record import Record


class IdempotencyError(Exception):
    """Root of every error raised by `idempotent`.

    Every class can be built from its message alone (``cls(message)``), its data then
    None, and pickles with its data: so a task queue that sends exceptions back to the
    caller (Celery's result backends: by type name and message with JSON, whole with
    pickle) gives back the same class.
    """

    def __init__(self, message: str, *, namespace: str | None = None, key: str | None = None):
        super().__init__(message)
        self.namespace = namespace
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        # the default rebuilds with cls(*args), which loses the keyword-only data
        return _rebuild, (type(self), self.args, self.__dict__.copy())


def _rebuild(
    cls: type[IdempotencyError], args: tuple[object, ...], data: dict[str, object]
) -> IdempotencyError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(data)
    return exc


class MissingIdempotencyKey(IdempotencyError, LookupError):
    """The message carries no idempotency key (absent, ``None`` or empty).

    Nothing was recorded and the handler did not run; the message should be
    dead-lettered or fixed, not processed without protection.
    """


class InvalidIdempotencyKey(IdempotencyError, ValueError):
    """A key, namespace or scope that no store can hold exactly: it contains a NUL
    character or a lone surrogate (text that is not valid UTF-8). Refused before anything
    is written, on every store: a store that silently cut or replaced such a character
    would make two messages one key."""


class IdempotencyKeyConflict(IdempotencyError, ValueError):
    """A key was reused with another payload: its fingerprint differs from the first one.

    ``record`` is the stored record of the first message; ``fingerprint`` the new one.
    """

    def __init__(
        self,
        message: str,
        *,
        namespace: str | None = None,
        key: str | None = None,
        record: Record | None = None,
        fingerprint: str | None = None,
    ):
        super().__init__(message, namespace=namespace, key=key)
        self.record = record
        self.fingerprint = fingerprint


class AlreadyInProgress(IdempotencyError):
    """Another worker holds the key right now; try again after ``retry_after`` seconds.

    ``lease_until`` is the epoch time at which that worker's lease expires (``None`` in
    transactional mode, where the other worker holds a row lock instead of a lease).
    """

    def __init__(
        self,
        message: str,
        *,
        namespace: str | None = None,
        key: str | None = None,
        lease_until: float | None = None,
        retry_after: float = 1.0,
    ):
        super().__init__(message, namespace=namespace, key=key)
        self.lease_until = lease_until
        self.retry_after = retry_after


class IncompatibleRecord(IdempotencyError):
    """The store holds something under this key that this version cannot read: a record
    of another format version, or a value that is not a record. It is left untouched."""


class EvictionPolicyError(IdempotencyError):
    """The Redis server may evict records: its ``maxmemory-policy`` is not ``noeviction``.

    Under memory pressure such a server deletes keys before their time, a completed key
    among them, and the redelivery of its message then runs the handler (charges) again.
    Raised by every operation of the store, before anything is written; ``policy`` names
    the setting found. Set ``maxmemory-policy noeviction`` or, for a cache where a re-run
    is acceptable, make the store with ``allow_eviction=True``.
    """

    def __init__(self, message: str, *, namespace: str | None = None, key: str | None = None,
                 policy: str | None = None):
        super().__init__(message, namespace=namespace, key=key)
        self.policy = policy


class LeaseLost(IdempotencyError):
    """This worker's lease was taken over (it expired); its result was not stored.

    The new owner's record is untouched: a worker that lost its lease never overwrites it.
    """


class PreviousAttemptFailed(IdempotencyError):
    """The first attempt for this key failed with an error kept as ``failed``.

    Raised for duplicates of a message whose handler raised one of the exception types
    given in ``keep_failures``; ``record.result`` holds the error's type and message.
    """

    def __init__(
        self,
        message: str,
        *,
        namespace: str | None = None,
        key: str | None = None,
        record: Record | None = None,
    ):
        super().__init__(message, namespace=namespace, key=key)
        self.record = record


class ResultNotSerializable(IdempotencyError, TypeError):
    """The handler's result cannot be encoded by the serializer (or is larger than the
    store holds).

    Raised in transactional mode, where the handler's writes were rolled back with it:
    nothing was recorded and a redelivery runs again. In lease mode the handler's effect
    has happened, so the key is completed anyway (see `ResultNotStored`) and the call
    returns the value.
    """


class ResultNotStored(IdempotencyError):
    """A duplicate of a lease-mode key whose handler ran once but whose result could not
    be stored (not serialisable, or too large). The message was processed: acknowledge
    it, do not run it again. ``record`` is the stored record."""

    def __init__(
        self,
        message: str,
        *,
        namespace: str | None = None,
        key: str | None = None,
        record: Record | None = None,
    ):
        super().__init__(message, namespace=namespace, key=key)
        self.record = record


class TransactionEnded(IdempotencyError, RuntimeError):
    """The handler tried to commit or roll back the transaction its key is recorded in.

    Refused: a commit would make the handler's effect durable without its key (a
    redelivery would run it again), a rollback would drop the claimed key while the
    handler went on writing. To recover from an error inside the handler, use a
    SAVEPOINT (``connection.begin_nested()`` / ``session.begin_nested()``); to give up,
    raise.
    """


class StoreUnavailable(IdempotencyError):
    """The store kept failing with transient errors until the retry policy gave up.

    ``__cause__`` (and ``cause``) is the last error. Nothing was recorded as completed.
    """

    def __init__(
        self,
        message: str,
        *,
        cause: BaseException | None = None,
        namespace: str | None = None,
        key: str | None = None,
    ):
        super().__init__(message, namespace=namespace, key=key)
        self.cause = cause
