"""One delivery of a message, written once: claim → run → finish, or abort.

::

    deliver(flow, mode, key, fingerprint, args, kwargs, call)
      claim    the mode claims the key: a lease, or a key in a transaction (ours or the
               caller's); a stored record means a duplicate: replay it (rule REPLAY)
      run      the handler, with its key in the context (and its session/connection)
      finish   the handler returned: store its result (complete / commit); a concurrent
               delivery that won the key at commit is replayed instead
      abort    the handler raised: release the key, keep the failure, or roll back

The mode is a small strategy, one class per mode, whose instance is one delivery's state:
`Lease` (the handler runs outside any store transaction), `OwnTransaction` (we open the
transaction that carries the handler's writes and the key) and `CallerTransaction` (the
caller's transaction; the claim and the handler run in a SAVEPOINT). Sync and async
handlers go through the same steps (async ones inside SQLAlchemy's greenlet bridge, see
`idempotent._decorator`). Events are emitted here, at the transitions.

**Faults are classified by who raised them.** Store faults are retried in one place,
`Flow.store_call`, which runs one store operation (a lease-mode claim, complete or
release) or one whole transaction attempt under the tenacity policy. A handler's own
exception never reaches the policy: in a transaction attempt it is carried out in
`_HandlerFailed`, which the policy never retries, and raised as itself. The one exception:
a transient database error raised *on the transaction's own connection* inside the
handler (a deadlock, a serialization failure, a dropped connection) is the transaction's
fault; the attempt rolled back, and it is retried whole.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from time import monotonic, perf_counter
from typing import Any

import tenacity

from . import _context, _heartbeat, _rules
from ._record import Claimed, InProgress, Record, State
from .events import LISTENERS, Event, Listener, emit
from .exceptions import (
    AlreadyInProgress,
    IdempotencyError,
    IdempotencyKeyConflict,
    LeaseLost,
    PreviousAttemptFailed,
    ResultNotSerializable,
    ResultNotStored,
    StoreUnavailable,
    TransactionEnded,
)
from .retry import as_async, as_sync, is_transient
from .serializers import Serializer, encode_result
from .stores.base import Store

_LOG, _DEBUG = logging.getLogger("idempotent"), logging.DEBUG
_IN_PROGRESS = State.IN_PROGRESS
#: wait=: the first pause between two looks at a key in progress, and the longest (with a
#: store's wake-up signal, the longest a lost signal can delay a waiter)
_FIRST_PAUSE, _MAX_PAUSE = 0.01, 0.5
_CURRENT = _context.CURRENT
_urandom = os.urandom
_Current = _context.Current


class _HandlerFailed(Exception):
    """Carries a handler's own exception out of a transaction attempt, past the retry
    policy (which never retries it); `Flow.store_call` raises the exception itself."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class _NotTheHandlers(tenacity.retry_base):
    """A tenacity retry strategy: the policy's own, never for a handler's exception or
    for one of ours (a conflict, a key in progress: a new attempt cannot cure them)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, (_HandlerFailed, IdempotencyError)):
            return False
        return bool(self.inner(retry_state))


class _NotTheHandlersAsync(tenacity.asyncio.retry.async_retry_base):
    """`_NotTheHandlers` for an async predicate (awaited, never taken for true)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(  # type: ignore[override]  # tenacity's async strategies are so
            self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, (_HandlerFailed, IdempotencyError)):
            return False
        return bool(await self.inner(retry_state))


def _not_the_handlers(inner: Any) -> Any:
    if inspect.iscoroutinefunction(type(inner).__call__) or inspect.iscoroutinefunction(inner):
        return _NotTheHandlersAsync(inner)
    return _NotTheHandlers(inner)


