"""The exceptions survive the ways task queues carry them back to a caller."""

from __future__ import annotations

import pickle
import sys

import pytest

import idempotent
from idempotent import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    Record,
    State,
    StoreUnavailable,
)

# every module that defines errors, so the list does not depend on what ran before
for _name in ("idempotent.outbox", "idempotent.integrations.celery",
              "idempotent.integrations.kafka", "idempotent.integrations.sqs",
              "idempotent.integrations.amqp", "idempotent.integrations.aio_pika",
              "idempotent.integrations.asgi", "idempotent.integrations.wsgi"):
    __import__(_name)

RECORD = Record("ns", "k", State.COMPLETED, "f" * 64, b"{}", None, None, 1.0, 2.0, 3.0)


def _every_error_class() -> list[type[IdempotencyError]]:
    found, todo = [], [IdempotencyError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_every_error_builds_from_its_message_alone(cls: type[IdempotencyError]) -> None:
    """cls(message) works (Celery's JSON result backend rebuilds errors that way)."""
    exc = cls("boom")
    assert str(exc) == "boom" and exc.key is None and isinstance(exc, IdempotencyError)
    # and every one is public: the core's from the package, an integration's (or the
    # outbox's) from its own module
    if cls.__module__ == "idempotent.exceptions":
        assert getattr(idempotent, cls.__name__) is cls
    else:
        module = sys.modules[cls.__module__]
        assert cls.__name__ in module.__all__ and getattr(module, cls.__name__) is cls


def test_pickle_keeps_the_type_and_the_data() -> None:
    """A pickled error comes back as the same class with its keyword-only data."""
    conflict = IdempotencyKeyConflict("other payload", namespace="ns", key="k",
                                      record=RECORD, fingerprint="a" * 64)
    back = pickle.loads(pickle.dumps(conflict))
    assert type(back) is IdempotencyKeyConflict
    assert (str(back), back.namespace, back.key, back.record, back.fingerprint) == (
        "other payload", "ns", "k", RECORD, "a" * 64)
    busy = pickle.loads(pickle.dumps(
        AlreadyInProgress("busy", namespace="ns", key="k", lease_until=9.0, retry_after=2.5)))
    assert (type(busy), busy.lease_until, busy.retry_after) == (AlreadyInProgress, 9.0, 2.5)
    down = pickle.loads(pickle.dumps(
        StoreUnavailable("down", cause=ConnectionError("refused"), key="k")))
    assert type(down) is StoreUnavailable and str(down.cause) == "refused"
