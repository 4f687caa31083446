"""The rules of a record, each written once and named.

::

    (absent) --claim--> in_progress --complete--> completed --ttl--> (absent)
                            |   \\--release (handler error)--> (absent)
                            |    \\-complete(failed) (kept error)--> failed --ttl--> (absent)
                            \\--lease runs out--> may be taken over (new token)

Transactional mode is the same machine with the lease replaced by the row lock of an
uncommitted insert: ``in_progress`` is never visible to others, a crash is a rollback.

The rules, by name (the SQL and the Lua that implement one say which):

* **CLAIMABLE** (`claimable`): a claim may take a key that is absent, past its
  ``expires_at``, or in progress with a lease that ran out (a *takeover*).
* **FENCED** (`owns`): complete, release and renew act only while the caller's token
  is the record's token; release and renew only while it is still in progress.
* **PURGEABLE** (`purgeable`): a purge deletes a record past ``expires_at`` (or created
  before a cut-off), never an in-progress record whose lease is live.
* **REPLAY** (`replay`): a duplicate gets the first result; a kept failure raises
  `PreviousAttemptFailed`; a completed key whose result could not be stored raises
  `ResultNotStored`; a live lease raises `AlreadyInProgress`; another payload raises
  `IdempotencyKeyConflict`.
* **WAKE**: a complete or a release of a key signals the duplicates waiting for it
  (``wait=``), where the store has a signal (Redis: ``PUBLISH`` on the record's name from
  the same script, when a waiter marked the record; PostgreSQL: a ``NOTIFY`` on the key's
  channel, sent after the complete or release by handlers that have ``wait=``); a waiter
  re-claims when signalled and also polls, backed off, so a lost signal only delays it.
* **STORE TIME**: every "now" above is the store's clock (PostgreSQL
  ``clock_timestamp()``, Redis ``TIME``, the local clock for SQLite and memory); a
  clock passed to a store replaces it, for tests only.

Stores implement the transitions atomically; this module decides what a caller gets.
"""

from __future__ import annotations

import json
from typing import Any

from ._record import Claimed, Completed, InProgress, Outcome, Record, State
from .exceptions import (
    AlreadyInProgress,
    IdempotencyKeyConflict,
    PreviousAttemptFailed,
    ResultNotStored,
)
from .serializers import Serializer

# Module constants: reading an enum member off its class costs ~70 ns in Python 3.11.
_IN_PROGRESS = State.IN_PROGRESS
_COMPLETED = State.COMPLETED

#: The result bytes of a completed key whose handler ran but whose result could not be
#: stored (not serialisable, or too large). Not valid JSON, so no result can equal it.
NOT_STORED_PREFIX = b"\x00idempotent:result-not-stored:"


# -- CLAIMABLE --------------------------------------------------------------------------
def claimable(record: Record | None, now: float) -> bool:
    """CLAIMABLE: absent, expired, or an in-progress lease that ran out."""
    if record is None or record.expires_at <= now:
        return True
    return (
        record.state is _IN_PROGRESS
        and record.lease_until is not None
        and record.lease_until <= now
    )


def is_takeover(record: Record | None, now: float) -> bool:
    """A claim of ``record`` takes another worker's lease over (rather than a new key)."""
    return (
        record is not None
        and record.state is _IN_PROGRESS
        and record.expires_at > now
        and record.lease_until is not None
        and record.lease_until <= now
    )


def outcome_of(record: Record, token: str, now: float) -> Outcome:
    """What a claim that found ``record`` (after any takeover) means for the caller."""
    if record.state is not _IN_PROGRESS:
        return Completed(record)
    if record.token == token:
        lease_until = record.lease_until
        assert lease_until is not None
        return Claimed(token, lease_until)
    return InProgress(record, now)


# -- FENCED -----------------------------------------------------------------------------
def owns(record: Record | None, token: str, *, in_progress: bool) -> bool:
    """FENCED: ``token`` owns ``record`` (and, for release/renew, it is in progress)."""
    if record is None or record.token != token:
        return False
    return record.state is _IN_PROGRESS or not in_progress


# -- PURGEABLE --------------------------------------------------------------------------
def purgeable(record: Record, now: float, created_before: float | None) -> bool:
    """PURGEABLE: expired (or created before ``created_before``), and not an in-progress
    record whose lease is live."""
    if record.expires_at > now and (created_before is None or record.created_at >= created_before):
        return False
    return not (
        record.state is _IN_PROGRESS
        and record.lease_until is not None
        and record.lease_until > now
    )


# -- REPLAY -----------------------------------------------------------------------------
def check_fingerprint(record: Record, fingerprint: str | None) -> None:
    """Raise `IdempotencyKeyConflict` when a key comes back with another payload."""
    if fingerprint is None or record.fingerprint is None or record.fingerprint == fingerprint:
        return
    raise IdempotencyKeyConflict(
        f"{record.namespace}: key {record.key!r} was first used with another payload "
        f"(fingerprint {record.fingerprint[:12]}…, now {fingerprint[:12]}…); not processed",
        namespace=record.namespace,
        key=record.key,
        record=record,
        fingerprint=fingerprint,
    )


def replay(record: Record, fingerprint: str | None, serializer: Serializer,
           now: float | None) -> Any:
    """REPLAY: what a duplicate delivery gets, the first result or the error that says
    why not. ``now`` is the store's time when it read the record (for ``retry_after``)."""
    check_fingerprint(record, fingerprint)
    state = record.state
    if state is _COMPLETED:
        result = record.result
        if result is None:
            return None
        if result.startswith(NOT_STORED_PREFIX):
            raise ResultNotStored(
                f"{record.namespace}: key {record.key!r} was processed once, but its result "
                f"could not be stored ({result[len(NOT_STORED_PREFIX):].decode(errors='replace')}"
                "); the handler does not run again",
                namespace=record.namespace,
                key=record.key,
                record=record,
            )
        return serializer.loads(result)
    if state is State.FAILED:
        raise PreviousAttemptFailed(
            f"{record.namespace}: key {record.key!r} failed before and the failure was kept: "
            f"{describe_failure(record)}",
            namespace=record.namespace,
            key=record.key,
            record=record,
        )
    until = record.lease_until
    raise AlreadyInProgress(
        f"{record.namespace}: key {record.key!r} is being processed by another worker",
        namespace=record.namespace,
        key=record.key,
        lease_until=until,
        retry_after=(max(0.05, until - now) if until is not None and now is not None
                     else 1.0),
    )


def not_stored(reason: str) -> bytes:
    """The result a key is completed with when its handler ran and its result cannot be
    stored: `replay` turns it into `ResultNotStored` for every duplicate."""
    return NOT_STORED_PREFIX + reason.encode("utf-8", "replace")[:500]


def failure_result(exc: BaseException) -> bytes:
    """What a kept failure stores: the error's type and message, never the object."""
    return json.dumps({"error": type(exc).__qualname__, "message": str(exc)}).encode()


def describe_failure(record: Record) -> str:
    if not record.result:
        return "unknown error"
    data = json.loads(record.result)
    return f"{data.get('error')}: {data.get('message')}"
