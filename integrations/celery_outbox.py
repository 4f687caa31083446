"""Celery tasks sent through the transactional outbox (`idempotent.outbox`).

    outbox = Outbox(store, [CeleryPublisher(app)])

    with Session(engine) as session, session.begin():
        session.add(Order(...))
        stage_task(outbox, session, apply_payment, (payment,))
    # committed: the task is published now; had the process died first, a relay
    # (`idempotent relay`) publishes it; had the transaction rolled back, never

The staged message carries the task id `send_once` would give it (from the business key),
so every publish of it, by the producer or a relay, is one task id, and the idempotent task
runs its body once. Its confirmation is the task's own record: the entry counts as
delivered once the worker has recorded the key, and is re-published until then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from idempotent import keys as _keys
from idempotent.exceptions import MissingIdempotencyKey
from idempotent.outbox import Entry, Outbox

from .celery import IdempotentTask, message_identity

__all__ = ["CeleryPublisher", "stage_task"]

#: apply_async options a staged task may carry (JSON values only)
_OPTIONS = frozenset({"queue", "routing_key", "exchange", "priority", "countdown", "expires",
                      "headers", "serializer"})


class CeleryPublisher:
    """Publishes outbox entries as Celery tasks (``app.send_task`` with the entry's id as
    the task id). ``name`` is ``"celery"`` unless given, for more than one app."""

    def __init__(self, app: Any, name: str = "celery") -> None:
        self.app = app
        self.name = name

    def publish(self, entry: Entry) -> None:
        body = entry.body
        self.app.send_task(entry.target, args=body.get("args", []),
                           kwargs=body.get("kwargs", {}), task_id=entry.id,
                           **body.get("options", {}))


def stage_task(
    outbox: Outbox,
    tx: Session | sa.Connection,
    task: Any,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    key: Any = None,
    publisher: str = "celery",
    **options: Any,
) -> str:
    """Stage ``task(*args, **kwargs)`` in ``tx``'s transaction; returns its task id.

    The task id is `send_once`'s (`task_id_for` of the business key, and the scope of a
    scoped task); an `IdempotentTask` with a business key is confirmed by its own record.
    ``options`` are ``apply_async`` options (``queue``, ``countdown``, ...). A call without
    a key raises `MissingIdempotencyKey` before anything is staged.
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"stage_task cannot carry the option(s) {sorted(unknown)}")
    key, scope, task_id = message_identity(task, args, kwargs, key, "stage_task")
    confirm = None
    if isinstance(task, IdempotentTask):
        text = _keys.as_key_text(key)
        if text is None:  # task_id_for has refused it already; kept for the type checker
            raise MissingIdempotencyKey(f"{task.name}: no business key", namespace=task.name)
        keyed_by_id, namespace = _record_of(task)
        stored = task_id if keyed_by_id else _keys.scoped(text, scope)
        confirm = (namespace, stored)
    return outbox.stage(
        tx, publisher=publisher, target=task.name, id=task_id, confirm=confirm,
        body={"args": list(args), "kwargs": dict(kwargs or {}), "options": options},
    )


def _record_of(task: IdempotentTask) -> tuple[bool, str]:
    """Whether the task is keyed by its task id, and the namespace of its records (once
    per task: a producer stages many)."""
    known: tuple[bool, str] | None = task.__dict__.get("_outbox_record_of")
    if known is None:
        namespace = (task._setting("idempotency_options") or {}).get("namespace", task.name)
        known = (task._setting("idempotency_key") is None, _keys.fit(namespace))
        task.__dict__["_outbox_record_of"] = known
    return known
