"""The asyncio fast path of RedisStore (`_AsyncConnections`), on a real redis-server.

A ``RedisStore(url, use_asyncio=True)`` runs its scripts on connections it keeps per event
loop, one coroutine per script call. These tests check that the path is taken, and what
it must never do: hand a reply to the wrong caller (concurrent deliveries, a cancelled
round trip), give up on a connection the server dropped without one reconnect, or reuse a
connection of an event loop that has ended.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
import redis
import redis.asyncio
from _servers import RedisServer
from sqlalchemy.util import greenlet_spawn

from idempotent import idempotent
from idempotent.exceptions import EvictionPolicyError
from idempotent.stores import redis as _mod
from idempotent.stores.redis import Claimed, Completed, RedisStore

#: A script that keeps the server busy about 200 ms, then answers.
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  local n = redis.call('TIME')
  if n[1] * 1000000 + n[2] - start > 200000 then break end
end
return 'the late reply'
"""


def _direct(store: RedisStore) -> Any:
    direct = store._direct
    assert isinstance(direct, _mod._AsyncConnections), direct
    return direct


def _idle(store: RedisStore) -> list[Any]:
    here = _direct(store).current
    assert here is not None
    return list(here.idle)


def _pool_untouched(store: RedisStore) -> None:
    pool = store.client.connection_pool
    assert not pool._available_connections and not list(pool._in_use_connections), (
        "a script call went through redis-py's pool")


def test_a_url_made_asyncio_store_takes_the_fast_path(redis_url: str) -> None:
    """Claims, completes, duplicates, the eviction check, TIME and SCRIPT LOAD all run on
    the store's own kept connection (one, for sequential calls), not on the pool; a
    client passed in is used as it is."""
    store = RedisStore(redis_url, use_asyncio=True)
    runs: list[str] = []

    @idempotent(store, key="id", lease=30)
    async def handler(msg: dict[str, Any]) -> dict[str, Any]:
        runs.append(msg["id"])
        return {"id": msg["id"]}

    async def main() -> None:
        assert [await handler({"id": f"k{i}"}) for i in range(5)] == [
            {"id": f"k{i}"} for i in range(5)]
        assert [await handler({"id": f"k{i}"}) for i in range(5)] == [
            {"id": f"k{i}"} for i in range(5)]
        await greenlet_spawn(store.load_scripts)
        assert await greenlet_spawn(store._now) > 1e9
        assert len(_idle(store)) == 1  # sequential calls: one connection
        _pool_untouched(store)
        await store.aclose()

    asyncio.run(main())
    assert runs == [f"k{i}" for i in range(5)]
    passed = RedisStore(redis.asyncio.Redis.from_url(redis_url))
    assert passed._direct is None
    asyncio.run(passed.aclose())
    assert RedisStore(redis_url)._direct is not None  # the sync twin
    assert not isinstance(RedisStore(redis_url)._direct, _mod._AsyncConnections)


def test_concurrent_deliveries_get_their_own_replies(redis_url: str) -> None:
    """Deliveries from asyncio.gather on one store, interleaved on the loop: each gets
    its own claim and its own stored result; at most one connection per concurrent
    call."""
    store = RedisStore(redis_url, use_asyncio=True)

    @idempotent(store, key="id", lease=30)
    async def handler(msg: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.001 * (msg["n"] % 3))  # finish out of order
        return {"id": msg["id"], "n": msg["n"]}

    async def main() -> None:
        msgs = [{"id": f"c{n}", "n": n} for n in range(40)]
        first = await asyncio.gather(*(handler(m) for m in msgs))
        again = await asyncio.gather(*(handler(m) for m in reversed(msgs)))
        assert first == [{"id": m["id"], "n": m["n"]} for m in msgs]
        assert again == [{"id": m["id"], "n": m["n"]} for m in reversed(msgs)]
        outs = await asyncio.gather(*(greenlet_spawn(store.claim, "ns", f"d{n}",
                                                     fingerprint=None) for n in range(30)))
        assert all(isinstance(o, Claimed) for o in outs)
        assert len({o.token for o in outs}) == 30  # type: ignore[union-attr]
        for n, o in enumerate(outs):
            await greenlet_spawn(store.complete, "ns", f"d{n}", o.token,  # type: ignore[union-attr]
                                 f"result {n}".encode())
        seen = await asyncio.gather(*(greenlet_spawn(store.claim, "ns", f"d{n}",
                                                     fingerprint=None) for n in range(30)))
        for n, o in enumerate(seen):
            assert isinstance(o, Completed) and o.record.result == f"result {n}".encode()
        here = _direct(store).current
        print(f"connections made for 40 concurrent deliveries: {here.count}")
        assert 1 < here.count <= 40 and len(here.idle) == here.count
        _pool_untouched(store)
        await store.aclose()

    asyncio.run(main())


