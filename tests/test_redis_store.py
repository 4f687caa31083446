"""RedisStore beyond the shared contract: round trips, native expiry, batch claims, key
names, bad input, old records, purge/stats by SCAN, URLs and client kinds, async handlers.
Real redis-server processes on 127.0.0.1 (the session server and the session cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.cluster
from _servers import RedisServer

from idempotent import (
    Claimed,
    Completed,
    IdempotencyError,
    IncompatibleRecord,
    InProgress,
    InvalidIdempotencyKey,
    LeaseLost,
    ResultNotSerializable,
    ResultNotStored,
    State,
    idempotent,
)
from idempotent.stores import open_store
from idempotent.stores.redis import MAX_KEY_LENGTH, RedisStore


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["standalone", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[RedisStore]:
    """A RedisStore with a hand-moved clock, on the session server and on the cluster."""
    cluster = request.param == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    s = RedisStore(url, clock=Clock(), cluster=cluster)
    yield s
    s.close()


def clock_of(store: RedisStore) -> Clock:
    assert isinstance(store.clock, Clock)
    return store.clock


def calls(store: RedisStore) -> dict[str, int]:
    """Data commands the server(s) ran since the last `reset`, by name (INFO
    commandstats; the client's own INFO/CLUSTER/COMMAND/PING/CONFIG calls left out)."""
    if store.is_cluster:
        nodes = store.client.info(
            "commandstats", target_nodes=redis.cluster.RedisCluster.PRIMARIES).values()
    else:
        nodes = [store.client.info("commandstats")]
    total: dict[str, int] = {}
    for node in nodes:
        for name, v in node.items():
            if name.split("_", 1)[1].split("|")[0] in _ADMIN:
                continue
            total[name] = total.get(name, 0) + v["calls"]
    return total


_ADMIN = {"info", "cluster", "command", "ping", "config", "client", "hello", "readonly"}
#: What the scripts run inside Redis: commandstats counts these too.
_IN_SCRIPTS = {"cmdstat_hmget", "cmdstat_hset", "cmdstat_hdel", "cmdstat_del",
               "cmdstat_pexpire", "cmdstat_exists"}


def sent(store: RedisStore) -> dict[str, int]:
    """The commands the client itself sent since the last `reset`."""
    return {k: v for k, v in calls(store).items() if k not in _IN_SCRIPTS}


def reset(store: RedisStore) -> None:
    if store.is_cluster:
        store.client.config_resetstat(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        store.client.config_resetstat()


# -- round trips and native expiry --------------------------------------------------------
def test_one_command_per_operation(store: RedisStore) -> None:
    """claim, complete, a duplicate's claim, renew and release are one EVALSHA each."""
    store.load_scripts()
    reset(store)
    first = store.claim("ns", "k", fingerprint="f" * 64)
    assert isinstance(first, Claimed)
    store.renew("ns", "k", first.token, 30)
    store.complete("ns", "k", first.token, b"r")
    assert isinstance(store.claim("ns", "k", fingerprint="f" * 64), Completed)
    other = store.claim("ns", "k2", fingerprint=None)
    assert isinstance(other, Claimed)
    assert store.release("ns", "k2", other.token) is True
    assert sent(store) == {"cmdstat_evalsha": 6}


def test_native_expiry_follows_lease_then_ttl(store: RedisStore) -> None:
    """Native expiry is a backstop one grace second after the record's own deadline,
    computed from durations, not the clock: an in-progress record's is its expires_at
    (so a takeover after the lease still finds it), which a renewal leaves alone; a
    completed one's is its ttl."""
    got = store.claim("ns", "k", fingerprint=None, lease=10, ttl=3600)
    assert isinstance(got, Claimed)
    name = store.key_name("ns", "k")
    assert 3_599_000 < store.client.pttl(name) <= 3_601_001
    store.renew("ns", "k", got.token, 20)
    assert 3_599_000 < store.client.pttl(name) <= 3_601_001
    store.complete("ns", "k", got.token, b"1", ttl=7200)
    assert 7_199_000 < store.client.pttl(name) <= 7_201_001


def test_record_is_a_versioned_hash(store: RedisStore) -> None:
    """One hash per record, with the format version and exact float times."""
    clock = clock_of(store)
    clock.now = 1_700_000_000.123456
    got = store.claim("ns", "k", fingerprint="ab" * 32, lease=7.5, ttl=60)
    assert isinstance(got, Claimed)
    raw = store.client.hgetall(store.key_name("ns", "k"))
    assert raw[b"v"] == b"1" and raw[b"s"] == b"i" and raw[b"t"] == got.token.encode()
    assert float(raw[b"l"]) == clock.now + 7.5 and float(raw[b"c"]) == clock.now
    rec = store.get("ns", "k")
    assert rec is not None and rec.lease_until == got.lease_until == clock.now + 7.5


def test_resent_claim_is_still_ours(store: RedisStore) -> None:
    """A claim the client sends again (reply lost) finds its own token: still Claimed."""
    from idempotent.stores import redis as mod

    clock = clock_of(store)
    name = store.key_name("ns", "k")
    args = (clock.now, "t" * 32, 30, 60, 61_001)  # now, token, lease, ttl, native ms
    deadline = repr(clock.now + 30).removesuffix(".0").encode()
    assert store._eval(mod._CLAIM, 1, name, *args) == [1, deadline]
    clock.now += 5
    assert store._eval(mod._CLAIM, 1, name, *args) == [1, deadline]  # the first deadline
    store.complete("ns", "k", "t" * 32, b"once")
    rec = store.get("ns", "k")
    assert rec is not None and rec.result == b"once"


def test_scripts_reload_after_script_flush(store: RedisStore) -> None:
    """After the server forgets the scripts (restart, failover), the next call still works."""
    store.load_scripts()
    store.claim("ns", "a", fingerprint=None)
    store.client.execute_command("SCRIPT FLUSH")  # on every primary of a cluster
    reset(store)
    got = store.claim("ns", "b", fingerprint=None)
    assert isinstance(got, Claimed)
    store.complete("ns", "b", got.token, b"ok")
    assert isinstance(store.claim("ns", "b", fingerprint=None), Completed)
    sent_now = sent(store)
    assert sent_now["cmdstat_eval"] == 2 and sent_now["cmdstat_evalsha"] == 3  # 2 NOSCRIPT


# -- batch claims ---------------------------------------------------------------------------
def _mixed_batch(store: RedisStore) -> dict[str, Any]:
    done = store.claim("ns", "done", fingerprint=None)
    assert isinstance(done, Claimed)
    store.complete("ns", "done", done.token, b"D")
    assert isinstance(store.claim("ns", "busy", fingerprint=None, lease=30), Claimed)
    keys = ["done", "busy"] + [f"new-{i}" for i in range(100)] + ["new-0"]
    store.load_scripts()
    reset(store)
    return store.claim_many("ns", keys, lease=30)


def test_claim_many_standalone_is_one_command(redis_url: str) -> None:
    """100 new keys, a completed one and a busy one: one EVALSHA, each key's outcome."""
    store = RedisStore(redis_url, clock=Clock())
    out = _mixed_batch(store)
    assert sent(store) == {"cmdstat_evalsha": 1}
    assert list(out)[:3] == ["done", "busy", "new-0"] and len(out) == 102
    assert isinstance(out["done"], Completed) and out["done"].record.result == b"D"
    assert isinstance(out["busy"], InProgress)
    tokens = {o.token for k, o in out.items() if isinstance(o, Claimed)}
    assert len(tokens) == 100
    new = out["new-7"]
    assert isinstance(new, Claimed)
    store.complete("ns", "new-7", new.token, b"7")  # the batch's tokens fence as usual


def test_claim_many_on_a_cluster_groups_by_slot(redis_cluster_url: str) -> None:
    """On a cluster the keys spread over the nodes; one script call per slot, pipelined,
    and each key's outcome is right."""
    store = RedisStore(redis_cluster_url, clock=Clock(), cluster=True)
    out = _mixed_batch(store)
    assert isinstance(out["done"], Completed) and isinstance(out["busy"], InProgress)
    assert sum(isinstance(o, Claimed) for o in out.values()) == 100
    nodes = {store.client.get_node_from_key(store.key_name("ns", k)).name for k in out}
    assert len(nodes) == 3  # records spread over all masters


def test_hash_tag_prefix_keeps_a_batch_in_one_slot(redis_cluster_url: str) -> None:
    """prefix="{idem}" pins every record to one slot: a batch is one script call."""
    store = RedisStore(redis_cluster_url, clock=Clock(), cluster=True, prefix="{idem}")
    store.load_scripts()
    reset(store)
    out = store.claim_many("ns", [f"k{i}" for i in range(50)])
    assert all(isinstance(o, Claimed) for o in out.values())
    assert sent(store) == {"cmdstat_evalsha": 1}


# -- key names and bad input ---------------------------------------------------------------
def test_key_names_are_unambiguous(store: RedisStore) -> None:
    """Namespace and key are separated by the namespace's length, so ':' or braces in
    either never make two records one."""
    pairs = [("a:b", "c"), ("a", "b:c"), ("a}", ":c"), ("{a", "}c"), ("a", "{b}:c")]
    names = {store.key_name(ns, k) for ns, k in pairs}
    assert len(names) == len(pairs)
    for ns, k in pairs:
        assert isinstance(store.claim(ns, k, fingerprint=None), Claimed)
        assert store._split(store.key_name(ns, k)) == (ns, k)


def test_non_ascii_keys_are_exact_and_what_utf8_cannot_hold_is_refused(
        store: RedisStore) -> None:
    """Non-ASCII keys are stored and read back exactly; a key holding a lone surrogate
    (as ``surrogateescape`` decoding of non-UTF-8 bytes makes) or a NUL is refused by
    every operation with InvalidIdempotencyKey, and nothing is written."""
    for key in ("café ☕", "ключ", "鍵"):
        got = store.claim("ns", key, fingerprint=None)
        assert isinstance(got, Claimed), key
        store.complete("ns", key, got.token, b"v")
        rec = store.get("ns", key)
        assert rec is not None and rec.key == key and rec.result == b"v"
        assert store.key_name("ns", key).endswith(key.encode())
    odd = b"caf\xe9-\xff".decode("utf-8", "surrogateescape")
    for key in (odd, "\udcff", "\x00nul"):
        with pytest.raises(InvalidIdempotencyKey):
            store.claim("ns", key, fingerprint=None)
        with pytest.raises(InvalidIdempotencyKey):
            store.complete("ns", key, "t" * 32, b"v")
        with pytest.raises(InvalidIdempotencyKey):
            store.key_name(key, "k")
    assert store.stats().counts[0].count == 3


def test_key_length_at_and_over_the_limit(store: RedisStore) -> None:
    """A key or namespace of MAX_KEY_LENGTH characters is taken; one more is a ValueError
    that says to hash it; nothing is written."""
    assert isinstance(store.claim("n" * MAX_KEY_LENGTH, "k" * MAX_KEY_LENGTH,
                                  fingerprint=None), Claimed)
    with pytest.raises(ValueError, match=r"201 characters.*hash it"):
        store.claim("ns", "k" * (MAX_KEY_LENGTH + 1), fingerprint=None)
    with pytest.raises(ValueError, match="namespace of 201"):
        store.claim("n" * (MAX_KEY_LENGTH + 1), "k", fingerprint=None)
    with pytest.raises(ValueError, match="must not be empty"):
        store.claim("ns", "", fingerprint=None)
    with pytest.raises(TypeError, match="must be str, not bytes"):
        store.claim("ns", b"k", fingerprint=None)  # type: ignore[arg-type]
    assert store.stats().counts[0].count == 1


def test_result_size_at_and_over_the_limit(redis_url: str) -> None:
    """A result of max_result_bytes is stored; one byte more raises ResultNotSerializable
    and leaves the claim as it was (in progress, the same token): the handler ran, so no
    redelivery may run it again; the decorator completes such a key with a marker."""
    store = RedisStore(redis_url, clock=Clock(), max_result_bytes=1024)
    got = store.claim("ns", "at", fingerprint=None)
    assert isinstance(got, Claimed)
    store.complete("ns", "at", got.token, b"\xff" * 1024)
    rec = store.get("ns", "at")
    assert rec is not None and rec.result == b"\xff" * 1024
    got = store.claim("ns", "over", fingerprint=None)
    assert isinstance(got, Claimed)
    with pytest.raises(ResultNotSerializable, match="1,025 bytes") as err:
        store.complete("ns", "over", got.token, b"x" * 1025)
    assert err.value.key == "over"
    rec = store.get("ns", "over")
    assert rec is not None and rec.state is State.IN_PROGRESS and rec.token == got.token

    runs = []

    @idempotent(store, key="id", lease=30)
    def big(msg: dict[str, Any]) -> str:
        runs.append(msg["id"])
        return "y" * 2000

    assert big({"id": "m"}) == "y" * 2000  # the handler ran: the key is completed with a
    with pytest.raises(ResultNotStored):  # marker, and its duplicates say so
        big({"id": "m"})
    assert runs == ["m"]


@pytest.mark.parametrize("bad", [
    {b"v": b"0", b"s": b"c", b"e": b"9e99"},  # an older format version
    {b"v": b"2", b"s": b"c", b"e": b"9e99"},  # a newer one
    {b"s": b"c", b"e": b"9e99"},  # no version at all
])
def test_a_record_of_another_format_is_a_clear_error(store: RedisStore,
                                                     bad: dict[bytes, bytes]) -> None:
    """claim, complete, renew, release and get raise IncompatibleRecord naming the
    version; the record is left as it was; purge and stats skip it."""
    name = store.key_name("ns", "old")
    store.client.hset(name, mapping=bad)
    ops = [
        lambda: store.claim("ns", "old", fingerprint=None),
        lambda: store.complete("ns", "old", "t" * 32, b"x"),
        lambda: store.renew("ns", "old", "t" * 32, 10),
        lambda: store.release("ns", "old", "t" * 32),
        lambda: store.get("ns", "old"),
        lambda: store.claim_many("ns", ["old"]),
    ]
    for op in ops:
        with pytest.raises(IdempotencyError, match=r"format version|no format version") as e:
            op()
        assert e.value.key == "old" and type(e.value) is IncompatibleRecord
    assert store.client.hgetall(name) == bad
    clock_of(store).now = 1e12
    assert store.purge() == 0 and store.stats().counts == ()
    assert store.client.hgetall(name) == bad


def test_a_key_of_another_type_is_a_clear_error(store: RedisStore) -> None:
    """A string (or list) under a record's name: IncompatibleRecord, not a Lua error."""
    name = store.key_name("ns", "str")
    store.client.set(name, b"not a record")
    for op in (lambda: store.claim("ns", "str", fingerprint=None),
               lambda: store.complete("ns", "str", "t" * 32, b"x"),
               lambda: store.get("ns", "str")):
        with pytest.raises(IncompatibleRecord, match="not an idempotent record"):
            op()
    assert store.client.get(name) == b"not a record"


# -- purge and stats (SCAN) -----------------------------------------------------------------
def _populate(store: RedisStore) -> None:
    clock = clock_of(store)
    for i in range(30):
        got = store.claim("old", f"k{i}", fingerprint=None, ttl=100)
        assert isinstance(got, Claimed)
        store.complete("old", f"k{i}", got.token, None, ttl=100)
    live = store.claim("old", "leased", fingerprint=None, lease=1000, ttl=100)
    assert isinstance(live, Claimed)
    clock.now += 50
    for i in range(5):
        got = store.claim("new", f"k{i}", fingerprint=None, lease=1000, ttl=100)
        assert isinstance(got, Claimed)
        if i < 3:
            store.complete("new", f"k{i}", got.token, None, ttl=100, state=State.FAILED)
    clock.now += 60  # "old" completed records expired; the leased one's lease is live


def test_stats_counts_by_namespace_and_state(store: RedisStore) -> None:
    """Counts per namespace and state, expired ones, and the oldest in-progress record."""
    _populate(store)
    got = store.stats()
    rows = [(c.namespace, c.state, c.count, c.expired) for c in got.counts]
    assert rows == [
        ("new", State.FAILED, 3, 0),
        ("new", State.IN_PROGRESS, 2, 0),
        ("old", State.COMPLETED, 30, 30),
        ("old", State.IN_PROGRESS, 1, 1),
    ]
    assert got.oldest_in_progress is not None and got.oldest_in_progress.key == "leased"
    only = store.stats("new")
    assert [c.namespace for c in only.counts] == ["new", "new"]


def test_purge_by_scan_in_batches_keeps_live_leases(store: RedisStore) -> None:
    """purge deletes expired records in batches (SCAN, never KEYS), keeps a live lease
    even past expires_at, and with older_than also young records' elders."""
    _populate(store)
    reset(store)
    assert store.purge(batch=4) == 30
    assert "cmdstat_keys" not in calls(store)
    assert calls(store).get("cmdstat_scan", 0) >= 1
    assert store.get("old", "leased") is not None
    assert store.purge(namespace="old") == 0
    assert store.purge(older_than=10, namespace="new") == 3  # the 2 in progress are live
    assert store.purge(older_than=10) == 0


# -- URLs, clients, open_store ----------------------------------------------------------------
def test_open_store_and_client_kinds(redis_url: str) -> None:
    """open_store(redis://) gives a RedisStore; a passed client works; a decoding client or
    a foreign object is refused with a clear error."""
    s = open_store(redis_url)
    assert isinstance(s, RedisStore) and not s.is_async and not s.is_cluster
    s.close()
    client = redis.Redis.from_url(redis_url)
    s = RedisStore(client, prefix="other")
    assert isinstance(s.claim("ns", "k", fingerprint=None), Claimed)
    assert client.exists(b"other:2:ns:k") == 1
    client.close()
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStore(redis.Redis.from_url(redis_url, decode_responses=True))
    with pytest.raises(TypeError, match="redis-py client"):
        RedisStore(object())
    with pytest.raises(TypeError, match="with a URL only"):
        RedisStore(client, cluster=True)


def test_close_gives_kept_connections_back_to_the_pool(redis_url: str) -> None:
    """A store made from a URL keeps its own connections between calls; close() returns
    them to the pool, so a bounded pool (max_connections=1) still serves after a close."""
    store = RedisStore(redis_url, max_connections=1)
    for i in range(3):
        assert isinstance(store.claim("ns", f"k{i}", fingerprint=None), Claimed)
        store.close()
    assert store.get("ns", "k2") is not None


def test_acl_user_and_password_in_the_url(redis_server: RedisServer, redis_url: str) -> None:
    """redis://user:password@host works with an ACL user limited to the store's keys."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("idem-test", enabled=True, passwords=["+s3cret"], keys=["idem:*"],
                      commands=["+@all"])
    try:
        url = redis_url.replace("redis://", "redis://idem-test:s3cret@")
        store = RedisStore(url, clock=Clock())
        got = store.claim("ns", "k", fingerprint=None)
        assert isinstance(got, Claimed)
        store.complete("ns", "k", got.token, b"ok")
        assert store.client.acl_whoami() == "idem-test"
        store.close()
        bad = RedisStore(redis_url.replace("redis://", "redis://idem-test:wrong@"))
        with pytest.raises(redis.AuthenticationError):
            bad.claim("ns", "k", fingerprint=None)
    finally:
        admin.acl_deluser("idem-test")
        admin.close()


def test_unix_socket_url() -> None:
    """unix:///path/to/socket reaches the server through its unix socket."""
    with RedisServer(["--unixsocket", "redis.sock", "--unixsocketperm", "700"]) as server:
        store = RedisStore(f"unix://{server.tmpdir}/redis.sock?db=0", clock=Clock())
        got = store.claim("ns", "k", fingerprint=None)
        assert isinstance(got, Claimed)
        assert store.client.connection_pool.connection_kwargs["path"].endswith("redis.sock")
        store.close()


# -- asyncio ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_async_handler_with_a_redis_asyncio_client(kind: str,
                                                   request: pytest.FixtureRequest) -> None:
    """An ``async def`` handler over a redis.asyncio client: runs once, the duplicate gets
    the stored result, a sync handler on that store is refused."""
    cluster = kind == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    store = RedisStore(url, use_asyncio=True, cluster=cluster)
    assert store.is_async
    runs: list[str] = []

    @idempotent(store, key="id", lease=30)
    async def handler(msg: dict[str, Any]) -> dict[str, Any]:
        runs.append(msg["id"])
        await asyncio.sleep(0)
        return {"charged": msg["cents"]}

    async def main() -> list[Any]:
        out = [await handler({"id": "p1", "cents": 5}), await handler({"id": "p1", "cents": 5})]
        out += await asyncio.gather(*(handler({"id": f"q{i}", "cents": i}) for i in range(5)))
        from sqlalchemy.util import greenlet_spawn

        out.append(await greenlet_spawn(store.purge))
        batch = await greenlet_spawn(store.claim_many, "batch", ["b1", "b2", "p1"])
        out.append(sorted(type(o).__name__ for o in batch.values()))
        stats = await greenlet_spawn(store.stats)
        out.append(sorted((c.namespace, c.state.value, c.count) for c in stats.counts))
        await store.aclose()  # the store's kept connections too, not only the client's
        return out

    out = asyncio.run(main())
    assert out[:2] == [{"charged": 5}, {"charged": 5}]
    assert out[2:7] == [{"charged": i} for i in range(5)] and out[7] == 0
    assert out[8] == ["Claimed", "Claimed", "Claimed"]  # another namespace than p1's
    ns = handler.namespace  # type: ignore[attr-defined]
    assert out[9] == [("batch", "in_progress", 3), (ns, "completed", 6)]
    assert sorted(runs) == ["p1"] + [f"q{i}" for i in range(5)]
    with pytest.raises(TypeError, match="async"):
        idempotent(store, key="id")(lambda msg: msg)


def test_lease_lost_through_the_store(store: RedisStore) -> None:
    """A released-and-reclaimed key fences the first token everywhere."""
    first = store.claim("ns", "k", fingerprint=None)
    assert isinstance(first, Claimed) and store.release("ns", "k", first.token)
    second = store.claim("ns", "k", fingerprint=None)
    assert isinstance(second, Claimed)
    with pytest.raises(LeaseLost):
        store.complete("ns", "k", first.token, b"late")
    store.complete("ns", "k", second.token, b"mine")
    rec = store.get("ns", "k")
    assert rec is not None and rec.result == b"mine"


def _certificates(d: Any) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl, EC keys)."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: cannot make a TLS certificate")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
         "-subj", "/CN=idempotent test CA"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext"],
    ):
        subprocess.run([openssl, *cmd], cwd=d, check=True, capture_output=True, timeout=60)
    return {name: str(d / f"{name}") for name in ("ca.crt", "server.crt", "server.key")}


