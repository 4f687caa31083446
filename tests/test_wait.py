"""``wait=``: a duplicate that finds its key in progress waits for the first outcome."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idempotent import AlreadyInProgress, MemoryStore, RedisStore, SqlStore, idempotent

DEADLINE = 30.0


def until(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Wait for ``cond`` with a deadline (never a bare sleep)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(params=["memory", "redis", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "postgres":
        sql = SqlStore(request.getfixturevalue("pg_url"))
        sql.create_schema()
        try:
            yield sql
        finally:
            sql.engine.dispose()
        return
    url = request.getfixturevalue("redis_url")
    s = RedisStore(url)
    try:
        yield s
    finally:
        s.close()


def _holder(store: Any, wait: float | None) -> tuple[Any, threading.Event, threading.Event,
                                                     list[str]]:
    """A handler whose first call blocks until ``go`` is set (``fail`` in the message:
    it raises then)."""
    entered, go = threading.Event(), threading.Event()
    runs: list[str] = []

    @idempotent(store, key="id", lease=30, wait=wait, fingerprint=False)
    def charge(msg: dict[str, Any]) -> dict[str, Any]:
        runs.append(msg["who"])
        if msg["who"] == "first":
            entered.set()
            assert go.wait(DEADLINE)
            if msg.get("fail"):
                raise RuntimeError("first attempt failed")
        return {"charged": msg["who"]}

    return charge, entered, go, runs


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_waiting_duplicate_gets_first_result(store: Any) -> None:
    """A duplicate arriving while the first runs gets the first result; one run."""
    charge, entered, go, runs = _holder(store, wait=DEADLINE)
    t1, out1 = _in_thread(lambda: charge({"id": "p1", "who": "first"}))
    assert entered.wait(DEADLINE)
    t2, out2 = _in_thread(lambda: charge({"id": "p1", "who": "second"}))
    # the duplicate is waiting (not failed) while the first holds the key
    until(lambda: not t2.is_alive() or _waiting(store, charge.namespace), "the duplicate to wait")
    assert t2.is_alive()
    go.set()
    t1.join(DEADLINE)
    t2.join(DEADLINE)
    assert out1 == [{"charged": "first"}]
    assert out2 == [{"charged": "first"}]
    assert runs == ["first"]


def _waiting(store: Any, namespace: str) -> bool:
    """A waiter subscribed (Redis) or listening (PostgreSQL); memory has no signal (the
    waiter polls)."""
    if isinstance(store, RedisStore):
        return any(n for _, n in store.client.pubsub_numsub(store.key_name(namespace, "p1")))
    if isinstance(store, SqlStore):
        return _listening(store)
    return True


def _listening(store: SqlStore) -> bool:
    """A session of this database is waiting after its LISTEN."""
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN idem_%' AND pid <> pg_backend_pid()")).scalar())


def test_waiting_duplicate_runs_when_first_released(store: Any) -> None:
    """The first attempt raises (key released): the waiting duplicate runs itself."""
    charge, entered, go, runs = _holder(store, wait=DEADLINE)
    t1, out1 = _in_thread(lambda: charge({"id": "p2", "who": "first", "fail": True}))
    assert entered.wait(DEADLINE)
    t2, out2 = _in_thread(lambda: charge({"id": "p2", "who": "second"}))
    go.set()
    t1.join(DEADLINE)
    t2.join(DEADLINE)
    assert isinstance(out1[0], RuntimeError)
    assert out2 == [{"charged": "second"}]
    assert runs == ["first", "second"]


def test_wait_deadline_then_already_in_progress(store: Any) -> None:
    """A first delivery that outlasts ``wait``: the duplicate gets AlreadyInProgress."""
    charge, entered, go, runs = _holder(store, wait=0.2)
    t1, _ = _in_thread(lambda: charge({"id": "p3", "who": "first"}))
    assert entered.wait(DEADLINE)
    try:
        with pytest.raises(AlreadyInProgress) as info:
            charge({"id": "p3", "who": "second"})
        assert info.value.key == "p3"
        assert info.value.lease_until is not None
    finally:
        go.set()
        t1.join(DEADLINE)
    assert runs == ["first"]


def test_no_wait_is_immediate_409_semantics(store: Any) -> None:
    """Without ``wait=`` a duplicate raises at once (the first is still blocked)."""
    charge, entered, go, _ = _holder(store, wait=None)
    t1, _ = _in_thread(lambda: charge({"id": "p4", "who": "first"}))
    assert entered.wait(DEADLINE)
    try:
        with pytest.raises(AlreadyInProgress):
            charge({"id": "p4", "who": "second"})
        assert not go.is_set()  # it did not wait for the first to finish
    finally:
        go.set()
        t1.join(DEADLINE)


def test_redis_wait_change_is_woken_by_complete(redis_url: str) -> None:
    """Rule WAKE on Redis: a complete by another client wakes a subscribed waiter (the
    call returns True long before its 30 s timeout would make it False)."""
    with _closing(RedisStore(redis_url)) as a, _closing(RedisStore(redis_url)) as b:
        claimed = a.claim("ns", "k", fingerprint=None, lease=30)
        t, out = _in_thread(lambda: b.wait_change("ns", "k", DEADLINE))
        name = a.key_name("ns", "k")
        until(lambda: a.client.pubsub_numsub(name)[0][1] >= 1, "the waiter to subscribe")
        a.complete("ns", "k", claimed.token, b'"done"')
        t.join(DEADLINE)
        assert out == [True]
        # and a release wakes too
        claimed = a.claim("ns", "k2", fingerprint=None, lease=30)
        t, out = _in_thread(lambda: b.wait_change("ns", "k2", DEADLINE))
        name = a.key_name("ns", "k2")
        until(lambda: a.client.pubsub_numsub(name)[0][1] >= 1, "the waiter to subscribe")
        assert a.release("ns", "k2", claimed.token)
        t.join(DEADLINE)
        assert out == [True]
        # a key not in progress: True at once; a live lease and a short timeout: False
        assert b.wait_change("ns", "absent", DEADLINE) is True
        a.claim("ns", "k3", fingerprint=None, lease=30)
        assert b.wait_change("ns", "k3", 0.05) is False


class _closing:
    def __init__(self, store: Any) -> None:
        self.store = store

    def __enter__(self) -> Any:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def test_async_waiting_duplicate_redis(redis_url: str) -> None:
    """An ``async def`` handler on an asyncio RedisStore: concurrent duplicates wait on
    the event loop (pub/sub, not blocking it) and all get the first result; one run."""
    runs: list[int] = []

    async def main() -> list[Any]:
        store = RedisStore(redis_url, use_asyncio=True)
        gate = asyncio.Event()

        @idempotent(store, key="id", lease=30, wait=DEADLINE, fingerprint=False)
        async def charge(msg: dict[str, Any]) -> dict[str, Any]:
            runs.append(msg["n"])
            await gate.wait()
            return {"charged": msg["n"]}

        try:
            tasks = [asyncio.create_task(charge({"id": "a1", "n": i})) for i in range(10)]
            while not runs:
                await asyncio.sleep(0.005)
            gate.set()  # the loop is not blocked: the waiters let this run
            return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
        finally:
            await store.aclose()

    results = asyncio.run(main())
    assert len(runs) == 1
    assert results == [{"charged": runs[0]}] * 10


def test_wait_refused_in_transactional_mode_and_bad_values(sqlite_url: str) -> None:
    """``wait=`` is lease mode's; negative or NaN waits are refused at decoration."""
    store = SqlStore(sqlite_url)
    try:
        with pytest.raises(TypeError, match="lease mode"):
            @idempotent(store, key="id", wait=1.0)
            def tx(msg: dict[str, Any], *, session: Any) -> None: ...
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="wait"):
                @idempotent(MemoryStore(), key="id", wait=bad)
                def f(msg: dict[str, Any]) -> None: ...
    finally:
        store.engine.dispose()


