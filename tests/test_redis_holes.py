"""Regression tests for the holes of issue 9 that live in RedisStore: each of the
``test_hole_*`` tests failed on the RedisStore of 30c05cb and passes now. Real
redis-server processes on 127.0.0.1 (the session server, the session cluster, and private
servers started here and stopped by PID).

A worker whose clock is skewed is emulated by moving ``time.time`` itself (monkeypatch)
during that worker's calls: that is what a skewed host's clock is, for this code and for
redis-py alike; the store must not care."""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytest
import redis
from _servers import RedisServer

from idempotent import (
    AlreadyInProgress,
    Claimed,
    Completed,
    IdempotencyError,
    InProgress,
    InvalidIdempotencyKey,
    ResultNotSerializable,
    ResultNotStored,
    State,
    idempotent,
)
from idempotent._rules import not_stored
from idempotent.retry import is_transient
from idempotent.stores.redis import RedisStore

_mod = importlib.import_module("idempotent.stores.redis")
#: Defined by the fix; the code before it has neither (then the tests fail, not error).
EvictionPolicyError: type[Exception] = getattr(_mod, "EvictionPolicyError", IdempotencyError)
_real_time = time.time


@contextmanager
def skewed(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This host's clock (``time.time``) runs ``seconds`` off inside the block."""
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: _real_time() + seconds)
        yield


