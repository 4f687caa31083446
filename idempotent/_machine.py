"""The record state machine: what a delivery does given what the store holds.

::

    (absent) --claim--> in_progress --complete--> completed --ttl--> (absent)
                            |   \\--release (handler error)--> (absent)
                            |    \\-complete(failed) (kept error)--> failed --ttl--> (absent)
                            \\--lease runs out--> may be claimed again (new token)

Transactional mode is the same machine with the lease replaced by the row lock of an
uncommitted insert: ``in_progress`` is never visible to others, a crash is a rollback.

Stores implement the arrows atomically; this module decides what a caller gets when the
arrow it asked for was refused.
"""

from __future__ import annotations

import json
from typing import Any

from ._record import Record, State
from .exceptions import AlreadyInProgress, IdempotencyKeyConflict, PreviousAttemptFailed
from .serializers import Serializer


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


def replay(record: Record, fingerprint: str | None, serializer: Serializer, now: float) -> Any:
    """What a duplicate delivery gets: the first result, or the error that explains why not."""
    check_fingerprint(record, fingerprint)
    if record.state is State.COMPLETED:
        return None if record.result is None else serializer.loads(record.result)
    if record.state is State.FAILED:
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
        retry_after=max(0.05, (until - now) if until is not None else 1.0),
    )


def failure_result(exc: BaseException) -> bytes:
    """What a kept failure stores: the error's type and message, never the object."""
    return json.dumps({"error": type(exc).__qualname__, "message": str(exc)}).encode()


def describe_failure(record: Record) -> str:
    if not record.result:
        return "unknown error"
    data = json.loads(record.result)
    return f"{data.get('error')}: {data.get('message')}"