class _CountingFirst:
    """A tenacity stop strategy: the policy's own, with the attempt made before the
    policy took over counted, so ``stop_after_attempt(3)`` still means three in all."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        shifted = copy.copy(retry_state)
        shifted.attempt_number += 1
        return bool(self.stop(shifted))


class Flow:
    """What one handler's deliveries share: the store, its namespace and settings, the
    retry policy and the listeners. Built once, at decoration."""

    def __init__(
        self, store: Store, namespace: str, *, ttl: float, lease: float,
        retry: tenacity.BaseRetrying | None, serializer: Serializer,
        keep_failures: tuple[type[BaseException], ...], heartbeat: bool, optimistic: bool,
        listeners: Iterable[Listener], is_async: bool, tx_param: str | None,
        wait: float | None = None,
    ) -> None:
        self.store = store
        self.wait = wait
        self.namespace = namespace
        self.ttl = ttl
        self.lease = lease
        self.serializer = serializer
        self.keep_failures = keep_failures
        self.heartbeat = heartbeat
        self.optimistic = optimistic
        self.listeners = tuple(listeners)
        self.is_async = is_async
        self.tx_param = tx_param
        # an in-process store has no transient faults to retry or to translate
        self.direct = not getattr(store, "may_fail_transiently", True)
        self.retrying: tenacity.BaseRetrying | None = None
        if retry is not None and not self.direct:
            policy = as_async(retry) if is_async else as_sync(retry)
            # what takes over after a failed first attempt: the same policy, counting it,
            # and never for a handler's exception
            # reraise, and no retry_error_callback: a policy that gives up must end in
            # StoreUnavailable, never in a value the flow would take for a store's answer
            self.retrying = policy.copy(stop=_CountingFirst(policy.stop),
                                        retry=_not_the_handlers(policy.retry),
                                        reraise=True, retry_error_callback=None)
        limit = getattr(store, "max_result_bytes", None)
        self.max_result_bytes: int | None = limit if isinstance(limit, int) else None

    # -- the one place a store operation is retried -------------------------------------
    def store_call(self, key: str, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``op(*args, **kwargs)``, a store operation on ``key`` (or a whole transaction
        attempt), under the retry policy; `StoreUnavailable` when a transient fault
        outlasts it. The first attempt runs in the caller's frame (setting up tenacity
        costs more than the rest of a call, and most calls succeed at once); the hottest
        callers (a lease's claim and complete) make it inline themselves and call
        `retry_failed` only when it raised."""
        started = perf_counter()
        try:
            return op(*args, **kwargs)
        except _HandlerFailed as carried:
            raise carried.exc from None
        except Exception as exc:
            return self.retry_failed(exc, key, started, op, args, kwargs)

    def retry_failed(self, exc: Exception, key: str, started: float, op: Callable[..., Any],
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """After the first attempt of ``op`` raised ``exc``: the further attempts under
        the policy (whose backoff sleeps on the event loop for async handlers), or the
        error (`StoreUnavailable` for a transient fault)."""
        if self.direct:  # an in-process store: no faults to retry or to translate
            raise exc
        if not self._retries(exc):
            self._raise_unavailable(exc, key)
            raise exc
        self.emit("store_retry", key, perf_counter() - started, 1, exc)
        retrying = self._observed(key, started)
        try:
            if self.is_async:
                from sqlalchemy.util import await_only, greenlet_spawn

                return await_only(retrying(greenlet_spawn, op, *args, **kwargs))
            return retrying(op, *args, **kwargs)
        except _HandlerFailed as carried:
            raise carried.exc from None
        except Exception as exc:
            self._raise_unavailable(exc, key)
            raise

    def _retries(self, exc: BaseException) -> bool:
        """Would the policy retry ``exc`` after the first attempt? (Its own predicate
        decides, and its stop: ``stop_after_attempt(1)``, as `no_retry` is, allows no
        second attempt; tenacity would make one before asking its stop.)"""
        if self.retrying is None:
            return False
        state = tenacity.RetryCallState(self.retrying, None, (), {})
        state.outcome = tenacity.Future.construct(1, exc, True)
        verdict = self.retrying.retry(state)
        if inspect.isawaitable(verdict):  # an async predicate: we are in the bridge
            from sqlalchemy.util import await_only

            verdict = await_only(verdict)
        if not verdict:
            return False
        state.attempt_number = 0  # _CountingFirst adds the first attempt: 1 made so far
        state.outcome_timestamp = state.start_time  # (a delay stop: none spent yet)
        return not self.retrying.stop(state)

    def _raise_unavailable(self, exc: BaseException, key: str) -> None:
        """A transient store fault that outlasted the policy becomes `StoreUnavailable`."""
        if isinstance(exc, IdempotencyError):
            return
        if isinstance(exc, tenacity.RetryError):  # a policy without reraise=True
            exc = exc.last_attempt.exception() or exc
            if isinstance(exc, _HandlerFailed):
                raise exc.exc from None
        if is_transient(exc):
            raise StoreUnavailable(
                f"{self.namespace}: store unavailable for key {key!r} after retries: {exc}",
                cause=exc, namespace=self.namespace, key=key,
            ) from exc

    def _observed(self, key: str, started: float) -> tenacity.BaseRetrying:
        """The retry policy, reporting each further failed attempt as ``store_retry``
        when anyone listens (a copy per failing call: failures are rare)."""
        retrying = self.retrying
        assert retrying is not None
        if not self.watched() and not _LOG.isEnabledFor(logging.INFO):
            return retrying
        theirs = retrying.before_sleep

        def report(state: tenacity.RetryCallState) -> None:
            failed = state.outcome.exception() if state.outcome is not None else None
            self.emit("store_retry", key, perf_counter() - started,
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

    # -- events ----------------------------------------------------------------------------
    def watched(self) -> bool:
        """Does anyone want this delivery's events? (One cheap check per delivery.)"""
        return bool(self.listeners or LISTENERS) or _LOG.isEnabledFor(_DEBUG)

    def emit(self, kind: str, key: str, elapsed: float | None = None,
             attempt: int | None = None, error: BaseException | None = None) -> None:
        emit(Event(kind, self.namespace, key, elapsed, attempt,
                   None if error is None else type(error).__name__), self.listeners)

    def replay(self, record: Record, fp: str | None, key: str, now: float | None,
               started: float | None) -> Any:
        """A duplicate's answer (rule REPLAY), reported as an event."""
        try:
            value = _rules.replay(record, fp, self.serializer, now)
        except IdempotencyKeyConflict:
            self.emit("conflict", key, None if started is None else perf_counter() - started)
            raise
        except AlreadyInProgress:
            self.emit("in_progress", key,
                      None if started is None else perf_counter() - started)
            raise
        except (PreviousAttemptFailed, ResultNotStored):
            if started is not None:
                self.emit("duplicate", key, perf_counter() - started)
            raise
        if started is not None:
            self.emit("duplicate", key, perf_counter() - started)
        return value

    # -- wait=: a duplicate waits for the first delivery's outcome -------------------------
    def wait_turn(self, mode: Any, found: Record) -> Record | None:
        """``found`` is in progress (another worker's live lease): wait up to
        ``self.wait`` seconds for it to end, woken by the store (rule WAKE) or polling
        with a backed-off pause, then claim again. Returns the record a claim found
        (completed, or still in progress at the deadline), or None: the key was released
        and this delivery claimed it."""
        assert self.wait is not None
        deadline = monotonic() + self.wait
        pause = _FIRST_PAUSE
        record: Record | None = found
        while record is not None and record.state is _IN_PROGRESS:
            left = deadline - monotonic()
            if left <= 0:
                break
            step = min(pause, left)
            try:
                woken = self.store.wait_change(self.namespace, mode.key, step)
            except Exception:  # the signal failed: poll; the claim below meets a real fault
                _LOG.debug("idempotent: waiting for %s/%s: no signal, polling",
                           self.namespace, mode.key, exc_info=True)
                woken = None
            if woken is None:  # no signal from this store: poll
                if self.is_async:
                    import asyncio

                    from sqlalchemy.util import await_only

                    await_only(asyncio.sleep(step))
                else:
                    time.sleep(step)
            pause = min(pause * 2, _MAX_PAUSE)
            record = mode.claim()
        return record

    def signal(self, key: str) -> None:
        """After a complete or a release by a handler that has ``wait=``: the store's
        signal to its waiters where its writes do not send one (PostgreSQL's NOTIFY).
        A signal that cannot be sent only delays a waiter to its next poll."""
        try:
            self.store.signal_change(self.namespace, key)
        except Exception:
            _LOG.warning("idempotent: could not signal the waiters of %s/%s; they poll",
                         self.namespace, key, exc_info=True)

    def encode(self, value: Any, key: str) -> bytes | None:
        """The result as stored; `ResultNotSerializable` when it cannot be."""
        if value is None:
            return None
        data = encode_result(self.serializer, value, namespace=self.namespace, key=key)
        limit = self.max_result_bytes
        if limit is not None and len(data) > limit:
            raise ResultNotSerializable(
                f"the result of {self.namespace!r} for key {key!r} is {len(data):,} bytes, "
                f"over the store's max_result_bytes={limit:,}",
                namespace=self.namespace, key=key,
            )
        return data


def deliver(flow: Flow, mode: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            call: Callable[..., Any]) -> Any:
    """One attempt at one delivery: claim → run → finish, or abort. ``mode`` is the
    delivery's strategy object, already holding its key; its claim happened when it was
    made (see the mode classes)."""
    key = mode.key
    # the one check per delivery for events: listeners, or the logger at DEBUG
    started = (perf_counter() if flow.listeners or LISTENERS or _LOG.isEnabledFor(_DEBUG)
               else None)
    try:
        found = mode.claim()
        if found is not None and flow.wait is not None and found.state is _IN_PROGRESS:
            found = flow.wait_turn(mode, found)
        if found is not None:
            return flow.replay(found, mode.fp, key, mode.now, started)
        if started is not None:
            now = perf_counter()
            flow.emit("claimed", key, now - started)
            started = now
        try:
            value = mode.run(call, args, kwargs)
        except BaseException as exc:
            kind = mode.abort(exc)
            if started is not None:
                flow.emit(kind, key, perf_counter() - started, None, exc)
            if mode.carries and isinstance(exc, Exception) and not mode.store_fault(exc):
                raise _HandlerFailed(exc) from None
            raise
        winner = mode.finish(value)
        if winner is not None:  # a concurrent delivery committed first; ours rolled back
            return flow.replay(winner, mode.fp, key, None, started)
        if started is not None:
            flow.emit("completed", key, perf_counter() - started)
        return value
    finally:
        mode.close()


# -- the modes ---------------------------------------------------------------------------
class Lease:
    """Lease mode: claim with a fencing token, run outside any store transaction (a
    heartbeat renews the lease), then complete under the token; each store operation is
    retried on its own (the claim with the same token, so a claim whose reply was lost
    finds its own record)."""

    __slots__ = ("beat", "flow", "fp", "key", "now", "token")
    carries = False

    def __init__(self, flow: Flow, key: str, fp: str | None) -> None:
        self.flow, self.key, self.fp = flow, key, fp
        self.token = ""
        self.now: float | None = None
        self.beat: _heartbeat.Beat | None = None

    def claim(self) -> Record | None:
        flow, key = self.flow, self.key
        store, ns = flow.store, flow.namespace
        token = _urandom(16).hex()  # new_token(), inline: a frame less per claim
        started = perf_counter()
        try:
            outcome = store.claim(ns, key, fingerprint=self.fp, lease=flow.lease, ttl=flow.ttl,
                                  token=token)
        except Exception as exc:  # retried under the policy, or StoreUnavailable
            outcome = flow.retry_failed(
                exc, key, started, store.claim, (ns, key),
                {"fingerprint": self.fp, "lease": flow.lease, "ttl": flow.ttl, "token": token})
        if type(outcome) is not Claimed:
            if type(outcome) is InProgress:
                self.now = outcome.now
            return outcome.record  # type: ignore[union-attr]  # Completed or InProgress
        self.token = token
        if flow.heartbeat:
            if flow.is_async:
                self.beat = _start_async_heartbeat(flow, key, token)
            else:
                self.beat = _heartbeat.start(store.renew, flow.lease / 3, ns, key, token,
                                             flow.lease)
        return None

    def run(self, call: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        ctx = _CURRENT.set(_Current(self.flow.namespace, self.key, self.token))
        try:
            return call(*args, **kwargs)
        finally:
            _CURRENT.reset(ctx)

    def abort(self, exc: BaseException) -> str:
        """The handler raised: keep it as failed (``keep_failures``), else release. Either
        way the handler's own exception is what the caller gets: a store that cannot take
        the failure or the release only delays a redelivery (the lease runs out)."""
        self.close()
        flow, key = self.flow, self.key
        if isinstance(exc, flow.keep_failures):
            try:
                flow.store_call(key, flow.store.complete, flow.namespace, key, self.token,
                                _rules.failure_result(exc), ttl=flow.ttl, state=State.FAILED)
            except LeaseLost:
                flow.emit("lease_lost", key)
            except Exception:
                _LOG.warning("idempotent: could not keep the failure of %s/%s; the key frees "
                             "when its lease ends", flow.namespace, key, exc_info=True)
            else:
                if flow.wait is not None:
                    flow.signal(key)
                return "failed"
            return "released"
        try:
            flow.store_call(key, flow.store.release, flow.namespace, key, self.token)
        except Exception:  # the lease running out frees the key as well, later
            _LOG.warning("idempotent: could not release %s/%s; it frees when its lease ends",
                         flow.namespace, key, exc_info=True)
        else:
            if flow.wait is not None:
                flow.signal(key)
        return "released"

    def finish(self, value: Any) -> None:
        """The handler returned, so its effect happened: complete the key, whatever the
        result. A result that cannot be stored completes it with a marker that duplicates
        get as `ResultNotStored`; nothing after this point may release the key."""
        flow, key = self.flow, self.key
        try:
            data = None if value is None else flow.encode(value, key)
        except Exception as exc:  # any serializer error: logged at WARNING by the event
            flow.emit("result_not_stored", key, None, None, exc)
            data = _rules.not_stored(str(exc.__cause__ or exc))
        # the heartbeat keeps renewing until complete (with its retries) returned: a slow
        # store must not let the lease of a live process run out (close() stops it)
        store, ns, token = flow.store, flow.namespace, self.token
        started = perf_counter()
        try:
            try:
                store.complete(ns, key, token, data, ttl=flow.ttl)
            except Exception as exc:  # retried under the policy, or StoreUnavailable
                flow.retry_failed(exc, key, started, store.complete, (ns, key, token, data),
                                  {"ttl": flow.ttl})
        except LeaseLost:
            flow.emit("lease_lost", key)
            raise
        if flow.wait is not None:
            flow.signal(key)

    store_fault = staticmethod(lambda exc: False)

    def close(self) -> None:
        """Stop the heartbeat (every delivery passes here; abort and close both may)."""
        beat = self.beat
        if beat is not None:
            beat.stop()
            self.beat = None


def _start_async_heartbeat(flow: Flow, key: str, token: str) -> _heartbeat.Beat:
    from sqlalchemy.util import greenlet_spawn

    lease = flow.lease
    return _heartbeat.start_async(greenlet_spawn, lease / 3, flow.store.renew,
                                  flow.namespace, key, token, lease)


class OwnTransaction:
    """Transactional mode, our transaction: open it, claim (or read) the key in it, run
    the handler on its connection, store the result and commit, all one attempt; a store
    fault anywhere rolls the attempt back and `Flow.store_call` runs it again."""

    __slots__ = ("_cm", "flow", "fp", "key", "now", "tx")
    carries = True

    def __init__(self, flow: Flow, key: str, fp: str | None) -> None:
        self.flow, self.key, self.fp = flow, key, fp
        self.now: float | None = None
        self._cm: Any = None
        self.tx: Any = None

    def claim(self) -> Record | None:
        flow = self.flow
        store: Any = flow.store
        self._cm = store.transaction(flow.namespace, self.key, self.fp, flow.ttl,
                                     optimistic=flow.optimistic)
        self.tx = self._cm.__enter__()
        return self.tx.existing  # type: ignore[no-any-return]

    def run(self, call: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        flow = self.flow
        assert flow.tx_param is not None
        handle = _tx_handle(flow, self.tx)
        ctx = _CURRENT.set(_Current(flow.namespace, self.key, None))
        try:
            with _handler_runs(self.tx.connection, flow.namespace, self.key):
                return call(*args, **{**kwargs, flow.tx_param: handle})
        finally:
            _CURRENT.reset(ctx)

    def abort(self, exc: BaseException) -> str:
        return "released"  # close() rolls back

    def store_fault(self, exc: Exception) -> bool:
        """Is the handler's exception a transient fault of the transaction's own
        connection (which rolled the attempt back)?"""
        return raised_on(exc, self.tx.connection) and is_transient(exc)

    def finish(self, value: Any) -> Record | None:
        return self.tx.commit(self.flow.encode(value, self.key))  # type: ignore[no-any-return]

    def close(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)  # closes the connection: rolls back the rest


class CallerTransaction:
    """Transactional mode, the caller's transaction (it passed its own session or
    connection): the claim and the handler run in a SAVEPOINT, so a handler that raises
    leaves nothing of its key behind even when the caller commits the rest; the result is
    recorded and the savepoint released, and the caller's commit decides. Not retried:
    the transaction, and retrying it, are the caller's."""

    __slots__ = ("_savepoint", "flow", "fp", "key", "now", "own", "tx")
    carries = False

    def __init__(self, flow: Flow, key: str, fp: str | None, own: Any) -> None:
        self.flow, self.key, self.fp, self.own = flow, key, fp, own
        self.now: float | None = None
        self._savepoint: Any = None
        self.tx: Any = None

    def claim(self) -> Record | None:
        from sqlalchemy.orm import Session

        from .stores.sql import _sync_handle

        flow = self.flow
        store: Any = flow.store
        sync, _ = _sync_handle(self.own)
        mark_errors((sync.connection() if isinstance(sync, Session) else sync).engine)
        self._savepoint = _savepoint(sync)
        self.tx = store.join(sync, flow.namespace, self.key, self.fp, flow.ttl)
        return self.tx.existing  # type: ignore[no-any-return]

    def run(self, call: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        flow = self.flow
        assert flow.tx_param is not None
        ctx = _CURRENT.set(_Current(flow.namespace, self.key, None))
        try:
            with _handler_runs(self.tx.connection, flow.namespace, self.key):
                return call(*args, **{**kwargs, flow.tx_param: self.own})
        finally:
            _CURRENT.reset(ctx)

    def abort(self, exc: BaseException) -> str:
        self._rollback()
        return "released"

    store_fault = staticmethod(lambda exc: False)

    def finish(self, value: Any) -> None:
        self.tx.commit(self.flow.encode(value, self.key))
        savepoint, self._savepoint = self._savepoint, None
        if savepoint is not None and savepoint.is_active:
            savepoint.commit()  # RELEASE SAVEPOINT: the caller's commit decides

    def _rollback(self) -> None:
        savepoint, self._savepoint = self._savepoint, None
        if savepoint is not None and savepoint.is_active:
            savepoint.rollback()

    def close(self) -> None:
        savepoint = self._savepoint
        if savepoint is None:
            return
        if self.tx is not None and self.tx.existing is not None:
            self._savepoint = None
            if savepoint.is_active:
                savepoint.commit()  # a duplicate wrote nothing worth keeping or undoing
        else:
            self._rollback()  # the claim or the result's write failed


def _savepoint(sync: Any) -> Any:
    """A SAVEPOINT in the caller's transaction. pysqlite (legacy transaction control)
    sends its BEGIN only before the first write, and a SAVEPOINT outside a transaction
    starts one that RELEASE would commit: so on SQLite the caller's transaction is begun
    for real first."""
    from sqlalchemy.orm import Session

    conn = sync.connection() if isinstance(sync, Session) else sync
    if not conn.in_transaction():
        conn.begin()  # the caller's own transaction, as its first statement would begin it
    if conn.dialect.name == "sqlite":
        raw = conn.connection.driver_connection
        if getattr(raw, "in_transaction", True) is False:  # (a begin event may have)
            conn.exec_driver_sql("BEGIN")
    return sync.begin_nested()


def _tx_handle(flow: Flow, tx: Any) -> Any:
    """What the handler gets in our transaction: its connection or an ORM session on it
    (the asyncio twins for an ``async def`` handler)."""
    if not flow.is_async:
        return tx.session() if flow.tx_param == "session" else tx.connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    aconn = AsyncConnection(flow.store.async_engine, tx.connection)  # type: ignore[attr-defined]
    if flow.tx_param == "connection":
        return aconn
    asession = AsyncSession(bind=aconn)
    tx._session = asession.sync_session  # flushed by tx.commit
    return asession


# -- which connection raised ---------------------------------------------------------------
_RAISED_ON = "_idempotent_raised_on"
#: In a connection's ``info`` while a handler runs on its transaction: (namespace, key).
_HANDLER_RUNS = "idempotent_handler_runs"
#: Set when a commit or rollback of the handler's was refused.
_REFUSED = "idempotent_refused"


@contextlib.contextmanager
def _handler_runs(conn: Any, namespace: str, key: str) -> Any:
    """While the handler runs, its transaction may not be ended (see `mark_errors`)."""
    info = conn.info
    info[_HANDLER_RUNS] = (namespace, key)
    try:
        yield
    finally:
        info.pop(_HANDLER_RUNS, None)
        if info.pop(_REFUSED, False):
            # SQLAlchemy marked the transaction ended although the refused COMMIT or
            # ROLLBACK never reached the database: the connection still holds the
            # handler's writes. Invalidating it closes it, so the server rolls them back
            # and no later user of the pooled connection can commit them.
            conn.invalidate()


def mark_errors(engine: Any) -> None:
    """Make every error SQLAlchemy raises on ``engine``'s connections say which
    connection raised it (once per engine), so `raised_on` can tell the transaction's own
    faults from those of a handler's other clients."""
    import sqlalchemy as sa

    if engine in _MARKED:
        return

    def note(ctx: Any) -> None:
        if ctx.connection is None:
            return
        for exc in (ctx.sqlalchemy_exception, ctx.original_exception):
            if exc is not None:
                with contextlib.suppress(AttributeError):  # a type without a __dict__
                    setattr(exc, _RAISED_ON, id(ctx.connection))

    def refuse(conn: Any) -> None:
        if conn.invalidated:  # a lost connection's cleanup: nothing to refuse (or read)
            return
        key = conn.info.get(_HANDLER_RUNS)
        if key is not None:
            conn.info[_REFUSED] = True
            raise TransactionEnded(
                f"{key[0]}: the handler for key {key[1]!r} tried to end the transaction its "
                "key is recorded in (commit or rollback); refused. Use a SAVEPOINT "
                "(begin_nested()) to recover from an error, or raise to roll back",
                namespace=key[0], key=key[1])

    sa.event.listen(engine, "handle_error", note)
    sa.event.listen(engine, "commit", refuse)
    sa.event.listen(engine, "rollback", refuse)
    _MARKED.add(engine)


_MARKED: weakref.WeakSet[Any] = weakref.WeakSet()


def raised_on(exc: BaseException, connection: Any) -> bool:
    """Was ``exc`` raised by a statement on ``connection`` (see `mark_errors`)?"""
    return getattr(exc, _RAISED_ON, None) == id(connection)
