"""Which store faults the ready policies retry: transient ones only."""

from __future__ import annotations

import sqlite3

import pytest
import redis.exceptions as rx
import sqlalchemy as sa

from idempotent import is_transient


@pytest.mark.parametrize("exc", [
    rx.ConnectionError("reset"),
    rx.TimeoutError("timed out"),
    rx.BusyLoadingError("loading"),
    rx.TryAgainError("try again"),
    rx.ClusterDownError("CLUSTERDOWN"),
    rx.MasterDownError("MASTERDOWN"),
    rx.ReadOnlyError("READONLY You can't write against a read only replica."),
])
def test_redis_faults_a_new_attempt_can_cure(exc: Exception) -> None:
    """Dropped connections, timeouts, loading and failovers are retried."""
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    rx.AuthenticationError("invalid password"),  # a ConnectionError subclass: not cured
    rx.ResponseError("ERR unknown command"),
    rx.DataError("bad argument"),
])
def test_redis_faults_that_stay(exc: Exception) -> None:
    """A wrong password or a bad command fails the same way on every attempt."""
    assert not is_transient(exc)


def test_sqlite_busy_is_transient_and_a_syntax_error_is_not() -> None:
    """SQLITE_BUSY through SQLAlchemy is retried; a programming error is not."""
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5  # type: ignore[attr-defined]
    assert is_transient(sa.exc.OperationalError("INSERT", {}, busy))
    bad = sqlite3.OperationalError('near "SELEC": syntax error')
    bad.sqlite_errorcode = 1  # type: ignore[attr-defined]
    assert not is_transient(sa.exc.OperationalError("SELEC", {}, bad))