def test_a_round_trip_cancelled_midway_leaves_no_stale_reply(redis_url: str) -> None:
    """A call cancelled after its command was sent and before its reply came (a script
    that keeps the server busy 200 ms, cancelled after 20 ms) disconnects its connection:
    the next calls on the same store, which reuse it, read their own replies."""
    store = RedisStore(redis_url, use_asyncio=True)
    busy = _mod._Script(BUSY)

    async def main() -> None:
        assert isinstance(await greenlet_spawn(store.claim, "ns", "warm", fingerprint=None),
                          Claimed)
        conn = _idle(store)[0]
        for call in (_direct(store).evalsha(busy, 0, ()),
                     _direct(store).execute("EVAL", BUSY, 0)):
            task = asyncio.ensure_future(call)
            await asyncio.sleep(0.02)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert _idle(store) == [conn] and not conn.is_connected  # discarded
            out = await greenlet_spawn(store.claim, "ns", f"after-{id(call)}",
                                       fingerprint=None)
            print(f"claim after a cancelled busy call -> {out!r}")
            assert isinstance(out, Claimed), f"got the cancelled call's reply: {out!r}"
            assert await _direct(store).execute("PING") == b"PONG"
            assert _idle(store) == [conn] and conn.is_connected  # the same one, reconnected
        await asyncio.sleep(0.25)  # the last busy script is over: nothing arrives late
        assert await _direct(store).execute("ECHO", "mine") == b"mine"
        await store.aclose()

    asyncio.run(main())


def test_a_killed_connection_is_reconnected_once(redis_url: str) -> None:
    """CLIENT KILL of the kept connection: the next call fails on it, reconnects once
    (the URL client's Retry) and succeeds, on the same connection object; a connection
    the pool never saw."""
    store = RedisStore(redis_url, use_asyncio=True)
    admin = redis.Redis.from_url(redis_url)

    async def main() -> None:
        await greenlet_spawn(store.claim, "ns", "a", fingerprint=None)
        conn = _idle(store)[0]
        before = await _direct(store).execute("CLIENT", "ID")
        connects = []
        real_connect = conn.connect

        async def counted() -> None:
            connects.append(1)
            await real_connect()

        conn.connect = counted
        for _ in range(2):
            killed = await asyncio.to_thread(admin.execute_command, "CLIENT", "KILL", "ID",
                                              before)
            assert killed == 1
            await asyncio.sleep(0.05)  # the server's close has reached the client
            out = await greenlet_spawn(store.claim, "ns", f"b{len(connects)}",
                                       fingerprint=None)
            assert isinstance(out, Claimed), out
            after = await _direct(store).execute("CLIENT", "ID")
            print(f"client id {before} killed -> reconnected as {after}")
            assert after != before and _idle(store) == [conn]
            before = after
        assert len(connects) == 2  # one reconnect per kill
        _pool_untouched(store)
        await store.aclose()

    asyncio.run(main())
    admin.close()


