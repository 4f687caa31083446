"""Celery tasks that run once per idempotency key, on workers that crash and redeliver.

Two ways to declare one; both give the same task class::

    from idempotent.integrations.celery import IdempotentTask, idempotent_task

    @idempotent_task(app, store, key="payment_id")           # the decorator
    def apply_payment(payment: dict, session: Session) -> dict: ...

    @app.task(base=IdempotentTask, idempotency_store=store,  # or Celery's own decorator
              idempotency_key="payment_id")
    def apply_payment(payment: dict, session: Session) -> dict: ...

What the task does, per delivery (in ``__call__``, which runs in the worker's pool child):

* the key is the **task id** by default (Celery keeps it across retries and redeliveries),
  or a business key taken from the task's arguments (``key=``); a message passed by
  keyword (``apply.delay(payment=p)``) is the message passed by position: same key,
  same fingerprint;
* a task that takes ``session`` or ``connection``, with a `SqlStore`, runs in
  **transactional mode**: its writes and the key commit in one transaction; any other task
  runs in **lease mode**;
* a **duplicate** returns the stored result; the body does not run;
* `AlreadyInProgress` (another worker holds the key) becomes ``self.retry`` with a
  countdown of 1, 2, 4 ... seconds (``idempotency_backoff``), never beyond the end of the
  holder's lease (``retry_after``); `LeaseLost` (this run's lease ran out and
  another delivery took the key over) a retry that will find that delivery's result;
  `StoreUnavailable` a retry with exponential backoff. None of them is stopped by the
  task's ``max_retries`` (none is the message's fault; `StoreUnavailable` has its own
  limit, ``store_retries``, unlimited by default). They are counted apart from the task's
  own retries: in the message headers ``idempotent_retries`` (all of ours, for the
  backoff) and ``idempotent_store_retries`` (``store_retries``); Celery's
  ``request.retries`` and the task's ``max_retries``/``autoretry_for`` budget are left
  alone, for this message and for every other one. Such a retry publishes the message
  again (same task id, arguments and options) before the current one is acked; if that
  publish fails, the message is requeued, never acked as done;
* **bad input** (`MissingIdempotencyKey`, `IdempotencyKeyConflict`, a key of the wrong
  type) fails the task at once: FAILURE with the error in the result backend, an ERROR line
  in the worker log, ``task_failure`` sent, the message acked. No retry can fix the
  input, so it is not retried; it is not dropped silently either.

Defaults: ``acks_late=True``, ``reject_on_worker_lost=True`` and ``acks_on_timeout=False``,
so a message is acked only after its task returned, and a pool child killed mid-task
(SIGKILL, OOM, a hard ``time_limit``) sends its message back to the queue. A task that
always exceeds its hard time limit is therefore requeued again and again: give it a limit
it can meet (the worker logs "Hard time limit exceeded" each time). Run such workers with
``worker_prefetch_multiplier = 1``: a reserved but not started message is unacked too and
is redelivered if the worker dies.

Producer side: `send_once` publishes with a task id derived from a business key
(`task_id_for`: a UUID5 of the task name and the key, and of the scope for a scoped task),
so a double enqueue becomes two messages with one task id, which run the body once, and
two tenants' ``inv-1`` are two task ids.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import random
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

try:
    # celery ships no type hints
    from celery import Celery, Task  # type: ignore[import-untyped]
    from celery.exceptions import Reject, Retry  # type: ignore[import-untyped]
    from celery.result import AsyncResult  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "idempotent.integrations.celery needs Celery: pip install 'idempotent[celery]'"
    ) from exc

import sqlalchemy as sa

from idempotent import Store, idempotent
from idempotent import keys as _keys
from idempotent.exceptions import (
    AlreadyInProgress,
    LeaseLost,
    MissingIdempotencyKey,
    ResultNotStored,
    StoreUnavailable,
)
from idempotent.keys import canonical_json

logger = logging.getLogger("idempotent.celery")

__all__ = [
    "RETRIES_HEADER",
    "STORE_RETRIES_HEADER",
    "TASK_ID_NAMESPACE",
    "IdempotentTask",
    "idempotent_task",
    "send_once",
    "task_id_for",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The UUID5 namespace of the task ids `task_id_for` derives. Never change it: every task
#: id already sent would stop matching its redelivery's.
TASK_ID_NAMESPACE = uuid.UUID("6f1c7b0e-3d2a-5e8b-9c41-7a0d2f5e8b13")

_TX_PARAMS = ("session", "connection")
#: The pid that imported this module: a pool child forked from it inherited the store's
#: connection pool and must not use those connections (they belong to the parent).
_IMPORT_PID = os.getpid()
#: The message header that counts our retries of a message (`AlreadyInProgress`,
#: `LeaseLost`, `StoreUnavailable`), kept apart from Celery's ``request.retries``, which
#: counts only the task's own retries (``self.retry``, ``autoretry_for``).
RETRIES_HEADER = "idempotent_retries"
#: The header that counts the `StoreUnavailable` retries among them (``store_retries``).
STORE_RETRIES_HEADER = "idempotent_store_retries"

StoreSpec = Store | Callable[[], Store]


class IdempotentTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """A Celery task that runs its body once per idempotency key.

    Configure it with class attributes, or with the same names as keyword arguments of
    ``app.task(base=IdempotentTask, ...)``:

    * ``idempotency_store``: a `Store`, or a callable returning one (called once per worker
      process, so a store can be built after the fork);
    * ``idempotency_key``: None (the task id), the name of an argument of the task (or of an
      item/attribute of its first argument), or a callable over the task's arguments;
    * ``idempotency_options``: other keyword arguments of `idempotent` (``fingerprint``,
      ``ttl``, ``lease``, ``retry``, ``serializer``, ``keep_failures``, ``heartbeat``,
      ``optimistic``, ``scope``, ``namespace``; the namespace defaults to the task's name);
    * ``idempotency_backoff`` / ``idempotency_backoff_max``: seconds of the first / the
      longest retry countdown after `StoreUnavailable` or `AlreadyInProgress` (doubling
      with the message's retries, with jitter; for `AlreadyInProgress` never beyond the
      holder's lease);
    * ``idempotency_store_retries``: after `StoreUnavailable`, the task fails once the
      message has had this many `StoreUnavailable` retries (header
      ``idempotent_store_retries``); None: retry until the store is back. Meanwhile the
      message is never acked as done.
    """

    acks_late = True
    reject_on_worker_lost = True
    # A hard time_limit kills the pool child mid-task; its transaction rolled back, so the
    # message must go back to the queue, not be acked as done (Celery >= 5.7 requeues
    # when this is False). Failures (bad input) are still acked.
    acks_on_timeout = False
    acks_on_failure = True

    idempotency_store: StoreSpec | None = None
    idempotency_key: str | Callable[..., Any] | None = None
    idempotency_options: Mapping[str, Any] = {}
    idempotency_backoff: float = 1.0
    idempotency_backoff_max: float = 60.0
    idempotency_store_retries: int | None = None

    _idempotent_handler: Callable[..., Any] | None = None
    _idempotent_pid: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # ``app.task`` checks the arguments of a call against the function's signature when
        # it is sent; ``session``/``connection`` are given by the worker, not the caller.
        header = cls.__dict__.get("__header__")
        run = cls.__dict__.get("run")
        if header is None or run is None:
            return
        fn = run.__func__ if isinstance(run, staticmethod) else run
        given = [p for p in _TX_PARAMS if p in inspect.signature(fn).parameters]
        if given:
            check = header.__func__ if isinstance(header, staticmethod) else header
            cls.__header__ = staticmethod(_without(check, given))

    # -- the worker side ---------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handler = self._handler()
        if self.request_stack.top is not None:  # in a worker, or apply(): request is set
            return self._deliver(handler, args, kwargs)
        # called directly as a function: no task id, as Task.__call__ sets it up
        self.push_request(args=args, kwargs=kwargs)
        try:
            return self._deliver(handler, args, kwargs)
        finally:
            self.pop_request()

    def _deliver(self, handler: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        # a message passed by keyword is the message passed by position: one key, one
        # fingerprint (and send_once derives its task id the same way)
        args, kwargs = _by_position(self._idempotent_params, args, kwargs)
        try:
            return handler(*args, **kwargs)
        except AlreadyInProgress as exc:
            # another delivery holds the key. Its lease may run long while it finishes
            # soon, and a retry that finds the key done is cheap (a stored result): come
            # back after 1, 2, 4 ... x backoff, never later than the lease's end
            countdown = min(max(exc.retry_after, 0.1), self._backoff()) * random.uniform(1.0, 1.5)
            raise self._retry_later(exc, countdown) from exc
        except LeaseLost as exc:
            # our lease ran out and another delivery took the key over: its result is the
            # one that counts; come back for it rather than report a failure
            countdown = self.idempotency_backoff * random.uniform(1.0, 1.5)
            raise self._retry_later(exc, countdown) from exc
        except StoreUnavailable as exc:
            countdown = self._backoff() * random.uniform(0.5, 1.0)
            raise self._retry_later(exc, countdown, store=True) from exc
        except ResultNotStored as exc:
            # a duplicate of a lease-mode run whose result could not be stored: the body
            # ran once; this copy succeeds with no result rather than overwrite the first
            # run's SUCCESS with a FAILURE (a producer that resubmits failures would
            # charge again)
            logger.warning("%s", exc)
            return None

    def _backoff(self) -> float:
        """backoff x 2^(our retries of this message), at most backoff_max seconds."""
        n = min(_header_count(self.request, RETRIES_HEADER), 30)
        return float(min(self.idempotency_backoff * 2.0**n, self.idempotency_backoff_max))

    def _retry_later(self, exc: Exception, countdown: float, *, store: bool = False
                     ) -> Exception:
        """Publish this message again (same task id, arguments and options) after
        ``countdown`` seconds, counted in our own headers.

        Not ``self.retry``: that advances ``request.retries``, which the task's own
        ``max_retries``/``autoretry_for`` budget reads, and ``retry(max_retries=...)``
        stays on the task object (``override_max_retries``) for every later message the
        process runs. A failed publish requeues the message instead of Celery's default
        (reject without requeue, which drops it)."""
        request = self.request
        if request.called_directly or request.is_eager:
            # no worker (a direct call, apply(), task_always_eager): Celery would run the
            # retry at once, recursively and without the countdown; raise the error instead
            return exc
        ours = _header_count(request, RETRIES_HEADER)
        store_retries = _header_count(request, STORE_RETRIES_HEADER)
        if store:
            limit = self.idempotency_store_retries
            if limit is not None and store_retries >= limit:
                return exc  # the store stayed down: FAILURE with StoreUnavailable
            store_retries += 1
        headers = {**(request.headers or {}), RETRIES_HEADER: ours + 1,
                   STORE_RETRIES_HEADER: store_retries}
        sig = self.signature_from_request(request, countdown=countdown, headers=headers)
        try:
            sig.apply_async()
        except Exception as failed:  # the retry could not be published: requeue
            return cast(Exception, Reject(failed, requeue=True))
        # what self.retry raises: the worker logs "retry: Retry in ...", stores RETRY
        # and acks this message (its copy is published)
        return cast(Exception, Retry(exc=exc, when=countdown, sig=sig))

    @property
    def _idempotent_params(self) -> tuple[tuple[str, bool], ...]:
        params: tuple[tuple[str, bool], ...] | None = self.__dict__.get("_params_cache")
        if params is None:
            params = _leading_params(self.run)
            self.__dict__["_params_cache"] = params
        return params

    def _handler(self) -> Callable[..., Any]:
        """The task body wrapped by `idempotent`, built once per process."""
        pid = os.getpid()
        if self._idempotent_handler is not None and self._idempotent_pid == pid:
            return self._idempotent_handler
        store = self._store()
        if pid != _IMPORT_PID:
            _forget_inherited_connections(store)
        run = self.run

        def body(*args: Any, **kwargs: Any) -> Any:
            return run(*args, **kwargs)

        functools.update_wrapper(body, run)  # the decorator sees run's own signature
        options = {"namespace": self.name, **self.idempotency_options}
        handler: Callable[..., Any] = idempotent(
            store, key=self._key_spec(), **options)(body)
        self._idempotent_handler, self._idempotent_pid = handler, pid
        return handler

    def _setting(self, name: str) -> Any:
        """A class attribute as given: a function set by ``app.task(...)`` is not bound to
        the task as a method."""
        value = inspect.getattr_static(self, name)
        return value.__func__ if isinstance(value, staticmethod) else value

    def _store(self) -> Store:
        spec = self._setting("idempotency_store")
        if spec is None:
            raise TypeError(
                f"{self.name}: no idempotency_store; give app.task(base=IdempotentTask, "
                "idempotency_store=...) or use idempotent_task(app, store)"
            )
        return spec if isinstance(spec, Store) else spec()

    def _key_spec(self) -> Callable[..., Any]:
        spec: str | Callable[..., Any] | None = self._setting("idempotency_key")
        if spec is None:
            request_stack = self.request_stack
            return lambda *a, **kw: request_stack.top.id if request_stack.top else None
        if callable(spec):
            return spec
        return _argument(self.run, spec)

    # -- the producer side ---------------------------------------------------------------
    def business_key(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
                     ) -> Any:
        """The raw business key of a call with these arguments (``idempotency_key``)."""
        extract: Callable[..., Any] | None = self.__dict__.get("_business_key_of")
        if extract is None:  # built once per task (a producer calls this per message)
            spec = self._setting("idempotency_key")
            if spec is None:
                raise TypeError(
                    f"{self.name} is keyed by its task id; pass send_once(key=...)")
            extract = spec if callable(spec) else _argument(self.run, spec)
            self.__dict__["_business_key_of"] = extract
        a, kw = _by_position(self._idempotent_params, tuple(args), dict(kwargs or {}))
        return extract(*a, **kw)

    def scope_key(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
                  ) -> str | None:
        """The scope (tenant, client) of a call with these arguments, as the task's
        idempotency uses it (``scope=`` of ``idempotency_options``); None for a task
        without a scope. `MissingIdempotencyKey` when the scope gives nothing."""
        scope = self._scope_spec()
        if scope is None:
            return None
        a, kw = _by_position(self._idempotent_params, tuple(args), dict(kwargs or {}))
        text = _keys.as_key_text(scope(*a, **kw))
        if text is None:
            raise MissingIdempotencyKey(
                f"{self.name}: no scope (the scope function gave nothing); nothing was sent",
                namespace=self.name)
        _keys.check_text("scope", text)
        return text

    def _scope_spec(self) -> Callable[..., Any] | None:
        try:
            return self.__dict__["_scope_of"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        options = self._setting("idempotency_options") or {}
        scope: Callable[..., Any] | None = options.get("scope")
        self.__dict__["_scope_of"] = scope
        return scope


def _without(check: Callable[..., Any], names: list[str]) -> Callable[..., Any]:
    """The argument check of a task, with the worker-given parameters filled in."""
    def check_call(*args: Any, **kwargs: Any) -> Any:
        return check(*args, **{**dict.fromkeys(names), **kwargs})
    return check_call


def _leading_params(run: Callable[..., Any]) -> tuple[tuple[str, bool], ...]:
    """The leading parameters of ``run`` a message can fill by position, up to the first
    ``session``/``connection``: (name, may also come by keyword)."""
    try:
        params = inspect.signature(run).parameters.values()
    except (TypeError, ValueError):
        return ()
    out = []
    for p in params:
        if p.name in _TX_PARAMS or p.kind not in (
                inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        out.append((p.name, p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return tuple(out)


def _by_position(params: tuple[tuple[str, bool], ...], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with the leading parameters given by name moved to their
    positions, as Python binds them: ``apply(payment=p)`` is ``apply(p)``."""
    if not kwargs or len(args) >= len(params):
        return args, kwargs
    moved, rest = list(args), dict(kwargs)
    for name, by_keyword in params[len(args):]:
        if not by_keyword or name not in rest:
            break
        moved.append(rest.pop(name))
    return tuple(moved), rest


def _header_count(request: Any, name: str) -> int:
    """One of our retry counters from the message headers (0 when absent)."""
    value = (getattr(request, "headers", None) or {}).get(name)
    if value is None:  # older Celery: custom headers only as request attributes
        value = getattr(request, name, None)
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def _argument(run: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The key named ``name``: a keyword argument, a positional argument of that name, or
    an item/attribute of the first argument."""
    try:
        sig: inspect.Signature | None = inspect.signature(run)
    except (TypeError, ValueError):
        sig = None
    positional = sig is not None and name in sig.parameters
    of_message = _keys.extractor(name)

    def key_of(*args: Any, **kwargs: Any) -> Any:
        if name in kwargs:
            return kwargs[name]
        if positional and sig is not None:
            try:
                return sig.bind_partial(*args, **kwargs).arguments.get(name)
            except TypeError:
                return None
        return of_message(*args, **kwargs) if args else None

    return key_of


def _forget_inherited_connections(store: Store) -> None:
    """In a forked pool child: drop the pool the parent may have filled, without closing
    the parent's connections (SQLAlchemy's recipe for multiprocessing)."""
    engine = getattr(store, "engine", None)
    if isinstance(engine, sa.Engine):
        engine.dispose(close=False)


def idempotent_task(
    app: Celery,
    store: StoreSpec,
    *,
    key: str | Callable[..., Any] | None = None,
    backoff: float = 1.0,
    backoff_max: float = 60.0,
    store_retries: int | None = None,
    namespace: str | None = None,
    scope: Callable[..., Any] | None = None,
    fingerprint: Any = None,
    ttl: float | None = None,
    lease: float | None = None,
    retry: Any = ...,
    serializer: Any = None,
    keep_failures: tuple[type[BaseException], ...] = (),
    heartbeat: bool = True,
    optimistic: bool = True,
    **task_options: Any,
) -> Callable[[F], Any]:
    """``app.task(base=IdempotentTask, ...)`` with `idempotent`'s options spelled out.

    ``key``: None for the task id, or the business key (see `IdempotentTask`). The
    idempotency options mean what they mean for `idempotent`. Everything else
    (``name=``, ``bind=``, ``queue=``, ``max_retries=`` ...) goes to ``app.task``; set
    ``name=`` in production: it is also the key's namespace, so keep it stable.
    """
    options: dict[str, Any] = {
        "scope": scope, "fingerprint": fingerprint, "lease": lease,
        "serializer": serializer, "keep_failures": keep_failures, "heartbeat": heartbeat,
        "optimistic": optimistic,
    }
    if namespace is not None:
        options["namespace"] = namespace
    if ttl is not None:
        options["ttl"] = ttl
    if retry is not ...:
        options["retry"] = retry
    task_options.setdefault("base", IdempotentTask)

    def decorate(fn: F) -> Any:
        return app.task(
            idempotency_store=store, idempotency_key=key, idempotency_options=options,
            idempotency_backoff=backoff, idempotency_backoff_max=backoff_max,
            idempotency_store_retries=store_retries, **task_options,
        )(fn)

    return decorate


def task_id_for(task: Task | str, key: Any, *, scope: Any = None) -> str:
    """The task id a business key maps to: UUID5 of (task name, key), or of (task name,
    key, scope) for a scoped task, so two tenants' ``inv-1`` are two task ids. Stable
    across processes, machines and releases.

    A task whose idempotency has a ``scope`` needs ``scope=`` here (a `TypeError`
    otherwise); `send_once` takes it from the arguments, with the task's own scope
    function."""
    name = task if isinstance(task, str) else task.name
    text = _keys.as_key_text(key)
    if text is None:
        raise MissingIdempotencyKey(
            f"{name}: no business key to derive a task id from", namespace=name)
    if scope is None:
        if isinstance(task, IdempotentTask) and task._scope_spec() is not None:
            raise TypeError(
                f"{name} is scoped: pass task_id_for(task, key, scope=...), or use "
                "send_once, which takes the scope from the arguments")
        return str(uuid.uuid5(TASK_ID_NAMESPACE, canonical_json([name, text])))
    scope_text = _keys.as_key_text(scope)
    if scope_text is None:
        raise MissingIdempotencyKey(f"{name}: an empty scope", namespace=name)
    return str(uuid.uuid5(TASK_ID_NAMESPACE, canonical_json([name, text, scope_text])))


def send_once(
    task: Task,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    key: Any = None,
    **options: Any,
) -> AsyncResult:
    """``task.apply_async`` with the task id `task_id_for` derives from the business key,
    so sending the same payment twice gives one task id, and its body runs once.

    ``key`` defaults to the task's own business key taken from ``args``/``kwargs``
    (`IdempotentTask` with ``idempotency_key`` set), read the same way whether the
    message is passed by position or by keyword. A scoped task's id also carries the
    scope, from the task's own scope function over the same arguments. A call without a
    key (or scope) raises `MissingIdempotencyKey` here, before anything is sent.
    """
    if "task_id" in options:
        raise TypeError("send_once derives the task id; do not pass task_id=")
    _, _, task_id = message_identity(task, args, kwargs, key, "send_once")
    return task.apply_async(tuple(args), dict(kwargs or {}), task_id=task_id, **options)


def message_identity(task: Task, args: tuple[Any, ...] | list[Any],
                     kwargs: Mapping[str, Any] | None, key: Any, caller: str
                     ) -> tuple[Any, str | None, str]:
    """The business key, scope and task id of a message to ``task``: the task's own key
    and scope over the arguments unless ``key`` is given (`send_once`, the outbox's
    `stage_task`). `MissingIdempotencyKey` when there is none."""
    scope = None
    if isinstance(task, IdempotentTask):
        if key is None:
            key = task.business_key(tuple(args), kwargs)
        scope = task.scope_key(tuple(args), kwargs)
    elif key is None:
        raise TypeError(f"{caller}(task, ...) needs key= for a task that is not idempotent")
    return key, scope, task_id_for(task, key, scope=scope)
