"""The store contract, run on every store: memory, SQLite, PostgreSQL, Redis and Redis
Cluster (real servers)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

import pytest

from idempotent import Claimed, Completed, InProgress, LeaseLost, MemoryStore, SqlStore, State
from idempotent.stores.base import Store


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis", "redis-cluster"])
def contract(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Clock]]:
    """A store of each kind with a hand-moved clock."""
    clock = Clock()
    if request.param == "memory":
        yield MemoryStore(clock=clock), clock
        return
    if request.param.startswith("redis"):
        from idempotent.stores.redis import RedisStore

        cluster = request.param == "redis-cluster"
        url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
        redis_store = RedisStore(url, clock=clock, cluster=cluster)
        yield redis_store, clock
        redis_store.close()
        return
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    store = SqlStore(url, clock=clock)
    store.create_schema()
    yield store, clock
    store.engine.dispose()


def test_claim_complete_duplicate(contract: tuple[Store, Clock]) -> None:
    """claim → complete → a second claim returns the completed record."""
    store, clock = contract
    got = store.claim("ns", "k", fingerprint="f" * 64, lease=30, ttl=100)
    assert isinstance(got, Claimed) and got.lease_until == clock.now + 30
    store.complete("ns", "k", got.token, b'{"ok":1}', ttl=100)
    again = store.claim("ns", "k", fingerprint="f" * 64)
    assert isinstance(again, Completed)
    rec = again.record
    assert (rec.state, rec.result, rec.fingerprint) == (State.COMPLETED, b'{"ok":1}', "f" * 64)
    assert rec.expires_at == clock.now + 100 and rec.completed_at == clock.now


def test_live_lease_is_in_progress_expired_is_taken_over(contract: tuple[Store, Clock]) -> None:
    """A live lease blocks others; an expired one is taken over with a new token; the stale
    owner can neither complete, renew nor release."""
    store, clock = contract
    first = store.claim("ns", "k", fingerprint=None, lease=10)
    assert isinstance(first, Claimed)
    busy = store.claim("ns", "k", fingerprint=None, lease=10)
    assert isinstance(busy, InProgress) and busy.record.lease_until == clock.now + 10
    clock.now += 10.5
    second = store.claim("ns", "k", fingerprint=None, lease=10)
    assert isinstance(second, Claimed) and second.token != first.token
    with pytest.raises(LeaseLost):
        store.complete("ns", "k", first.token, b"stale")
    with pytest.raises(LeaseLost):
        store.renew("ns", "k", first.token, 10)
    assert store.release("ns", "k", first.token) is False
    store.complete("ns", "k", second.token, b"fresh")
    rec = store.get("ns", "k")
    assert rec is not None and rec.result == b"fresh" and rec.token == second.token


def test_renew_extends_the_lease(contract: tuple[Store, Clock]) -> None:
    """renew moves the deadline, so the key is not taken over while its owner lives."""
    store, clock = contract
    got = store.claim("ns", "k", fingerprint=None, lease=10)
    assert isinstance(got, Claimed)
    clock.now += 8
    assert store.renew("ns", "k", got.token, 10) == clock.now + 10
    clock.now += 8
    assert isinstance(store.claim("ns", "k", fingerprint=None, lease=10), InProgress)


def test_release_frees_the_key(contract: tuple[Store, Clock]) -> None:
    """release by the owner deletes the claim; the next claim is new."""
    store, _ = contract
    got = store.claim("ns", "k", fingerprint=None)
    assert isinstance(got, Claimed)
    assert store.release("ns", "k", got.token) is True
    assert store.get("ns", "k") is None
    assert isinstance(store.claim("ns", "k", fingerprint=None), Claimed)


def test_completed_cannot_be_released_and_complete_is_idempotent(
    contract: tuple[Store, Clock],
) -> None:
    """A completed record stays; completing twice with the same token is harmless."""
    store, _ = contract
    got = store.claim("ns", "k", fingerprint=None)
    assert isinstance(got, Claimed)
    store.complete("ns", "k", got.token, b"1")
    store.complete("ns", "k", got.token, b"1")
    assert store.release("ns", "k", got.token) is False
    rec = store.get("ns", "k")
    assert rec is not None and rec.state is State.COMPLETED


def test_expired_completed_record_is_claimed_again(contract: tuple[Store, Clock]) -> None:
    """After ttl a completed key is new again."""
    store, clock = contract
    got = store.claim("ns", "k", fingerprint=None, ttl=50)
    assert isinstance(got, Claimed)
    store.complete("ns", "k", got.token, None, ttl=50)
    clock.now += 51
    assert isinstance(store.claim("ns", "k", fingerprint=None), Claimed)


def test_namespaces_are_separate(contract: tuple[Store, Clock]) -> None:
    """The same key in two namespaces is two records."""
    store, _ = contract
    assert isinstance(store.claim("a", "k", fingerprint=None), Claimed)
    assert isinstance(store.claim("b", "k", fingerprint=None), Claimed)


def test_rule_claimable_reports_takeovers_and_not_fresh_keys(
        contract: tuple[Store, Clock]) -> None:
    """CLAIMABLE: a new key is not a takeover; another worker's lapsed lease is
    (taken_over=True); a record past its expiry is a new key again, not a takeover."""
    store, clock = contract
    first = store.claim("ns", "k", fingerprint=None, lease=10, ttl=100)
    assert isinstance(first, Claimed) and first.taken_over is False
    clock.now += 11
    second = store.claim("ns", "k", fingerprint=None, lease=10, ttl=100)
    assert isinstance(second, Claimed) and second.taken_over is True
    clock.now += 200  # past expires_at: the record no longer counts
    third = store.claim("ns", "k", fingerprint=None, lease=10, ttl=100)
    assert isinstance(third, Claimed) and third.taken_over is False


def test_rule_fenced_a_claim_sent_again_with_its_token_is_its_own(
        contract: tuple[Store, Clock]) -> None:
    """FENCED: a claim retried with the same token (its first reply lost) is Claimed
    again, not InProgress; another token is InProgress."""
    store, _ = contract
    got = store.claim("ns", "k", fingerprint=None, lease=10, token="t" * 32)
    assert isinstance(got, Claimed) and got.token == "t" * 32
    again = store.claim("ns", "k", fingerprint=None, lease=10, token="t" * 32)
    assert isinstance(again, Claimed) and again.token == "t" * 32
    assert isinstance(store.claim("ns", "k", fingerprint=None, lease=10), InProgress)


def test_rule_store_time_without_an_injected_clock(contract: tuple[Store, Clock]) -> None:
    """STORE TIME: with no clock injected the store decides on its own clock, which on
    this machine reads the real time; a live lease is InProgress with the store's now."""
    import time

    store, _ = contract
    store.clock = None
    before = time.time()
    now = store.now()
    assert before - 5 < now < time.time() + 5
    got = store.claim("ns", "own-time", fingerprint=None, lease=30)
    assert isinstance(got, Claimed) and now < got.lease_until < time.time() + 35
    busy = store.claim("ns", "own-time", fingerprint=None, lease=30)
    assert isinstance(busy, InProgress) and busy.now < got.lease_until


def _race(url: str, barrier: Any, results: Any) -> None:
    store = SqlStore(url)
    barrier.wait(30)
    outcome = store.claim("race", "one-key", fingerprint=None, lease=60)
    results.put(type(outcome).__name__)
    store.engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_concurrent_claims_across_processes(kind: str, request: pytest.FixtureRequest) -> None:
    """Eight processes claim one key at the same moment: exactly one Claimed."""
    url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "pg_url")
    store = SqlStore(url)
    store.create_schema()
    store.engine.dispose()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, barrier, results)) for _ in range(8)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert outcomes == ["Claimed"] + ["InProgress"] * 7