def test_two_event_loops_one_after_the_other(redis_url: str) -> None:
    """asyncio.run twice on one store: the second loop gets its own connections (a
    connection of the first, whose loop is closed, would fail there) and the first
    loop's are closed, without ResourceWarnings (the suite turns warnings into errors)."""
    store = RedisStore(redis_url, use_asyncio=True)
    admin = redis.Redis.from_url(redis_url)

    @idempotent(store, key="id", lease=30)
    async def handler(msg: dict[str, Any]) -> dict[str, Any]:
        return {"id": msg["id"]}

    loops: list[Any] = []
    addrs: list[set[str]] = []

    async def main(tag: str) -> None:
        assert await handler({"id": tag}) == {"id": tag}
        assert await handler({"id": tag}) == {"id": tag}
        got = await asyncio.gather(*(handler({"id": f"{tag}{i}"}) for i in range(4)))
        assert got == [{"id": f"{tag}{i}"} for i in range(4)]
        here = _direct(store).current
        loops.append(here)
        addrs.append({"{}:{}".format(*c._writer.get_extra_info("sockname")[:2])
                      for c in here.idle})

    def connected() -> set[str]:
        return {c["addr"] for c in admin.client_list()}

    asyncio.run(main("a"))
    assert addrs[0] <= connected()
    asyncio.run(main("b"))
    assert loops[0] is not loops[1] and loops[0].loop is not loops[1].loop
    assert loops[0].loop not in _direct(store).loops  # the closed loop's are forgotten
    assert not loops[0].idle and loops[0].count == 0
    gc.collect()
    now = connected()
    print(f"loop 1 connections {sorted(addrs[0])}, loop 2 {sorted(addrs[1])}")
    assert addrs[1] <= now and not addrs[0] & now  # loop 1's sockets were closed

    async def close() -> None:
        await store.aclose()

    asyncio.run(close())
    gc.collect()
    admin.close()


def test_noscript_is_answered_on_the_same_connection(redis_url: str) -> None:
    """SCRIPT FLUSH, then a claim: NOSCRIPT, then EVAL, in the same call and on the same
    connection and socket (a whole error reply read leaves nothing behind)."""
    store = RedisStore(redis_url, use_asyncio=True)
    admin = redis.Redis.from_url(redis_url)

    async def main() -> None:
        await greenlet_spawn(store.claim, "ns", "a", fingerprint=None)
        conn = _idle(store)[0]
        writer = conn._writer
        admin.script_flush()
        out = await greenlet_spawn(store.claim, "ns", "b", fingerprint=None)
        assert isinstance(out, Claimed)
        assert _idle(store) == [conn] and conn._writer is writer
        await store.aclose()

    asyncio.run(main())
    admin.close()


def test_eviction_policy_read_on_the_fast_path(caplog: pytest.LogCaptureFixture) -> None:
    """The eviction check on the store's own connections: CONFIG GET, and INFO memory for
    a user who may not run CONFIG; one who may run neither gets the warning."""
    with RedisServer(["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]) as server:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("noconfig", enabled=True, passwords=["+pw"], keys=["*"],
                          commands=["+@all", "-config"])
        admin.acl_setuser("blind", enabled=True, passwords=["+pw"], keys=["*"],
                          commands=["+@all", "-config", "-info"])
        host = server.url.removeprefix("redis://")

        async def claim(url: str, key: str = "k") -> Any:
            store = RedisStore(url, use_asyncio=True)
            _direct(store)
            try:
                return await greenlet_spawn(store.claim, "ns", key, fingerprint=None)
            except EvictionPolicyError as exc:
                return exc
            finally:
                await store.aclose()

        for url in (server.url, f"redis://noconfig:pw@{host}"):
            got = asyncio.run(claim(url))
            assert isinstance(got, EvictionPolicyError) and "volatile-lru" in str(got), got
        with caplog.at_level(logging.WARNING, logger="idempotent"):
            got = asyncio.run(claim(f"redis://blind:pw@{host}"))
        assert isinstance(got, Claimed)
        assert any("maxmemory-policy" in r.getMessage() for r in caplog.records)
        admin.config_set("maxmemory-policy", "noeviction")
        assert isinstance(asyncio.run(claim(server.url, "k2")), Claimed)
        admin.close()