def window(call: Callable[[], Any]) -> tuple[float, Any, float]:
    """(real time before, call(), real time after), around ``call``; Redis' TIME has
    microseconds, so the bounds are widened by 1 ms."""
    before = _real_time() - 0.001
    out = call()
    return before, out, _real_time() + 0.001


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- hole 8: time is the store's --------------------------------------------------------------
def test_hole_8_a_worker_60s_ahead_cannot_take_over_a_live_lease(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One store holds a key with a live 30 s lease; another, on a host whose clock runs
    60 s ahead, claims it (alone, in a batch, through the decorator): InProgress, never
    Claimed, and its ``now`` is the server's, not the skewed host's."""
    holder, other = RedisStore(redis_url), RedisStore(redis_url)
    got = holder.claim("pay", "k", fingerprint=None, lease=30)
    assert isinstance(got, Claimed)
    runs: list[str] = []

    @idempotent(other, key="id", namespace="pay", lease=30)
    def charge(msg: dict[str, str]) -> str:
        runs.append(msg["id"])
        return "charged"

    with skewed(monkeypatch, 60):
        before, out, after = window(lambda: other.claim("pay", "k", fingerprint=None))
        many = other.claim_many("pay", ["k", "fresh"], lease=30)
        with pytest.raises(AlreadyInProgress) as busy:
            charge({"id": "k"})
    print(f"skewed +60 s claim of a live 30 s lease -> {out!r}")
    assert isinstance(out, InProgress), f"a worker 60 s ahead got {out!r}"
    assert before <= out.now <= after, "InProgress.now must be the store's time"
    assert out.record.lease_until == got.lease_until
    assert isinstance(many["k"], InProgress) and isinstance(many["fresh"], Claimed)
    assert before <= many["fresh"].lease_until - 30 <= _real_time() + 0.001
    assert runs == [] and busy.value.lease_until == got.lease_until
    assert 0 < busy.value.retry_after <= 30  # the holder's lease, on the store's clock
    rec = holder.get("pay", "k")
    assert rec is not None and rec.token == got.token  # still the holder's
    holder.close()
    other.close()


def test_hole_8_5s_skew_against_a_6s_lease(redis_url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder whose clock runs 5 s behind claims with a 6 s lease and renews it; the
    deadlines are the server's now + 6 s (its clock would make them 1 s away). A claimer
    5 s ahead sees the 6 s lease, not one about to run out. Completion times are the
    server's too."""
    holder, claimer = RedisStore(redis_url), RedisStore(redis_url)
    with skewed(monkeypatch, -5):
        before, got, after = window(lambda: holder.claim("pay", "k", fingerprint=None,
                                                         lease=6, ttl=100))
    assert isinstance(got, Claimed)
    print(f"claim by a worker 5 s behind, lease 6 s: deadline {got.lease_until - before:+.3f}"
          " s from the real now")
    assert before + 6 <= got.lease_until <= after + 6, "the lease deadline is not now + 6"
    with skewed(monkeypatch, -5):
        before, until, after = window(lambda: holder.renew("pay", "k", got.token, 6))
    assert before + 6 <= until <= after + 6
    rec = holder.get("pay", "k")
    assert rec is not None and rec.lease_until == until
    assert rec.expires_at - rec.created_at == pytest.approx(100)
    with skewed(monkeypatch, 5):
        before, out, after = window(lambda: claimer.claim("pay", "k", fingerprint=None))
    assert isinstance(out, InProgress), out
    assert before <= out.now <= after
    with skewed(monkeypatch, -5):
        before, _, after = window(lambda: holder.complete("pay", "k", got.token, b"ok",
                                                          ttl=100))
    rec = holder.get("pay", "k")
    assert rec is not None and rec.completed_at is not None
    assert before <= rec.completed_at <= after
    assert rec.expires_at == pytest.approx(rec.completed_at + 100)
    holder.close()
    claimer.close()


def test_hole_8_purge_on_a_host_8_days_ahead_keeps_live_records(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``idempotent purge`` run on a host whose clock is 8 days ahead deletes nothing that
    is live on the server's clock (a live lease, a completed key with a 7-day ttl), and
    stats count nothing expired."""
    store = RedisStore(redis_url)
    done = store.claim("ns", "done", fingerprint=None)
    assert isinstance(done, Claimed)
    store.complete("ns", "done", done.token, b"1")
    assert isinstance(store.claim("ns", "leased", fingerprint=None, lease=30), Claimed)
    with skewed(monkeypatch, 8 * 86400):
        purged = store.purge()
        stats = store.stats()
    print(f"purge on a host 8 days ahead deleted {purged} of 2 live records")
    assert purged == 0
    assert sum(c.expired for c in stats.counts) == 0
    assert store.get("ns", "done") is not None and store.get("ns", "leased") is not None
    store.close()


def test_store_time_is_one_time_round_trip(redis_url: str) -> None:
    """Store.now() is the server's TIME, one command."""
    store = RedisStore(redis_url)
    store.client.config_resetstat()
    before, now, after = window(store.now)
    assert before <= now <= after
    stats = store.client.info("commandstats")
    assert stats["cmdstat_time"]["calls"] == 1
    store.close()


# -- takeover reported, native expiry not one second after the lease ----------------------------
def test_hole_2_in_progress_record_is_kept_natively_until_its_expiry(redis_url: str) -> None:
    """An in-progress record's native expiry follows its ``expires_at`` (ttl), not its
    lease; a renewal leaves it there (and moves it only for a lease past the ttl)."""
    store = RedisStore(redis_url)
    got = store.claim("ns", "k", fingerprint=None, lease=10, ttl=3600)
    assert isinstance(got, Claimed)
    name = store.key_name("ns", "k")
    pttl = store.client.pttl(name)
    print(f"in-progress record, lease 10 s, ttl 3600 s: PTTL {pttl} ms")
    assert 3_599_000 < pttl <= 3_601_001
    store.renew("ns", "k", got.token, 20)
    assert 3_598_000 < store.client.pttl(name) <= 3_601_001
    long = store.claim("ns", "long", fingerprint=None, lease=100, ttl=5)
    assert isinstance(long, Claimed)
    assert 99_000 < store.client.pttl(store.key_name("ns", "long")) <= 101_001
    short = store.claim("ns", "short", fingerprint=None, lease=2, ttl=5)
    assert isinstance(short, Claimed)
    store.renew("ns", "short", short.token, 50)  # past expires_at: the GC waits for it
    assert 49_000 < store.client.pttl(store.key_name("ns", "short")) <= 51_001
    store.close()


def test_hole_2_takeover_after_lease_plus_one_second_is_reported(redis_url: str) -> None:
    """A 1 s lease left to run out: a claim made after lease + 1 s (when the old native
    expiry had removed the record) still finds it and reports ``taken_over=True``."""
    first_store, second_store = RedisStore(redis_url), RedisStore(redis_url)
    got = first_store.claim("ns", "k", fingerprint="a" * 64, lease=1.0, ttl=3600)
    assert isinstance(got, Claimed)
    gone_at = got.lease_until + 1.0 + 0.05  # the old GC: lease + 1 s (+ 1 ms rounding)
    wait_for(lambda: second_store.now() > gone_at, "the store's clock past lease + 1 s")
    again = second_store.claim("ns", "k", fingerprint="a" * 64, lease=30, ttl=3600)
    print(f"claim after lease + 1 s -> {again!r}")
    assert isinstance(again, Claimed) and again.taken_over, again
    assert again.token != got.token
    first_store.close()
    second_store.close()


# -- hole 5: eviction, replicas -----------------------------------------------------------------
@pytest.fixture
def evicting_redis() -> Iterator[RedisServer]:
    """A private redis-server with maxmemory-policy volatile-lru (managed services'
    default), stopped by PID afterwards."""
    with RedisServer(["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]) as server:
        yield server


def _config_calls(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_config|get", {}).get("calls", 0))
    finally:
        client.close()


def test_hole_5_an_evicting_redis_is_refused(evicting_redis: RedisServer) -> None:
    """With maxmemory-policy volatile-lru (then allkeys-lru) the first operation raises an
    error naming the setting; nothing is written; the answer is cached (one CONFIG GET);
    allow_eviction=True opts out; noeviction is accepted."""
    admin = redis.Redis.from_url(evicting_redis.url)
    for policy in ("volatile-lru", "allkeys-lru"):
        admin.config_set("maxmemory-policy", policy)
        admin.config_resetstat()
        store = RedisStore(evicting_redis.url)
        with pytest.raises(EvictionPolicyError) as err:
            store.claim("ns", "k", fingerprint=None)
        print(f"{policy}: {err.value}")
        assert "maxmemory-policy" in str(err.value) and policy in str(err.value)
        assert "noeviction" in str(err.value) and "allow_eviction" in str(err.value)
        assert isinstance(err.value, IdempotencyError)
        for op in (partial(store.claim, "ns", "k", fingerprint=None),
                   partial(store.claim_many, "ns", ["a", "b"]),
                   partial(store.complete, "ns", "k", "t" * 32, b"x"),
                   partial(store.get, "ns", "k")):
            with pytest.raises(EvictionPolicyError):
                op()
        assert admin.dbsize() == 0
        assert _config_calls(evicting_redis) == 1
        store.close()
        cache = RedisStore(evicting_redis.url, allow_eviction=True)
        assert isinstance(cache.claim("ns", "k", fingerprint=None), Claimed)
        assert _config_calls(evicting_redis) == 1  # opted out: not even asked
        cache.close()
        admin.flushall()
    admin.config_set("maxmemory-policy", "volatile-lru")
    refused = asyncio.run(_async_claim(RedisStore(evicting_redis.url, use_asyncio=True)))
    assert isinstance(refused, EvictionPolicyError), refused  # the asyncio client too
    admin.config_set("maxmemory-policy", "noeviction")
    store = RedisStore(evicting_redis.url)
    assert isinstance(store.claim("ns", "k", fingerprint=None), Claimed)
    store.close()
    admin.close()


async def _async_claim(store: RedisStore) -> object:
    """A claim through the greenlet bridge, as @idempotent makes it on async handlers:
    the outcome, or the exception it raised."""
    from sqlalchemy.util import greenlet_spawn

    try:
        return await greenlet_spawn(store.claim, "ns", "k", fingerprint=None)
    except Exception as exc:
        return exc
    finally:
        await store.aclose()


def test_hole_5_policy_read_from_info_when_config_is_refused(
        evicting_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A user who may not run CONFIG (managed Redis): the policy comes from INFO memory
    and is refused the same; one who may run neither gets a warning and goes on."""
    admin = redis.Redis.from_url(evicting_redis.url)
    admin.acl_setuser("noconfig", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-config"])
    admin.acl_setuser("blind", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-config", "-info"])
    host = evicting_redis.url.removeprefix("redis://")
    try:
        store = RedisStore(f"redis://noconfig:pw@{host}")
        with pytest.raises(EvictionPolicyError, match="volatile-lru"):
            store.claim("ns", "k", fingerprint=None)
        store.close()
        store = RedisStore(f"redis://blind:pw@{host}")
        with caplog.at_level(logging.WARNING, logger="idempotent"):
            got = store.claim("ns", "k", fingerprint=None)
            store.claim("ns", "k2", fingerprint=None)
        assert isinstance(got, Claimed)
        warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert "could not read" in warnings[0].getMessage()
        store.close()
    finally:
        admin.acl_deluser("noconfig", "blind")
        admin.close()


def test_eviction_policy_checked_on_every_cluster_primary(redis_cluster_url: str) -> None:
    """On a cluster every primary's policy is read; one evicting node is enough to refuse."""
    import redis.cluster

    admin = redis.cluster.RedisCluster.from_url(redis_cluster_url)
    node = admin.get_primaries()[1]
    admin.config_set("maxmemory-policy", "allkeys-lru", target_nodes=node)
    try:
        store = RedisStore(redis_cluster_url, cluster=True)
        with pytest.raises(EvictionPolicyError, match=node.name):
            store.claim("ns", "k", fingerprint=None)
        store.close()
    finally:
        admin.config_set("maxmemory-policy", "noeviction", target_nodes=node)
        admin.close()
    store = RedisStore(redis_cluster_url, cluster=True)
    assert isinstance(store.claim("ns", "k", fingerprint=None), Claimed)
    store.close()


@pytest.fixture
def replicated_redis() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A private master and one replica of it, the link up; both stopped by PID."""
    with RedisServer() as master, RedisServer(
            ["--replicaof", master.host, str(master.port)]) as replica:
        wait_for(lambda: b"master_link_status:up" in replica.command("INFO", "replication"),
                 "the replica's link to its master")
        yield master, replica


def test_wait_replicas_completes_with_wait_in_the_same_round_trip(
        replicated_redis: tuple[RedisServer, RedisServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """wait_replicas=1: complete sends EVALSHA and WAIT together (one send), returns once
    the replica has the record; wait_replicas=2 with one replica raises a transient error
    (the decorator's retry policy retries it) naming how many acknowledged."""
    master, replica = replicated_redis
    store = RedisStore(master.url, wait_replicas=1, wait_timeout_ms=3000)
    store.load_scripts()  # a NOSCRIPT would send both again, as EVAL and WAIT
    got = store.claim("ns", "k", fingerprint=None)
    assert isinstance(got, Claimed)
    store.client.config_resetstat()
    sends: list[int] = []
    original = redis.connection.Connection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    store.complete("ns", "k", got.token, b"paid")
    monkeypatch.undo()
    assert sends == [1]
    stats = store.client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_wait"]["calls"] == 1
    on_replica = redis.Redis.from_url(replica.url)
    assert on_replica.hget(store.key_name("ns", "k"), "r") == b"paid"
    on_replica.close()
    store.close()

    async def complete_async() -> None:  # the asyncio client: the same pipeline
        from sqlalchemy.util import greenlet_spawn

        store = RedisStore(master.url, use_asyncio=True, wait_replicas=1)
        got = await greenlet_spawn(store.claim, "ns", "ak", fingerprint=None)
        await greenlet_spawn(store.complete, "ns", "ak", got.token, b"async")
        await store.aclose()

    asyncio.run(complete_async())
    on_replica = redis.Redis.from_url(replica.url)
    assert on_replica.hget(store.key_name("ns", "ak"), "r") == b"async"
    on_replica.close()

    greedy = RedisStore(master.url, wait_replicas=2, wait_timeout_ms=50)
    got = greedy.claim("ns", "k2", fingerprint=None)
    assert isinstance(got, Claimed)
    with pytest.raises(Exception, match="1 of 2 replicas") as err:
        greedy.complete("ns", "k2", got.token, b"paid")
    assert is_transient(err.value) and not isinstance(err.value, IdempotencyError)
    rec = greedy.get("ns", "k2")  # written on the master; a retry completes it again
    assert rec is not None and rec.state is State.COMPLETED
    greedy.close()


def test_wait_replicas_on_a_cluster_waits_on_the_records_node(redis_cluster_url: str) -> None:
    """On a cluster, WAIT goes to the node that holds the record (the session cluster has
    no replicas: 0 acknowledged, a transient error)."""
    import redis.cluster

    store = RedisStore(redis_cluster_url, cluster=True, wait_replicas=1, wait_timeout_ms=20)
    store.load_scripts()
    got = store.claim("ns", "k", fingerprint=None)
    assert isinstance(got, Claimed)
    store.client.config_resetstat(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    with pytest.raises(Exception, match="0 of 1 replica") as err:
        store.complete("ns", "k", got.token, b"x")
    assert is_transient(err.value)
    node = store.client.get_node_from_key(store.key_name("ns", "k"))
    stats = store.client.info("commandstats", target_nodes=node)
    assert stats["cmdstat_wait"]["calls"] == 1
    store.close()


def test_wait_replicas_options_are_checked(redis_url: str) -> None:
    with pytest.raises(ValueError, match="wait_replicas"):
        RedisStore(redis_url, wait_replicas=-1)
    with pytest.raises(ValueError, match="wait_timeout_ms"):
        RedisStore(redis_url, wait_replicas=1, wait_timeout_ms=0)
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisStore(redis_url, wait_replicas=1, wait_timeout_ms=3000, socket_timeout=2)


# -- hole 7: a stale reply on a kept connection -------------------------------------------------
class Interrupted(BaseException):
    """What a signal handler raises (KeyboardInterrupt, SoftTimeLimitExceeded...)."""


def test_hole_7_an_interrupted_round_trip_never_leaves_its_reply_behind(
        redis_url: str) -> None:
    """An exception that lands after a command was sent and before its reply was read
    (here: right after ``send_command`` returned) discards the connection: the next call
    reads its own reply, not the interrupted one's."""
    store = RedisStore(redis_url)
    assert store._direct is not None  # the kept-connections path
    done = store.claim("ns", "A", fingerprint=None)
    assert isinstance(done, Claimed)
    store.complete("ns", "A", done.token, b"A's result")
    conn = store._direct.idle[-1]
    real_send = conn.send_command

    def send_then_interrupt(*args: Any, **kwargs: Any) -> None:
        real_send(*args, **kwargs)
        del conn.send_command  # once
        raise Interrupted

    conn.send_command = send_then_interrupt
    with pytest.raises(Interrupted):
        store.claim("ns", "A", fingerprint=None)  # its reply (A completed) is never read
    out = store.claim("ns", "B", fingerprint=None)
    print(f"claim of new key B after an interrupted claim of A -> {out!r}")
    assert isinstance(out, Claimed), f"B got A's reply: {out!r}"
    store.complete("ns", "B", out.token, b"B's result")
    again = store.claim("ns", "A", fingerprint=None)
    assert isinstance(again, Completed) and again.record.result == b"A's result"
    rec = store.get("ns", "B")
    assert rec is not None and rec.result == b"B's result"
    store.close()


def test_an_error_reply_keeps_the_connection(redis_url: str) -> None:
    """A NOSCRIPT reply was read whole: the connection is kept (no reconnect)."""
    store = RedisStore(redis_url)
    assert isinstance(store.claim("ns", "a", fingerprint=None), Claimed)
    assert store._direct is not None
    conn = store._direct.idle[-1]
    sock = conn._sock
    store.client.script_flush()
    assert isinstance(store.claim("ns", "b", fingerprint=None), Claimed)
    assert store._direct.idle[-1] is conn and conn._sock is sock
    store.close()


# -- hole 6 part: timeouts ----------------------------------------------------------------------
def _kwargs(store: RedisStore) -> dict[str, Any]:
    client = store.client
    if store.is_cluster:
        return dict(client.nodes_manager.connection_kwargs)
    return dict(client.connection_pool.connection_kwargs)


@pytest.mark.parametrize("kind", ["standalone", "asyncio", "cluster"])
def test_hole_6_url_clients_get_socket_timeouts(kind: str,
                                                request: pytest.FixtureRequest) -> None:
    """A client made from a URL gets socket_connect_timeout and socket_timeout (5 s), so
    a blackholed connection cannot hang a claim or a renewal; the user's values win."""
    cluster = kind == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    opts = {"cluster": cluster, "use_asyncio": kind == "asyncio"}
    store = RedisStore(url, **opts)  # type: ignore[arg-type]
    got = _kwargs(store)
    print(f"{kind}: {({k: got.get(k) for k in ('socket_timeout', 'socket_connect_timeout')})}")
    assert got.get("socket_timeout") == 5.0 and got.get("socket_connect_timeout") == 5.0
    mine = RedisStore(url, socket_timeout=1.5, socket_connect_timeout=0.5,
                      **opts)  # type: ignore[arg-type]
    got = _kwargs(mine)
    assert got["socket_timeout"] == 1.5 and got["socket_connect_timeout"] == 0.5
    mine = RedisStore(url, socket_timeout=None, **opts)  # type: ignore[arg-type]
    assert _kwargs(mine)["socket_timeout"] is None  # the user may ask for no timeout
    if not store.is_async:
        store.close()


def test_a_blackholed_server_cannot_hang_a_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection and never answers: the claim fails with a
    transient timeout (the store's default, made short here) instead of hanging."""
    monkeypatch.setattr(_mod, "DEFAULT_SOCKET_TIMEOUT", 0.2, raising=False)
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)  # never accepted, never answered
        port = hole.getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0")
        outcome: list[BaseException | object] = []

        def claim() -> None:
            try:
                outcome.append(store.claim("ns", "k", fingerprint=None))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=claim, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the claim still hangs after 60 s"
    assert isinstance(outcome[0], redis.TimeoutError) and is_transient(outcome[0])


# -- a result too big keeps the claim -----------------------------------------------------------
def test_hole_result_too_big_raises_without_releasing_the_claim(redis_url: str) -> None:
    """In lease mode the handler's effect happened: a result over max_result_bytes raises
    ResultNotSerializable and leaves the claim as it was (still the token's), so no
    redelivery runs the handler again; the caller then completes it with a "result not
    stored" marker, which is stored even when it is itself over a tiny limit."""
    store = RedisStore(redis_url, max_result_bytes=16)
    assert store.max_result_bytes == 16
    got = store.claim("ns", "big", fingerprint=None)
    assert isinstance(got, Claimed)
    before = store.client.hgetall(store.key_name("ns", "big"))
    with pytest.raises(ResultNotSerializable, match="17 bytes"):
        store.complete("ns", "big", got.token, b"x" * 17)
    after = store.client.hgetall(store.key_name("ns", "big"))
    print(f"record after an over-size complete: {after or None}")
    assert after == before
    assert isinstance(store.claim("ns", "big", fingerprint=None), InProgress)
    marker = not_stored("the result is 17 bytes, over max_result_bytes=16")
    assert len(marker) > 16
    store.complete("ns", "big", got.token, marker)
    rec = store.get("ns", "big")
    assert rec is not None and rec.state is State.COMPLETED and rec.result == marker
    with pytest.raises(ResultNotSerializable):  # only a marker is let through
        store.complete("ns", "big", got.token, marker + b"x" * 1024)
    store.close()


def test_a_too_big_result_through_the_decorator_runs_once(redis_url: str) -> None:
    """@idempotent on a store whose max_result_bytes (64) the result exceeds: the handler
    runs once, its caller gets the value, every duplicate gets ResultNotStored."""
    store = RedisStore(redis_url, max_result_bytes=64)
    runs: list[str] = []

    @idempotent(store, key="id", lease=30)
    def big(msg: dict[str, str]) -> str:
        runs.append(msg["id"])
        return "y" * 2000

    assert big({"id": "m"}) == "y" * 2000
    for _ in range(2):
        with pytest.raises(ResultNotStored):
            big({"id": "m"})
    assert runs == ["m"]
    store.close()


# -- keys: complete, release, renew refuse what claim refuses ---------------------------------
@pytest.mark.parametrize("bad", ["\udcff", "caf\udce9", "a\x00b", "\x00"])
def test_hole_keys_every_operation_refuses_what_claim_refuses(redis_url: str,
                                                              bad: str) -> None:
    """A key or namespace with a lone surrogate or a NUL is refused by complete, release,
    renew, get and claim_many as by claim (InvalidIdempotencyKey), before anything is
    sent; nothing is written."""
    store = RedisStore(redis_url)
    ops: list[Callable[[], Any]] = [
        lambda: store.claim("ns", bad, fingerprint=None),
        lambda: store.complete("ns", bad, "t" * 32, b"x"),
        lambda: store.release("ns", bad, "t" * 32),
        lambda: store.renew("ns", bad, "t" * 32, 10),
        lambda: store.get("ns", bad),
        lambda: store.claim_many("ns", ["fine", bad]),
        lambda: store.complete(bad, "k", "t" * 32, b"x"),
        lambda: store.renew(bad, "k", "t" * 32, 10),
        lambda: store.claim_many(bad, ["k"]),
    ]
    for i, op in enumerate(ops):
        try:
            op()
        except InvalidIdempotencyKey:
            continue
        except Exception as exc:
            pytest.fail(f"operation {i} raised {type(exc).__name__}: {exc}")
        pytest.fail(f"operation {i} accepted {bad!r}")
    assert store.client.dbsize() == 0
    store.close()


def test_an_infinite_ttl_is_remembered_for_ever(redis_url: str) -> None:
    """ttl=inf (the decorator accepts it): the key completes, has no native expiry worth
    the name (100 years), and its duplicate replays (was: OverflowError in the expiry)."""
    import redis as redis_py

    from idempotent import idempotent

    store = RedisStore(redis_url)
    runs: list[int] = []

    @idempotent(store, key="id", namespace="forever", ttl=float("inf"))
    def charge(msg: dict[str, Any]) -> int:
        runs.append(1)
        return 7

    assert charge({"id": "k"}) == 7 and charge({"id": "k"}) == 7
    assert runs == [1]
    with redis_py.Redis.from_url(redis_url) as client:
        assert client.pttl(store.key_name("forever", "k")) > 50 * 365 * 86400 * 1000
    store.close()