def test_postgres_wait_change_is_woken_by_notify(pg_url: str) -> None:
    """Rule WAKE on PostgreSQL: a waiter LISTENing on the key's channel is woken by
    `signal_change` (the call returns True long before its 30 s timeout); a key not in
    progress is True at once; a live lease and a short timeout is False."""
    a, b = SqlStore(pg_url), SqlStore(pg_url)
    a.create_schema()
    try:
        claimed = a.claim("ns", "k", fingerprint=None, lease=30)
        t, out = _in_thread(lambda: b.wait_change("ns", "k", DEADLINE))
        until(lambda: _listening(a), "the waiter to LISTEN")
        a.complete("ns", "k", claimed.token, b'"done"')
        a.signal_change("ns", "k")
        t.join(DEADLINE)
        assert out == [True]
        assert b.wait_change("ns", "absent", DEADLINE) is True
        a.claim("ns", "k3", fingerprint=None, lease=30)
        assert b.wait_change("ns", "k3", 0.05) is False
    finally:
        a.engine.dispose()
        b.engine.dispose()


def test_async_waiting_duplicate_postgres(pg_url: str) -> None:
    """``async def`` handlers on an async PostgreSQL engine: duplicates LISTEN without
    blocking the loop and get the first result; one run."""
    from sqlalchemy.ext.asyncio import create_async_engine

    sync = SqlStore(pg_url)
    sync.create_schema()
    sync.engine.dispose()
    runs: list[int] = []

    async def main() -> list[Any]:
        engine = create_async_engine(pg_url.replace("+psycopg://", "+psycopg_async://"))
        store = SqlStore(engine)
        gate = asyncio.Event()

        @idempotent(store, key="id", lease=30, wait=DEADLINE, fingerprint=False)
        async def charge(msg: dict[str, Any]) -> dict[str, Any]:
            runs.append(msg["n"])
            await gate.wait()
            return {"charged": msg["n"]}

        try:
            tasks = [asyncio.create_task(charge({"id": "a1", "n": i})) for i in range(5)]
            while not runs:
                await asyncio.sleep(0.005)
            gate.set()
            return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
        finally:
            await engine.dispose()

    results = asyncio.run(main())
    assert len(runs) == 1
    assert results == [{"charged": runs[0]}] * 5


def test_redis_user_without_pubsub_rights_still_completes_and_waits(
        redis_url: str) -> None:
    """An ACL user without channel rights (``resetchannels``): a complete whose record a
    duplicate marked still succeeds (the publish is refused quietly) and the duplicate,
    which cannot subscribe, polls and gets the first result."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("idem-nochan", enabled=True, passwords=["+pw"], keys=["idem:*"],
                      commands=["+@all"], channels=[], reset_channels=True)
    store = RedisStore(redis_url.replace("redis://", "redis://idem-nochan:pw@"))
    try:
        charge, entered, go, runs = _holder(store, wait=DEADLINE)
        t1, out1 = _in_thread(lambda: charge({"id": "acl", "who": "first"}))
        assert entered.wait(DEADLINE)
        t2, out2 = _in_thread(lambda: charge({"id": "acl", "who": "second"}))
        name = store.key_name(charge.namespace, "acl")
        # the duplicate waits; a marked record makes the holder's complete publish
        admin.hset(name, "w", "1")
        go.set()
        t1.join(DEADLINE)
        t2.join(DEADLINE)
        assert out1 == out2 == [{"charged": "first"}]
        assert runs == ["first"]
    finally:
        store.close()
        admin.acl_deluser("idem-nochan")
        admin.close()
