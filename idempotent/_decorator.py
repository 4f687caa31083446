"""``@idempotent``: the decorator that runs a handler once per key.

This module holds what is decided at decoration (the mode, the key and fingerprint
functions, the checks) and one wrapper; each delivery goes through the one flow in
`idempotent._flow`. An ``async def`` handler runs the same flow inside SQLAlchemy's
greenlet bridge (``greenlet_spawn``), its body awaited with ``await_only``; so sync and
async handlers cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import tenacity

from . import _keys
from ._canonical import fingerprint as sha256_fingerprint
from ._flow import CallerTransaction, Flow, Lease, OwnTransaction, deliver, mark_errors
from .events import Listener
from .exceptions import ResultNotSerializable
from .retry import transient_retry
from .serializers import JSONSerializer, Serializer
from .stores.base import DEFAULT_LEASE, DEFAULT_TTL, Store, check_durations

F = TypeVar("F", bound=Callable[..., Any])

_TX_PARAMS = ("session", "connection")
#: A tenacity policy object is a reusable value (its statistics are thread-local).
_DEFAULT_RETRY = transient_retry()
FingerprintSpec = bool | Iterable[str] | Callable[..., Any] | None
_Fingerprinter = Callable[[tuple[Any, ...], dict[str, Any]], "str | None"]


def idempotent(
    store: Store,
    *,
    key: _keys.KeySpec,
    namespace: str | None = None,
    scope: Callable[..., Any] | None = None,
    fingerprint: FingerprintSpec = None,
    ttl: float = DEFAULT_TTL,
    lease: float | None = None,
    retry: tenacity.BaseRetrying | None = _DEFAULT_RETRY,
    serializer: Serializer | None = None,
    keep_failures: tuple[type[BaseException], ...] = (),
    heartbeat: bool = True,
    optimistic: bool = True,
    listeners: Iterable[Listener] = (),
    wait: float | None = None,
) -> Callable[[F], F]:
    """Make a handler run once per idempotency key; duplicates get the first result.

    * ``key``: item/attribute name of the first argument, or a callable over the handler's
      arguments. A missing key raises `MissingIdempotencyKey`.
    * ``namespace``: the handler's stable name in the store (default: module.qualname).
    * ``scope``: callable over the arguments giving a tenant or client identity; keys of
      different scopes never meet.
    * ``fingerprint``: what must match when a key comes back: None = all arguments,
      a list of field names of the first argument, a callable, or False for no check.
    * ``ttl``: seconds a key is remembered; must exceed the broker's redelivery horizon.
    * ``lease``: lease mode only; seconds a claim holds before another worker may take
      over (renewed by a heartbeat while the handler runs).
    * ``retry``: a tenacity policy for transient store faults (default
      `transient_retry()`); None for a single attempt. `StoreUnavailable` when it gives up.
    * ``keep_failures``: exception types kept as ``failed`` (poison messages); duplicates
      then raise `PreviousAttemptFailed`. Other exceptions release the key for a retry.
    * ``optimistic`` (transactional mode): True writes the key once, with the result, at
      commit; a concurrent duplicate runs too and is rolled back at the key. False claims
      the key first, so a concurrent duplicate waits instead of running.
    * ``wait`` (lease mode): seconds a duplicate that finds the key in progress waits
      for the first delivery's outcome before `AlreadyInProgress`: woken by the store
      where it can signal (Redis pub/sub, PostgreSQL LISTEN/NOTIFY), else polling with a
      backed-off pause. It then
      gets the first result, or runs if the first delivery released the key (its handler
      raised). None (default): `AlreadyInProgress` at once. In transactional mode a
      duplicate already waits, on the key's row lock, up to the store's ``lock_timeout``.
    * ``listeners``: callables that get this handler's `Event` objects (claimed, duplicate,
      completed, ...), besides those registered for every handler with
      `idempotent.events.add_listener`.

    A handler that takes ``session`` or ``connection`` runs in **transactional mode**
    (SQL stores only): it gets a SQLAlchemy ``Session``/``Connection`` whose transaction
    also records the key and result, and commits them together. Others run in **lease
    mode**: the key is claimed, the handler runs outside any store transaction, and the
    result is stored under the claim's fencing token.
    """

    def decorate(fn: F) -> F:
        return cast(F, _Handler(
            fn, store, key=key, namespace=namespace, scope=scope, fingerprint=fingerprint,
            ttl=ttl, lease=lease, retry=retry, serializer=serializer,
            keep_failures=keep_failures, heartbeat=heartbeat, optimistic=optimistic,
            listeners=listeners, wait=wait,
        ).wrapper)

    return decorate


def _fingerprinter(spec: FingerprintSpec) -> _Fingerprinter:
    """The payload fingerprint of one delivery, from its ``(args, kwargs)`` as received
    (no repacking: the default fingerprint encodes the args tuple as it is, which JSON
    writes as the list it is)."""
    if spec is False:
        return lambda args, kwargs: None
    if spec is None or spec is True:
        def whole(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            return sha256_fingerprint([args, kwargs] if kwargs else args)
        return whole
    if callable(spec):
        fn = spec
        return lambda args, kwargs: sha256_fingerprint(fn(*args, **kwargs))
    fields = tuple(spec)
    extract = [_keys.extractor(f) for f in fields]
    return lambda args, kwargs: sha256_fingerprint(
        {f: e(*args, **kwargs) for f, e in zip(fields, extract, strict=True)})


class _Handler:
    """Everything decided at decoration time, and the one wrapper."""

    def __init__(
        self, fn: Callable[..., Any], store: Store, *, key: _keys.KeySpec,
        namespace: str | None, scope: Callable[..., Any] | None,
        fingerprint: FingerprintSpec, ttl: float, lease: float | None,
        retry: tenacity.BaseRetrying | None, serializer: Serializer | None,
        keep_failures: tuple[type[BaseException], ...], heartbeat: bool,
        optimistic: bool = True, listeners: Iterable[Listener] = (),
        wait: float | None = None,
    ) -> None:
        self.fn = fn
        self.store = store
        self.is_async = inspect.iscoroutinefunction(fn)
        params = inspect.signature(fn).parameters
        self.tx_param = next((p for p in _TX_PARAMS if p in params), None)
        # the parameters a message may come in by position or by name: a call by name is
        # made positional, so the key and the fingerprint are the same either way
        self.positional: tuple[str, ...] = tuple(itertools.takewhile(
            lambda n: params[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            and n not in _TX_PARAMS,
            (n for n in params if params[n].kind is not inspect.Parameter.POSITIONAL_ONLY)))
        if self.tx_param is not None and not store.transactional:
            raise TypeError(
                f"{fn.__qualname__} takes {self.tx_param!r}: transactional mode needs a "
                f"SqlStore, not {type(store).__name__}"
            )
        if self.tx_param is not None and (lease is not None or keep_failures):
            raise TypeError(
                "lease= and keep_failures= are for lease mode; in transactional mode a failed "
                "handler's transaction rolls back and leaves nothing to keep"
            )
        if wait is not None:
            if self.tx_param is not None:
                raise TypeError(
                    "wait= is for lease mode; in transactional mode a duplicate waits on the "
                    "key's row lock (optimistic=False), up to the store's lock_timeout")
            if not 0 <= wait < float("inf"):  # also refuses NaN
                raise ValueError(f"wait must be a finite number of seconds >= 0, not {wait!r}")
        store_async = getattr(store, "is_async", None)
        if store_async is not None and store_async != self.is_async:
            kind = "an async engine" if store_async else "a sync engine"
            raise TypeError(
                f"{fn.__qualname__} is {'async' if self.is_async else 'sync'} but the store "
                f"has {kind}; give SqlStore an engine of the same kind"
            )
        check_durations(lease, ttl)
        effective_lease = lease if lease is not None else DEFAULT_LEASE
        if self.tx_param is None and ttl < effective_lease:
            # CLAIMABLE: a record past its expires_at may be claimed whatever its lease;
            # an in-progress key would expire while its handler still holds it, and a
            # redelivery would run the handler a second time
            raise ValueError(
                f"ttl ({ttl!r} s) is shorter than the lease ({effective_lease!r} s): a "
                "key would be forgotten while its handler still runs, and a redelivery "
                "would run it again; give a ttl longer than the lease")
        name = namespace or f"{fn.__module__}.{fn.__qualname__}"
        _keys.check_text("namespace", name)
        self.namespace = _keys.fit(name)
        self.key_spec = key
        self.key_of = _keys.extractor(key)
        self.scope_of = scope
        self.fingerprint_of = _fingerprinter(fingerprint)
        self.flow = Flow(
            store, self.namespace, ttl=float(ttl),
            lease=float(lease if lease is not None else DEFAULT_LEASE), retry=retry,
            serializer=serializer or JSONSerializer(), keep_failures=keep_failures,
            heartbeat=heartbeat, optimistic=optimistic, listeners=listeners,
            is_async=self.is_async, tx_param=self.tx_param,
            wait=None if wait is None else float(wait),
        )
        if self.tx_param is not None:
            mark_errors(store.engine)  # type: ignore[attr-defined]
        self.wrapper = self._make_wrapper()

    def _make_wrapper(self) -> Callable[..., Any]:
        fn, deliver_one = self.fn, self._deliver
        if self.is_async:
            from sqlalchemy.util import await_only

            from ._bridge import run

            def call(*a: Any, **kw: Any) -> Any:
                return await_only(fn(*a, **kw))

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await run(deliver_one, args, kwargs, call)
            wrapper: Callable[..., Any] = async_wrapper
        else:
            @functools.wraps(fn)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                return deliver_one(args, kwargs, fn)
            wrapper = sync_wrapper
        wrapper.namespace = self.namespace  # type: ignore[attr-defined]
        wrapper.store = self.store  # type: ignore[attr-defined]
        return wrapper

    def _deliver(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                 call: Callable[..., Any]) -> Any:
        """Pick the mode of this delivery and run the flow."""
        flow, tx_param = self.flow, self.tx_param
        own = kwargs.pop(tx_param, None) if tx_param is not None else None
        if kwargs and self.positional:
            args, kwargs = self._by_position(args, kwargs)
        key, fp = self._identify(args, kwargs)
        if tx_param is None:
            return deliver(flow, Lease(flow, key, fp), args, kwargs, call)
        if own is not None:
            return deliver(flow, CallerTransaction(flow, key, fp, own), args, kwargs, call)
        return flow.store_call(key, _own_attempt, flow, key, fp, args, kwargs, call)

    def _by_position(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` with the leading parameters passed by name moved to their
        positions (``charge(msg=m)`` is ``charge(m)``), as Python would bind them."""
        names = self.positional
        if len(args) >= len(names) or names[len(args)] not in kwargs:
            return args, kwargs
        moved, rest = list(args), dict(kwargs)
        for name in names[len(args):]:
            if name not in rest:
                break
            moved.append(rest.pop(name))
        return tuple(moved), rest

    def _identify(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str | None]:
        """The stored key and the payload fingerprint of one delivery."""
        raw = self.key_of(*args, **kwargs)
        # a short ASCII str key without a scope is stored as it is: skip the general path
        if (type(raw) is not str or not raw or len(raw) > _keys.MAX_KEY_LENGTH
                or self.scope_of is not None or not raw.isascii() or "\x00" in raw):
            text = _keys.as_key_text(raw)
            if text is None:
                raise _keys.missing(self.namespace, self.key_spec)
            _keys.check_text("key", text)
            scope = None
            if self.scope_of is not None:
                scope = _keys.as_key_text(self.scope_of(*args, **kwargs))
                if scope is None:
                    raise _keys.missing(self.namespace, "scope")
                _keys.check_text("scope", scope)
            raw = _keys.scoped(text, scope)
        return raw, self.fingerprint_of(args, kwargs)


def _own_attempt(flow: Flow, key: str, fp: str | None, args: tuple[Any, ...],
                 kwargs: dict[str, Any], call: Callable[..., Any]) -> Any:
    """One attempt in a transaction of our own (retried whole by `Flow.store_call`)."""
    return deliver(flow, OwnTransaction(flow, key, fp), args, kwargs, call)


__all__ = ["ResultNotSerializable", "idempotent"]
