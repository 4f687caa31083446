"""Integration tests shared by SQLite and PostgreSQL (real servers): bad input, the
caller's own transaction, the record/record_many primitives, long keys, TTL. The bodies
live in ``_payments.py``; the server-specific tests in test_pg_integration.py and
test_sqlite_integration.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

if "_payments" not in sys.modules:  # rewrite the asserts of the shared test bodies
    pytest.register_assert_rewrite("_payments")
import _payments
from _payments import MISSING_KEYS, Db


@pytest.fixture
def db(sql_url: str) -> Iterator[Db]:
    """A ledger and records database, on SQLite and on PostgreSQL."""
    yield from Db.opened(sql_url)


@pytest.mark.parametrize("msg", MISSING_KEYS)
def test_missing_key_runs_nothing(db: Db, msg: dict[str, Any]) -> None:
    _payments.check_missing_key(db, msg)


def test_same_key_other_payload_is_a_conflict(db: Db) -> None:
    _payments.check_key_conflict(db)


def test_unserialisable_result_rolls_back_everything(db: Db) -> None:
    _payments.check_result_not_serializable(db)


@pytest.mark.parametrize("kind", ["connection", "session"])
def test_caller_controlled_transaction(db: Db, kind: str) -> None:
    _payments.check_caller_controlled_transaction(db, kind)


def test_record_and_record_many_in_the_callers_transaction(db: Db) -> None:
    _payments.check_record_primitives(db)


def test_long_keys_are_hashed_not_truncated(db: Db) -> None:
    _payments.check_long_keys(db)


def test_expired_record_is_processed_again(db: Db) -> None:
    _payments.check_ttl(db)
