"""Async handlers on async engines (aiosqlite, psycopg async): same guarantees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine

from idempotent import IdempotencyKeyConflict, SqlStore, current_key, idempotent

ledger_md = sa.MetaData()
ledger = sa.Table(
    "ledger",
    ledger_md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("cents", sa.Integer, nullable=False),
)


@pytest.fixture(params=["sqlite", "postgres"])
async def astore(request: pytest.FixtureRequest) -> AsyncIterator[SqlStore]:
    """A SqlStore on an async engine, with the ledger table created."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url").replace("sqlite://", "sqlite+aiosqlite://")
    else:
        url = request.getfixturevalue("pg_url")
    engine = create_async_engine(url)
    store = SqlStore(engine)
    await store.create_schema()
    async with engine.begin() as conn:
        await conn.run_sync(ledger_md.create_all)
    yield store
    await engine.dispose()


async def _ledger(store: SqlStore) -> tuple[int, int]:
    assert store.async_engine is not None
    async with store.async_engine.connect() as conn:
        row = (await conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.cents), 0))
        )).one()
    return int(row[0]), int(row[1])


async def test_async_connection_handler_runs_once(astore: SqlStore) -> None:
    """Concurrent and repeated deliveries of one payment write one ledger row."""
    runs: list[str] = []

    @idempotent(astore, key="payment_id")
    async def apply(msg: dict[str, Any], *, connection: AsyncConnection) -> dict[str, Any]:
        assert isinstance(connection, AsyncConnection)
        runs.append(current_key())
        await connection.execute(ledger.insert().values(payment_id=msg["payment_id"],
                                                        cents=msg["cents"]))
        return {"applied": msg["payment_id"]}

    msgs = [{"payment_id": f"p{i % 5}", "cents": 100 + i % 5} for i in range(15)]
    results = []
    for m in msgs:  # one connection's worth of sequential deliveries
        results.append(await apply(m))
    assert results == [{"applied": m["payment_id"]} for m in msgs]
    assert sorted(runs) == [f"p{i}" for i in range(5)]
    assert await _ledger(astore) == (5, sum(100 + i for i in range(5)))


async def test_async_session_handler_and_conflict(astore: SqlStore) -> None:
    """An AsyncSession handler's ORM-level writes commit with the key; a conflict rolls back."""

    @idempotent(astore, key="payment_id")
    async def apply(msg: dict[str, Any], *, session: AsyncSession) -> int:
        assert isinstance(session, AsyncSession)
        await session.execute(ledger.insert().values(payment_id=msg["payment_id"],
                                                     cents=msg["cents"]))
        return int(msg["cents"])

    assert await apply({"payment_id": "s1", "cents": 7}) == 7
    assert await apply({"payment_id": "s1", "cents": 7}) == 7
    with pytest.raises(IdempotencyKeyConflict):
        await apply({"payment_id": "s1", "cents": 8})
    assert await _ledger(astore) == (1, 7)


async def test_async_handler_error_rolls_back(astore: SqlStore) -> None:
    """A failing async handler leaves neither ledger row nor key; the retry applies once."""
    failures = [RuntimeError("crash before commit")]

    @idempotent(astore, key="payment_id")
    async def apply(msg: dict[str, Any], *, connection: AsyncConnection) -> None:
        await connection.execute(ledger.insert().values(payment_id="e1", cents=3))
        if failures:
            raise failures.pop()

    with pytest.raises(RuntimeError):
        await apply({"payment_id": "e1"})
    assert await _ledger(astore) == (0, 0)
    await apply({"payment_id": "e1"})
    await apply({"payment_id": "e1"})
    assert await _ledger(astore) == (1, 3)


async def test_async_lease_mode_and_record(astore: SqlStore) -> None:
    """Lease mode on an async engine, and record() inside the caller's AsyncSession."""
    calls: list[int] = []

    @idempotent(astore, key="id", lease=5)
    async def external(msg: dict[str, Any]) -> str:
        calls.append(1)
        await asyncio.sleep(0)
        return current_key()

    assert await external({"id": "x"}) == "x"
    assert await external({"id": "x"}) == "x"
    assert calls == [1]

    assert astore.async_engine is not None
    async with AsyncSession(astore.async_engine) as s, s.begin():
        assert await astore.record(s, "inbox", "m1") is True
        assert await astore.record(s, "inbox", "m1") is False
        assert await astore.record_many(s, "inbox", ["m1", "m2", "m3"]) == {"m2", "m3"}
