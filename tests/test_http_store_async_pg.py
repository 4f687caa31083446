"""The async PostgreSQL fast path the HTTP layer's transactional mode runs on
(``SqlStore`` over ``postgresql+psycopg_async``): the decorator's transactional mode, with
its duplicates, rollbacks, row-lock waits and lost connections, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from idempotent import AlreadyInProgress, SqlStore, StoreUnavailable, idempotent, no_retry

LEDGER = sa.table("ledger", sa.column("key"), sa.column("cents"))


@pytest.fixture
def urls(pg_url: str) -> tuple[str, str]:
    sync = SqlStore(pg_url)
    sync.create_schema()
    with sync.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE ledger (key text, cents int)")
    sync.engine.dispose()
    return pg_url, pg_url.replace("+psycopg://", "+psycopg_async://")


def _rows(url: str) -> list[tuple[str, int]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT key, cents FROM ledger ORDER BY key, cents"))]  # type: ignore[misc]
    finally:
        engine.dispose()


async def _with_store(url: str, body: Callable[[SqlStore], Any], **options: Any) -> Any:
    lock_timeout = options.pop("lock_timeout", 5.0)
    engine = create_async_engine(url, **options)
    try:
        store = SqlStore(engine, lock_timeout=lock_timeout)
        assert store._async_fast() is not None  # the path under test
        return await body(store)
    finally:
        await engine.dispose()


def test_commit_replay_and_rollback(urls: tuple[str, str]) -> None:
    """A new key commits the handler's row with the key; a duplicate replays without
    running; a handler that raises leaves nothing, and its retry runs once."""
    sync_url, url = urls
    runs: list[str] = []

    async def body(store: SqlStore) -> None:
        @idempotent(store, key="id", optimistic=False)
        async def pay(msg: dict[str, Any], *, session: AsyncSession) -> dict[str, Any]:
            runs.append(msg["id"])
            await session.execute(sa.insert(LEDGER).values(key=msg["id"], cents=msg["cents"]))
            if msg.get("fail"):
                raise RuntimeError("declined")
            return {"paid": msg["cents"]}

        assert await pay({"id": "a", "cents": 5}) == {"paid": 5}
        assert await pay({"id": "a", "cents": 5}) == {"paid": 5}
        with pytest.raises(RuntimeError):
            await pay({"id": "b", "cents": 7, "fail": True})
        assert await pay({"id": "b", "cents": 7, "fail": False}) == {"paid": 7}

    asyncio.run(_with_store(url, body))
    assert runs == ["a", "b", "b"]
    assert _rows(sync_url) == [("a", 5), ("b", 7)]


def test_duplicate_waits_on_row_lock_without_blocking_the_loop(urls: tuple[str, str]) -> None:
    """A concurrent duplicate waits on the key's row lock (pessimistic) while the event
    loop keeps running other tasks, then gets the first result; one row."""
    sync_url, url = urls
    runs: list[int] = []

    async def body(store: SqlStore) -> None:
        gate, entered = asyncio.Event(), asyncio.Event()

        @idempotent(store, key="id", optimistic=False, fingerprint=["id"])
        async def pay(msg: dict[str, Any], *, session: AsyncSession) -> dict[str, Any]:
            runs.append(msg["n"])
            await session.execute(sa.insert(LEDGER).values(key=msg["id"], cents=1))
            entered.set()
            await gate.wait()
            return {"by": msg["n"]}

        first = asyncio.create_task(pay({"id": "k", "n": 1}))
        await entered.wait()
        second = asyncio.create_task(pay({"id": "k", "n": 2}))
        await _until_lock_wait(sync_url)
        gate.set()  # this line runs while the duplicate waits: the loop is not blocked
        assert await first == {"by": 1}
        assert await second == {"by": 1}

    asyncio.run(_with_store(url, body))
    assert runs == [1]
    assert _rows(sync_url) == [("k", 1)]


async def _until_lock_wait(sync_url: str) -> None:
    """Until a backend of the test database waits on a lock (pg_stat_activity)."""
    dsn = sa.make_url(sync_url).set(drivername="postgresql").render_as_string(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30

    def waiting() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               "current_database() AND wait_event_type = 'Lock'").fetchone()
            return bool(row and row[0])

    while not await asyncio.to_thread(waiting):
        assert loop.time() < deadline, "no backend waited on the key's lock"
        await asyncio.sleep(0.01)


def test_lock_timeout_is_already_in_progress(urls: tuple[str, str]) -> None:
    """A duplicate that outwaits lock_timeout gets AlreadyInProgress; nothing of it stays."""
    sync_url, url = urls

    async def body(store: SqlStore) -> None:
        gate, entered = asyncio.Event(), asyncio.Event()

        @idempotent(store, key="id", optimistic=False, retry=no_retry(), fingerprint=["id"])
        async def pay(msg: dict[str, Any], *, session: AsyncSession) -> str:
            await session.execute(sa.insert(LEDGER).values(key=msg["id"], cents=msg["n"]))
            if msg["n"] == 1:
                entered.set()
                await gate.wait()
            return "ok"

        first = asyncio.create_task(pay({"id": "t", "n": 1}))
        await entered.wait()
        with pytest.raises(AlreadyInProgress):
            await pay({"id": "t", "n": 2})
        gate.set()
        assert await first == "ok"

    asyncio.run(_with_store(url, body, lock_timeout=0.2))
    assert _rows(sync_url) == [("t", 1)]


def test_connection_terminated_mid_handler(urls: tuple[str, str], pg_server: Any) -> None:
    """The transaction's backend terminated while the handler runs: the attempt rolled
    back; with retries off that is StoreUnavailable or the driver's error, never a
    commit; the next delivery runs once on a fresh connection."""
    sync_url, url = urls
    db = sa.make_url(sync_url).database
    calls: list[int] = []

    async def body(store: SqlStore) -> None:
        @idempotent(store, key="id", optimistic=False, retry=no_retry())
        async def pay(msg: dict[str, Any], *, session: AsyncSession) -> str:
            calls.append(1)
            await session.execute(sa.insert(LEDGER).values(key=msg["id"], cents=3))
            if len(calls) == 1:
                await asyncio.to_thread(lambda: pg_server.terminate_backends(dbname=db))
            return "ok"

        with pytest.raises((StoreUnavailable, sa.exc.DBAPIError, psycopg.Error)):
            await pay({"id": "x"})
        assert await pay({"id": "x"}) == "ok"

    asyncio.run(_with_store(url, body, pool_pre_ping=True))
    assert _rows(sync_url) == [("x", 3)]


def test_fast_path_false_turns_the_async_path_off(urls: tuple[str, str]) -> None:
    """``SqlStore(..., fast_path=False)`` (PgBouncer in transaction mode, say) goes through
    SQLAlchemy on an async engine too, with the same outcome: one row, one replay."""
    sync_url, url = urls

    async def main() -> None:
        engine = create_async_engine(url)
        try:
            store = SqlStore(engine, fast_path=False)
            assert store._async_fast() is None

            @idempotent(store, key="id", optimistic=False)
            async def pay(msg: dict[str, Any], *, session: AsyncSession) -> str:
                await session.execute(LEDGER.insert().values(key=msg["id"], cents=msg["cents"]))
                return "ok"

            assert await pay({"id": "slow-1", "cents": 3}) == "ok"
            assert await pay({"id": "slow-1", "cents": 3}) == "ok"
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert _rows(sync_url) == [("slow-1", 3)]
