"""Retry policies for transient store faults, built from tenacity objects.

A policy is a tenacity ``Retrying`` (or ``AsyncRetrying``) value: pass one to
``@idempotent(retry=...)``. The ready-made ones retry only faults that a second attempt
can cure (serialization failure, deadlock, lock timeout, a dropped connection, a busy
SQLite file, a Redis timeout); a handler's own exceptions are never retried unless a
policy of the user's says so. When the policy gives up, the decorator raises
`StoreUnavailable` carrying the last fault.
"""

from __future__ import annotations

from typing import Any

import tenacity

__all__ = ["is_transient", "no_retry", "transient_retry"]

# SQLSTATEs a new transaction may succeed after (PostgreSQL, and others that use them).
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown (pg_terminate_backend)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up)
        "53300",  # too_many_connections
        "25P03",  # idle_in_transaction_session_timeout
        # invalid_sql_statement_name: the driver dropped the PostgreSQL fast path's prepared
        # statements during the handler; the next attempt does without them
        "26000",
    }
)
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def _driver_transient(orig: BaseException) -> bool:
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    module = type(orig).__module__
    name = type(orig).__name__
    if module.startswith("psycopg"):
        # psycopg raises OperationalError without a SQLSTATE when the connection drops
        return name in {"OperationalError", "InterfaceError"}
    if module == "sqlite3":
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
        return "locked" in str(orig) or "busy" in str(orig)
    if module.startswith("redis"):
        # a failover: the cluster is down, the master is gone, or we wrote to a replica
        return name in {
            "ConnectionError", "TimeoutError", "BusyLoadingError", "TryAgainError",
            "ClusterDownError", "MasterDownError", "ReadOnlyError",
        }
    return isinstance(orig, (ConnectionError, TimeoutError))


def is_transient(exc: BaseException) -> bool:
    """True for a store fault that a new attempt (a new transaction) may cure."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        return exc.orig is not None and _driver_transient(exc.orig)
    if isinstance(exc, sa_exc.SQLAlchemyError):
        # pool exhausted, a connection closed under us
        return isinstance(exc, (sa_exc.TimeoutError, sa_exc.DisconnectionError))
    return _driver_transient(exc)


def transient_retry(
    attempts: int = 6, *, initial: float = 0.05, max_wait: float = 2.0, deadline: float = 30.0
) -> tenacity.Retrying:
    """Retry transient store faults: at most ``attempts`` tries within ``deadline`` seconds,
    exponential backoff with jitter from ``initial`` up to ``max_wait`` seconds."""
    return tenacity.Retrying(**_policy(attempts, initial, max_wait, deadline))


def no_retry() -> tenacity.Retrying:
    """One attempt; a transient fault still surfaces as `StoreUnavailable`."""
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True)


def _policy(attempts: int, initial: float, max_wait: float, deadline: float) -> dict[str, Any]:
    return {
        "retry": tenacity.retry_if_exception(is_transient),
        "stop": tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(deadline),
        # exponential from `initial`, plus up to `initial` of jitter so workers spread out
        "wait": tenacity.wait_exponential(multiplier=initial, max=max_wait)
        + tenacity.wait_random(0, initial),
        "reraise": True,
    }


def _strategies(policy: tenacity.BaseRetrying) -> dict[str, Any]:
    return {
        name: getattr(policy, name)
        for name in (
            "stop", "wait", "retry", "before", "after", "before_sleep", "reraise",
            "retry_error_callback",
        )
    }


def as_async(policy: tenacity.BaseRetrying) -> tenacity.AsyncRetrying:
    """The same strategies as ``policy``, for ``async def`` handlers."""
    if isinstance(policy, tenacity.AsyncRetrying):
        return policy
    return tenacity.AsyncRetrying(**_strategies(policy))


def as_sync(policy: tenacity.BaseRetrying) -> tenacity.Retrying:
    """The same strategies as ``policy``, for plain handlers."""
    if isinstance(policy, tenacity.Retrying):
        return policy
    return tenacity.Retrying(**_strategies(policy))
