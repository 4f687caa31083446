"""``@idempotent``: the decorator that runs a handler once per key.

The flow is written once, as plain synchronous code. An ``async def`` handler runs the
same flow inside SQLAlchemy's greenlet bridge (``greenlet_spawn``), its body awaited with
``await_only``; so sync and async handlers cannot drift apart.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any, TypeVar, cast

import tenacity

from . import _context, _heartbeat, _keys, _rules
from ._canonical import fingerprint as sha256_fingerprint
from ._record import Claimed, Record, State
from .events import LISTENERS, Event, Listener, emit
from .exceptions import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    LeaseLost,
    PreviousAttemptFailed,
    ResultNotSerializable,
    StoreUnavailable,
)
from .retry import as_async, as_sync, is_transient, transient_retry
from .serializers import JSONSerializer, Serializer, encode_result
from .stores.base import DEFAULT_LEASE, DEFAULT_TTL, Store

F = TypeVar("F", bound=Callable[..., Any])

_TX_PARAMS = ("session", "connection")
#: A tenacity policy object is a reusable value (its statistics are thread-local).
_DEFAULT_RETRY = transient_retry()
FingerprintSpec = bool | Iterable[str] | Callable[..., Any] | None
_Fingerprinter = Callable[[tuple[Any, ...], dict[str, Any]], "str | None"]
#: The events' logger, and the level of the per-delivery events.
_LOG, _DEBUG = logging.getLogger("idempotent"), logging.DEBUG
_CURRENT = _context.CURRENT


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
            listeners=listeners,
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
    """Everything decided at decoration time, and the per-call flow."""

    def __init__(
        self, fn: Callable[..., Any], store: Store, *, key: _keys.KeySpec,
        namespace: str | None, scope: Callable[..., Any] | None,
        fingerprint: FingerprintSpec, ttl: float, lease: float | None,
        retry: tenacity.BaseRetrying | None, serializer: Serializer | None,
        keep_failures: tuple[type[BaseException], ...], heartbeat: bool,
        optimistic: bool = True, listeners: Iterable[Listener] = (),
    ) -> None:
        self.fn = fn
        self.store = store
        self.is_async = inspect.iscoroutinefunction(fn)
        params = inspect.signature(fn).parameters
        self.tx_param = next((p for p in _TX_PARAMS if p in params), None)
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
        store_async = getattr(store, "is_async", None)
        if store_async is not None and store_async != self.is_async:
            kind = "an async engine" if store_async else "a sync engine"
            raise TypeError(
                f"{fn.__qualname__} is {'async' if self.is_async else 'sync'} but the store "
                f"has {kind}; give SqlStore an engine of the same kind"
            )
        self.namespace = _keys.fit(namespace or f"{fn.__module__}.{fn.__qualname__}")
        self.key_spec = key
        self.key_of = _keys.extractor(key)
        self.scope_of = scope
        self.fingerprint_of = _fingerprinter(fingerprint)
        self.ttl = float(ttl)
        self.lease = float(lease if lease is not None else DEFAULT_LEASE)
        self.serializer = serializer or JSONSerializer()
        self.keep_failures = keep_failures
        self.heartbeat = heartbeat
        self.optimistic = optimistic
        self.listeners = tuple(listeners)
        # an in-process store has no transient faults to retry or to translate
        self.direct = not getattr(store, "may_fail_transiently", True)
        self.retrying: tenacity.BaseRetrying | None = None
        if retry is not None and not self.direct:
            policy = as_async(retry) if self.is_async else as_sync(retry)
            # what takes over after a failed first attempt: the same policy, counting it
            self.retrying = policy.copy(stop=_CountingFirst(policy.stop))
        self.wrapper = self._make_wrapper()

    # -- entry points ------------------------------------------------------------------
    def _make_wrapper(self) -> Callable[..., Any]:
        fn = self.fn
        if self.is_async:
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await self._call_async(args, kwargs)
            wrapper: Callable[..., Any] = async_wrapper
        elif self.tx_param is None:  # lease mode, the common case: one frame less
            identify, leased = self._identify, self._leased

            @functools.wraps(fn)
            def leased_wrapper(*args: Any, **kwargs: Any) -> Any:
                key, fp = identify(args, kwargs)
                return leased(key, fp, args, kwargs, fn)
            wrapper = leased_wrapper
        else:
            @functools.wraps(fn)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                return self._call(args, kwargs)
            wrapper = sync_wrapper
        wrapper.namespace = self.namespace  # type: ignore[attr-defined]
        wrapper.store = self.store  # type: ignore[attr-defined]
        return wrapper

    def _identify(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str | None]:
        """The stored key and the payload fingerprint of one delivery."""
        raw = self.key_of(*args, **kwargs)
        # a short str key without a scope is stored as it is: skip the general path
        if (type(raw) is not str or not raw or len(raw) > _keys.MAX_KEY_LENGTH
                or self.scope_of is not None):
            text = _keys.as_key_text(raw)
            if text is None:
                raise _keys.missing(self.namespace, self.key_spec)
            scope = None
            if self.scope_of is not None:
                scope = _keys.as_key_text(self.scope_of(*args, **kwargs))
                if scope is None:
                    raise _keys.missing(self.namespace, "scope")
            raw = _keys.scoped(text, scope)
        return raw, self.fingerprint_of(args, kwargs)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        own = kwargs.pop(self.tx_param, None) if self.tx_param else None
        key, fp = self._identify(args, kwargs)
        if own is not None:
            return self._joined(own, key, fp, args, kwargs, self.fn)
        if self.tx_param is not None:
            return self._with_retry(self._transactional, key, fp, args, kwargs, self.fn)
        return self._leased(key, fp, args, kwargs, self.fn)

    async def _call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from sqlalchemy.util import await_only, greenlet_spawn

        own = kwargs.pop(self.tx_param, None) if self.tx_param else None
        key, fp = self._identify(args, kwargs)
        fn = self.fn

        def call(*a: Any, **kw: Any) -> Any:
            return await_only(fn(*a, **kw))

        if own is not None:
            return await greenlet_spawn(self._joined, own, key, fp, args, kwargs, call)
        if self.tx_param is not None:
            return await self._with_retry_async(
                greenlet_spawn, self._transactional, key, fp, args, kwargs, call)
        return await greenlet_spawn(self._leased, key, fp, args, kwargs, call)

    # -- retries -----------------------------------------------------------------------
    def _raise_unavailable(self, exc: BaseException, key: str) -> None:
        """A transient store fault that outlasted the policy becomes `StoreUnavailable`."""
        if isinstance(exc, IdempotencyError):
            return
        if isinstance(exc, tenacity.RetryError):  # a policy without reraise=True
            exc = exc.last_attempt.exception() or exc
        if is_transient(exc):
            raise StoreUnavailable(
                f"{self.namespace}: store unavailable for key {key!r} after retries: {exc}",
                cause=exc, namespace=self.namespace, key=key,
            ) from exc

    # The first attempt runs outside tenacity: setting up a retry loop costs more than
    # the rest of a call, and most calls succeed at once. Only a failure that the
    # policy's own `retry` predicate would retry is handed to the policy, which makes the
    # further attempts with the first one counted (see _CountingFirst).
    def _retries(self, exc: BaseException) -> bool:
        if self.retrying is None or isinstance(exc, IdempotencyError):
            return False
        state = tenacity.RetryCallState(self.retrying, None, (), {})
        state.outcome = tenacity.Future.construct(1, exc, True)
        return bool(self.retrying.retry(state))  # the policy's own predicate decides

    def _with_retry(self, op: Callable[..., Any], key: str, *rest: Any) -> Any:
        started = perf_counter()
        try:
            return op(key, *rest)
        except Exception as exc:
            if not self._retries(exc):
                self._raise_unavailable(exc, key)
                raise
            self._emit("store_retry", key, perf_counter() - started, 1, exc)
        try:
            return self._observed_retrying(key, started)(op, key, *rest)
        except Exception as exc:
            self._raise_unavailable(exc, key)
            raise

    async def _with_retry_async(self, spawn: Any, op: Callable[..., Any], key: str,
                                *rest: Any) -> Any:
        started = perf_counter()
        try:
            return await spawn(op, key, *rest)
        except Exception as exc:
            if not self._retries(exc):
                self._raise_unavailable(exc, key)
                raise
            self._emit("store_retry", key, perf_counter() - started, 1, exc)
        try:
            return await self._observed_retrying(key, started)(spawn, op, key, *rest)
        except Exception as exc:
            self._raise_unavailable(exc, key)
            raise

    def _observed_retrying(self, key: str, started: float) -> tenacity.BaseRetrying:
        """The retry policy, reporting each further failed attempt as ``store_retry``
        when anyone listens (a copy per failing call: failures are rare)."""
        retrying = self.retrying
        assert retrying is not None
        if not self._watched() and not _LOG.isEnabledFor(logging.INFO):
            return retrying
        theirs = retrying.before_sleep

        def report(state: tenacity.RetryCallState) -> None:
            failed = state.outcome.exception() if state.outcome is not None else None
            self._emit("store_retry", key, perf_counter() - started,
                       state.attempt_number + 1, failed)

        if theirs is None:
            return retrying.copy(before_sleep=report)
        if inspect.iscoroutinefunction(theirs):  # an async policy's own async hook
            async def report_then_theirs_async(state: tenacity.RetryCallState) -> None:
                report(state)
                await theirs(state)

            return retrying.copy(before_sleep=report_then_theirs_async)

        def report_then_theirs(state: tenacity.RetryCallState) -> None:
            report(state)
            theirs(state)

        return retrying.copy(before_sleep=report_then_theirs)

    def _store_op(self, key: str, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``op(*args, **kwargs)``, a store operation on ``key`` in lease mode, under the
        retry policy. (`_leased` inlines this for claim and complete.)"""
        started = perf_counter()
        try:
            return op(*args, **kwargs)
        except Exception as exc:
            return self._retry_failed(exc, key, started, op, args, kwargs)

    def _retry_failed(self, exc: Exception, key: str, started: float, op: Callable[..., Any],
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """After the first attempt of a lease-mode store call raised ``exc``: the further
        attempts under the retry policy, or the error (`StoreUnavailable` for a transient
        fault). The first attempt runs in the caller's frame (for async handlers in the
        handler's greenlet); the further ones under the policy, whose backoff sleeps on
        the event loop for async handlers, not in the greenlet."""
        if self.direct:  # an in-process store: no faults to retry or to translate
            raise exc
        if not self._retries(exc):
            self._raise_unavailable(exc, key)
            raise exc
        self._emit("store_retry", key, perf_counter() - started, 1, exc)
        retrying = self._observed_retrying(key, started)
        try:
            if self.is_async:
                from sqlalchemy.util import await_only, greenlet_spawn

                return await_only(retrying(greenlet_spawn, op, *args, **kwargs))
            return retrying(op, *args, **kwargs)
        except Exception as exc:
            self._raise_unavailable(exc, key)
            raise

    # -- transactional mode ------------------------------------------------------------------
    def _transactional(self, key: str, fp: str | None, args: tuple[Any, ...],
                       kwargs: dict[str, Any], call: Callable[..., Any]) -> Any:
        store: Any = self.store
        watched = self._watched()
        started = perf_counter() if watched else 0.0
        with store.transaction(self.namespace, key, fp, self.ttl,
                               optimistic=self.optimistic) as tx:
            if tx.existing is not None:
                return self._replay(tx.existing, fp, key, watched, started)
            assert self.tx_param is not None
            if watched:
                started = self._emit_since("claimed", key, started)
            handle = self._tx_handle(tx)
            try:
                value = self._run(call, args, {**kwargs, self.tx_param: handle}, key, None)
                winner = tx.commit(self._encode(value, key))
            except BaseException as exc:
                if watched:
                    self._emit("released", key, perf_counter() - started, None, exc)
                raise
            if winner is not None:  # a concurrent delivery committed first; ours rolled back
                return self._replay(winner, fp, key, watched, started)
            if watched:
                self._emit_since("completed", key, started)
            return value

    def _joined(self, own: Any, key: str, fp: str | None, args: tuple[Any, ...],
                kwargs: dict[str, Any], call: Callable[..., Any]) -> Any:
        """The caller passed its own session: record in it, never commit."""
        from .stores.sql import _sync_handle

        store: Any = self.store
        sync, _ = _sync_handle(own)
        watched = self._watched()
        started = perf_counter() if watched else 0.0
        tx = store.join(sync, self.namespace, key, fp, self.ttl)
        assert self.tx_param is not None
        if tx.existing is not None:
            return self._replay(tx.existing, fp, key, watched, started)
        if watched:
            started = self._emit_since("claimed", key, started)
        try:
            value = self._run(call, args, {**kwargs, self.tx_param: own}, key, None)
            tx.commit(self._encode(value, key))
        except BaseException as exc:
            if watched:
                self._emit("released", key, perf_counter() - started, None, exc)
            raise
        if watched:
            self._emit_since("completed", key, started)
        return value

    def _tx_handle(self, tx: Any) -> Any:
        if not self.is_async:
            return tx.session() if self.tx_param == "session" else tx.connection
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        aconn = AsyncConnection(self.store.async_engine, tx.connection)  # type: ignore[attr-defined]
        if self.tx_param == "connection":
            return aconn
        asession = AsyncSession(bind=aconn)
        tx._session = asession.sync_session  # flushed by tx.commit
        return asession

    # -- lease mode -------------------------------------------------------------------------
    def _leased(self, key: str, fp: str | None, args: tuple[Any, ...],
                kwargs: dict[str, Any], call: Callable[..., Any]) -> Any:
        # Every first-time key takes this path: the store calls, the heartbeat and the
        # context variable are inline rather than in helpers (each frame costs).
        store, ns, ttl = self.store, self.namespace, self.ttl
        # the one check per delivery for events: listeners, or the logger at DEBUG
        watched = self.listeners or LISTENERS or _LOG.isEnabledFor(_DEBUG)
        started = perf_counter() if watched else 0.0
        op_started = perf_counter()
        try:
            outcome = store.claim(ns, key, fingerprint=fp, lease=self.lease, ttl=ttl)
        except Exception as exc:  # retried under the policy, or StoreUnavailable
            outcome = self._retry_failed(exc, key, op_started, store.claim, (ns, key),
                                         {"fingerprint": fp, "lease": self.lease, "ttl": ttl})
        if not isinstance(outcome, Claimed):
            return self._replay(outcome.record, fp, key, watched, started)
        if watched:
            started = self._emit_since("claimed", key, started)
        token = outcome.token
        beat = None
        if self.heartbeat:
            beat = (self._start_async_heartbeat(key, token) if self.is_async else
                    _heartbeat.start(store.renew, self.lease / 3, ns, key, token, self.lease))
        try:
            ctx = _CURRENT.set(_context.Current(ns, key, token))
            try:
                value = call(*args, **kwargs)
            finally:
                _CURRENT.reset(ctx)
            data = None if value is None else encode_result(
                self.serializer, value, namespace=ns, key=key)
        except self.keep_failures as exc:
            if beat is not None:
                beat.stop()
            self._keep_failure(key, token, exc, watched, started)
            raise
        except BaseException as exc:
            if beat is not None:
                beat.stop()
            self._release_quietly(key, token)
            if watched:
                self._emit("released", key, perf_counter() - started, None, exc)
            raise
        if beat is not None:
            beat.stop()
        try:
            op_started = perf_counter()
            try:
                store.complete(ns, key, token, data, ttl=ttl)
            except Exception as exc:  # retried under the policy, or StoreUnavailable
                self._retry_failed(exc, key, op_started, store.complete,
                                   (ns, key, token, data), {"ttl": ttl})
        except LeaseLost:
            self._emit("lease_lost", key, perf_counter() - started if watched else None)
            raise
        if watched:
            self._emit_since("completed", key, started)
        return value

    def _keep_failure(self, key: str, token: str, exc: BaseException, watched: object,
                      started: float) -> None:
        """Store a ``keep_failures`` exception as the key's failed result."""
        store, ns, ttl = self.store, self.namespace, self.ttl
        failure = _rules.failure_result(exc)
        try:
            self._store_op(key, store.complete, ns, key, token, failure, ttl=ttl,
                           state=State.FAILED)
        except LeaseLost:
            self._emit("lease_lost", key, perf_counter() - started if watched else None)
            raise
        if watched:
            self._emit("failed", key, perf_counter() - started, None, exc)

    def _release_quietly(self, key: str, token: str) -> None:
        """Give the key back after a failed handler; if the store is down, the lease
        running out does the same, later."""
        try:
            self._store_op(key, self.store.release, self.namespace, key, token)
        except Exception:
            _heartbeat.log.warning(
                "idempotent: could not release %s/%s; it frees when its lease ends",
                self.namespace, key, exc_info=True,
            )

    def _start_async_heartbeat(self, key: str, token: str) -> _heartbeat.Beat:
        from sqlalchemy.util import greenlet_spawn

        store, ns, lease = self.store, self.namespace, self.lease
        return _heartbeat.start_async(
            lambda: greenlet_spawn(store.renew, ns, key, token, lease), lease / 3)

    # -- events ------------------------------------------------------------------------------
    def _watched(self) -> bool:
        """Does anyone want this delivery's events? (One cheap check per delivery.)"""
        return bool(self.listeners or LISTENERS) or _LOG.isEnabledFor(_DEBUG)

    def _emit(self, kind: str, key: str, elapsed: float | None = None,
              attempt: int | None = None, error: BaseException | None = None) -> None:
        emit(Event(kind, self.namespace, key, elapsed, attempt,
                   None if error is None else type(error).__name__), self.listeners)

    def _emit_since(self, kind: str, key: str, started: float) -> float:
        """Emit ``kind`` timed from ``started``; returns now, to time what follows."""
        now = perf_counter()
        self._emit(kind, key, now - started)
        return now

    def _replay(self, record: Record, fp: str | None, key: str, watched: object,
                started: float) -> Any:
        """A duplicate's answer (`_rules.replay`), reported as an event."""
        try:
            value = _rules.replay(record, fp, self.serializer, self.store.now())
        except IdempotencyKeyConflict:
            self._emit("conflict", key, perf_counter() - started if watched else None)
            raise
        except AlreadyInProgress:
            self._emit("in_progress", key, perf_counter() - started if watched else None)
            raise
        except PreviousAttemptFailed:
            if watched:
                self._emit_since("duplicate", key, started)
            raise
        if watched:
            self._emit_since("duplicate", key, started)
        return value

    # -- shared ------------------------------------------------------------------------------
    def _run(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             key: str, token: str | None) -> Any:
        ctx = _context.CURRENT.set(_context.Current(self.namespace, key, token))
        try:
            return call(*args, **kwargs)
        finally:
            _context.CURRENT.reset(ctx)

    def _encode(self, value: Any, key: str) -> bytes | None:
        if value is None:
            return None
        return encode_result(self.serializer, value, namespace=self.namespace, key=key)


class _CountingFirst:
    """A tenacity stop strategy: the policy's own, with the attempt made before the
    policy took over counted, so ``stop_after_attempt(3)`` still means three in all."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        shifted = copy.copy(retry_state)
        shifted.attempt_number += 1
        return bool(self.stop(shifted))


__all__ = ["ResultNotSerializable", "idempotent"]