def test_rediss_url_over_tls(tmp_path: Any) -> None:
    """rediss:// reaches a TLS port of redis-server, the server's certificate checked
    against the CA given in the client options; plain redis:// to that port fails."""
    from _servers import free_port

    certs = _certificates(tmp_path)
    tls_port = free_port()
    with RedisServer(["--tls-port", str(tls_port), "--tls-cert-file", certs["server.crt"],
                      "--tls-key-file", certs["server.key"],
                      "--tls-ca-cert-file", certs["ca.crt"], "--tls-auth-clients", "no"]):
        store = RedisStore(f"rediss://127.0.0.1:{tls_port}/0", clock=Clock(),
                           ssl_ca_certs=certs["ca.crt"])
        got = store.claim("ns", "k", fingerprint=None)
        assert isinstance(got, Claimed)
        store.complete("ns", "k", got.token, b"secret")
        assert isinstance(store.claim("ns", "k", fingerprint=None), Completed)
        assert store.client.connection_pool.connection_class.__name__ == "SSLConnection"
        store.close()
        plain = RedisStore(f"redis://127.0.0.1:{tls_port}/0", socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.claim("ns", "k", fingerprint=None)
        plain.close()


def test_async_store_outside_the_bridge_says_how(redis_url: str) -> None:
    """An asyncio store's methods called directly (no greenlet bridge): a TypeError that
    says how to call them, and nothing left unawaited."""
    store = RedisStore(redis_url, use_asyncio=True)
    with pytest.raises(TypeError, match="greenlet_spawn"):
        store.claim("ns", "k", fingerprint=None)
    asyncio.run(store.aclose())
    with pytest.raises(TypeError, match="use close"):
        asyncio.run(RedisStore(redis_url).aclose())


def test_extreme_leases_and_ttls_never_break_a_script(store: RedisStore) -> None:
    """A lease or ttl of a thousand years, or in the past, is stored as given; the native
    expiry stays within what Redis takes (no Lua error, no half-written record)."""
    clock = clock_of(store)
    got = store.claim("ns", "far", fingerprint=None, lease=3e10, ttl=3e10)
    assert isinstance(got, Claimed) and got.lease_until == clock.now + 3e10
    store.complete("ns", "far", got.token, b"1", ttl=3e10)
    rec = store.get("ns", "far")
    assert rec is not None and rec.expires_at == clock.now + 3e10
    assert 0 < store.client.pttl(store.key_name("ns", "far")) <= 100 * 365 * 86400 * 1000
    past = store.claim("ns", "past", fingerprint=None, lease=-5)
    assert isinstance(past, Claimed)  # a deadline already gone: claimable at once
    again = store.claim("ns", "past", fingerprint=None)
    assert isinstance(again, Claimed) and again.token != past.token
