"""Issue 15, items 4 and 5: a Redis purge or stats touches one store's records only (two
stores whose prefixes nest, on the real redis-server and on the cluster), and payloads that
differ only where the canonical encoding used to look away (private attributes, slots, an
``email.message.Message``) are different fingerprints, or refused with a clear TypeError."""

from __future__ import annotations

import email.message
import io
from collections.abc import Iterator

import pytest

from idempotent import Claimed, IdempotencyKeyConflict, State, idempotent
from idempotent._canonical import canonical_json, fingerprint
from idempotent.stores.memory import MemoryStore
from idempotent.stores.redis import RedisStore


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["standalone", "cluster"])
def url_and_cluster(request: pytest.FixtureRequest) -> tuple[str, bool]:
    cluster = request.param == "cluster"
    return request.getfixturevalue("redis_cluster_url" if cluster else "redis_url"), cluster


@pytest.fixture
def nested(url_and_cluster: tuple[str, bool]) -> Iterator[tuple[RedisStore, RedisStore, Clock]]:
    """Two stores on one server (or cluster), prefixes ``idem`` and ``idem:orders``, one
    hand-moved clock."""
    url, cluster = url_and_cluster
    clock = Clock()
    outer = RedisStore(url, clock=clock, cluster=cluster, prefix="idem")
    inner = RedisStore(url, clock=clock, cluster=cluster, prefix="idem:orders")
    yield outer, inner, clock
    outer.close()
    inner.close()


def total(store: RedisStore) -> int:
    return sum(c.count for c in store.stats().counts)


def _put(store: RedisStore, ns: str, key: str, *, ttl: float) -> None:
    got = store.claim(ns, key, fingerprint=None, lease=30, ttl=ttl)
    assert isinstance(got, Claimed)
    store.complete(ns, key, got.token, b"{}", ttl=ttl, state=State.COMPLETED)


def test_redis_purge_and_stats_never_touch_a_nested_prefix_store(
        nested: tuple[RedisStore, RedisStore, Clock]) -> None:
    """``purge(older_than=...)`` on the ``idem`` store deletes its own old record and never
    the ``idem:orders`` store's live completed one; ``stats`` counts each store's own."""
    outer, inner, clock = nested
    _put(outer, "pay", "old", ttl=86400)
    _put(inner, "pay", "live", ttl=86400)
    clock.now += 7200  # both two hours old, both live

    assert total(outer) == 1
    assert total(inner) == 1
    assert outer.purge(older_than=3600) == 1
    assert outer.get("pay", "old") is None
    assert inner.get("pay", "live") is not None  # the other store's live record stays
    assert total(inner) == 1
    assert total(outer) == 0
    # and the other way round: the inner store's purge never reaches the outer store
    _put(outer, "pay", "again", ttl=86400)
    clock.now += 7200
    assert inner.purge(older_than=3600) == 1
    assert outer.get("pay", "again") is not None


def test_redis_scan_skips_names_that_are_not_exactly_this_stores(
        url_and_cluster: tuple[str, bool]) -> None:
    """Keys under the prefix that are not ``<prefix>:<digits>:<ns of that length>:<key>``
    (digits with a leading zero, a wrong length, no key, not UTF-8, another store's
    ``idem:5x:...``) are never purged nor counted, even when they hold a record."""
    url, cluster = url_and_cluster
    clock = Clock()
    store = RedisStore(url, clock=clock, cluster=cluster, prefix="idem")
    try:
        _put(store, "pay", "mine", ttl=10)
        raw = store.client
        good = store.key_name("pay", "mine")
        record = raw.hgetall(good)
        foreign = [b"idem:03:pay:k", b"idem:3:pay", b"idem:3:pay:", b"idem:9:pay:k",
                   b"idem:3:p\xffy:k", b"idem:5x:2:ns:k", b"idem:orders:3:pay:k",
                   b"idem:0::k"]
        for name in foreign:
            raw.hset(name, mapping=record)
        clock.now += 100  # every record expired by its own clock
        assert total(store) == 1
        assert store.purge() == 1
        for name in foreign:
            assert raw.exists(name) == 1, name
    finally:
        store.close()


# -- item 5: fingerprints ----------------------------------------------------------------
class Money:
    def __init__(self, cents: int) -> None:
        self._cents = cents


class Slotted:
    __slots__ = ("_amount", "account")

    def __init__(self, account: str, amount: int) -> None:
        self.account = account
        self._amount = amount


def test_private_attributes_are_part_of_the_fingerprint() -> None:
    """Two objects that differ only in a private attribute (or a slot) are a conflict."""
    calls: list[int] = []

    @idempotent(MemoryStore(), key=lambda m: "k1")
    def charge(m: object) -> int:
        calls.append(1)
        return len(calls)

    assert charge(Money(100)) == 1
    assert charge(Money(100)) == 1  # the same payload replays
    with pytest.raises(IdempotencyKeyConflict):
        charge(Money(999))

    @idempotent(MemoryStore(), key=lambda m: "k2")
    def pay(m: object) -> int:
        return 1

    assert pay(Slotted("acc", 5)) == 1
    with pytest.raises(IdempotencyKeyConflict):
        pay(Slotted("acc", 6))
    assert fingerprint(Slotted("acc", 5)) != fingerprint(Slotted("acc", 6))


def test_objects_that_cannot_be_encoded_faithfully_are_refused() -> None:
    """An email.message.Message, a file, a generator, an object with no data are a
    TypeError naming the type and ``fingerprint=``."""
    msg = email.message.Message()
    msg["To"] = "a@example.com"
    msg.set_payload("hello")

    @idempotent(MemoryStore(), key=lambda m: "k")
    def send(m: object) -> None:
        return None

    with pytest.raises(TypeError, match=r"Message.*fingerprint="):
        send(msg)
    for value in (msg, io.BytesIO(b"x"), (i for i in range(2)), object(), open):
        with pytest.raises(TypeError, match="fingerprint="):
            canonical_json({"v": value})


def test_plain_objects_that_worked_keep_a_public_only_encoding_when_public_only() -> None:
    """An object whose attributes are all public encodes as before (stored fingerprints
    stay valid), and a dict with the same items is the same fingerprint."""

    class Msg:
        def __init__(self) -> None:
            self.id = "m-1"
            self.cents = 5

    assert canonical_json(Msg()) == '{"cents":5,"id":"m-1"}'
    assert fingerprint(Msg()) == fingerprint({"id": "m-1", "cents": 5})
