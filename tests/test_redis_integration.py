"""RedisStore under the decorator, against real redis-server processes: 8 processes racing
on the same keys, a zombie worker, and Redis killed and restarted in the middle of a run
(durable with an append-only file, and cache-only)."""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _servers import RedisServer

from idempotent import (
    AlreadyInProgress,
    Claimed,
    LeaseLost,
    State,
    StoreUnavailable,
    current_key,
    idempotent,
    transient_retry,
)
from idempotent.stores.redis import RedisStore

KEYS = 1000
WORKERS = 8
DEADLINE = 120.0


def _race_worker(url: str, cluster: bool, seed: int, barrier: Any, out: Any) -> None:
    """Handle every one of the KEYS messages, in an order of its own; a message another
    worker holds is tried again later, as a broker would redeliver it."""
    store = RedisStore(url, cluster=cluster)

    @idempotent(store, key="id", namespace="race", lease=30)
    def handle(msg: dict[str, str]) -> dict[str, Any]:
        runs = store.client.incr(f"count:{msg['id']}")  # the side effect, counted
        return {"pid": os.getpid(), "runs": runs}

    pending = [f"k{i}" for i in range(KEYS)]
    random.Random(seed).shuffle(pending)
    results: dict[str, Any] = {}
    busy = 0
    barrier.wait(60)
    deadline = time.monotonic() + DEADLINE
    while pending and time.monotonic() < deadline:
        later = []
        for key in pending:
            try:
                results[key] = handle({"id": key})
            except AlreadyInProgress:
                later.append(key)
                busy += 1
        pending = later
    out.put((results, busy))
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_eight_processes_race_on_the_same_keys(kind: str,
                                               request: pytest.FixtureRequest) -> None:
    """8 spawned processes run the same 1,000 messages through @idempotent (lease mode):
    each key's handler ran exactly once (its INCR counter is 1) and every process got
    that one run's result."""
    cluster = kind == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(url, cluster, seed, barrier, out))
             for seed in range(WORKERS)]
    for p in procs:
        p.start()
    got = [out.get(timeout=DEADLINE + 60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    first = got[0][0]
    assert len(first) == KEYS
    assert all(results == first for results, _ in got)  # one result per key, everywhere
    assert {r["runs"] for r in first.values()} == {1}
    store = RedisStore(url, cluster=cluster)
    counters = [int(store.client.get(f"count:k{i}")) for i in range(KEYS)]
    assert counters == [1] * KEYS
    assert len({r["pid"] for r in first.values()}) > 1  # the work was really shared
    assert store.stats("race").counts[0].count == KEYS
    store.close()


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_zombie_worker_gets_lease_lost(kind: str, request: pytest.FixtureRequest) -> None:
    """A worker whose lease ran out finishes late: its complete raises LeaseLost, and the
    record keeps the result of the worker that took the key over."""
    cluster = kind == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    clock = Clock()
    store = RedisStore(url, clock=clock, cluster=cluster)
    order: list[str] = []
    took_over: list[Any] = []

    @idempotent(store, key="id", namespace="zombie", lease=10, heartbeat=False,
                fingerprint=["id"])
    def charge(msg: dict[str, str], who: str) -> str:
        order.append(who)
        if who == "zombie":
            clock.now += 11  # the zombie stalls past its lease...
            helper = threading.Thread(
                target=lambda: took_over.append(charge(msg, "new owner")))
            helper.start()  # ...and a redelivery runs meanwhile, on another worker
            helper.join(30)
        return f"charged by {who}"

    with pytest.raises(LeaseLost) as err:
        charge({"id": "pay-1"}, "zombie")
    assert err.value.key == "pay-1"
    assert order == ["zombie", "new owner"] and took_over == ["charged by new owner"]
    rec = store.get("zombie", "pay-1")
    assert rec is not None and rec.state is State.COMPLETED
    assert json.loads(rec.result or b"") == "charged by new owner"
    assert charge({"id": "pay-1"}, "third") == "charged by new owner"  # a duplicate now
    store.close()


# -- Redis killed in the middle of a run ------------------------------------------------------
class Run:
    """A stream of payments, each delivered twice, through one lease-mode handler whose
    external effect (a downstream that dedups by the idempotency key, as a payment
    provider does) is kept in ``effects``. A delivery that fails goes back on the queue."""

    def __init__(self, server: RedisServer, crash_at: dict[str, str]) -> None:
        self.server = server
        # the store's clock: real time plus how long the broker's countdowns would have
        # waited, so a lease runs out when the test says, not when the machine gets to it
        self.waited = 0.0
        self.store = RedisStore(server.url, clock=lambda: time.time() + self.waited)
        self.crash_at = crash_at  # payment id -> "restart" | "down"
        self.runs: collections.Counter[str] = collections.Counter()
        self.returned: dict[str, dict[str, Any]] = {}
        self.effects: dict[str, int] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.failed_keys: set[str] = set()
        policy = transient_retry(attempts=4, initial=0.01, max_wait=0.05, deadline=0.5)

        @idempotent(self.store, key="id", namespace="pay", lease=30, retry=policy)
        def pay(msg: dict[str, Any]) -> dict[str, Any]:
            key = current_key()
            self.runs[key] += 1
            self.effects.setdefault(key, msg["cents"])  # the downstream's own dedup
            what = self.crash_at.pop(msg["id"], None)
            if what == "restart":
                self.server.restart(kill=True)  # back at once: the call rides over it
            elif what == "down":
                self.server.crash()  # stays down until the loop revives it
            value = {"id": msg["id"], "cents": msg["cents"]}
            self.returned[key] = value
            return value

        self.pay = pay

    def deliver(self, payments: list[dict[str, Any]]) -> None:
        queue = collections.deque(payments + payments)
        deadline = time.monotonic() + 60
        while queue:
            assert time.monotonic() < deadline, f"{len(queue)} deliveries left"
            msg = queue.popleft()
            try:
                assert self.pay(msg) == {"id": msg["id"], "cents": msg["cents"]}
            except (StoreUnavailable, LeaseLost, AlreadyInProgress) as exc:
                self.errors[type(exc).__name__] += 1
                self.failed_keys.add(msg["id"])
                queue.append(msg)  # redelivered later
                down = isinstance(exc, StoreUnavailable) and not self.server.running
                if down and self.errors["StoreUnavailable"] >= 3:
                    self.server.revive()
                if isinstance(exc, AlreadyInProgress):
                    self.waited += exc.retry_after  # the broker's countdown, passed at once

    def check(self, payments: list[dict[str, Any]]) -> None:
        """Every payment's effect happened once; every completed record holds what its
        handler returned; nothing is left in progress."""
        ids = {p["id"] for p in payments}
        assert set(self.effects) == ids
        assert self.effects == {p["id"]: p["cents"] for p in payments}
        names = list(self.store.client.scan_iter(match=b"idem:3:pay:*", count=1000))
        assert len(names) == len(ids)
        for p in payments:
            rec = self.store.get("pay", p["id"])
            assert rec is not None and rec.state is State.COMPLETED, p["id"]
            assert json.loads(rec.result or b"") == self.returned[p["id"]]


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A private redis-server that fsyncs its append-only file on every write."""
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


PAYMENTS = [{"id": f"p{i}", "cents": 100 + i} for i in range(200)]


def test_durable_redis_killed_mid_run(durable_redis: RedisServer) -> None:
    """Redis (AOF, fsync always) is SIGKILLed twice in the middle of handlers: once
    restarted at once (the retry policy rides over it), once left down (calls end in
    StoreUnavailable until it is back). After redelivery every payment's effect happened
    once, every record is completed with its handler's result, nothing else."""
    run = Run(durable_redis, {"p20": "restart", "p60": "down"})
    run.deliver(PAYMENTS)
    run.check(PAYMENTS)
    assert run.errors["StoreUnavailable"] >= 3
    # p60's claim survived the crash: its redelivery waited for the lease, took it over
    # and ran the handler again (the downstream's dedup kept the effect single)
    assert run.runs["p60"] == 2 and run.errors["AlreadyInProgress"] >= 1
    assert run.runs["p20"] == 1  # completed after the restart: the record was kept
    # a second run of a handler only ever follows a failed delivery of that key
    assert {k for k, n in run.runs.items() if n > 1} <= run.failed_keys
    assert sum(run.runs.values()) == len(PAYMENTS) + 1
    run.store.close()


def test_cache_only_redis_restart_forgets_records() -> None:
    """What a cache-only Redis (no persistence) gives after a restart, documented: the
    in-flight claim is gone, so its complete raises LeaseLost (nothing stored, the message
    is redelivered and runs again), and every key completed before the restart is
    forgotten, so its duplicates run the handler again. No record ever claims a result
    that was not returned; effects stay single only through the downstream's dedup."""
    server = RedisServer()
    server.start()
    try:
        run = Run(server, {"p100": "restart"})
        run.deliver(PAYMENTS)
        run.check(PAYMENTS)
        assert run.errors["LeaseLost"] == 1
        assert run.runs["p100"] == 2
        # second deliveries of the payments completed before the restart ran again
        rerun = {k for k, n in run.runs.items() if n > 1} - {"p100"}
        assert rerun and rerun <= {f"p{i}" for i in range(100)}
        run.store.close()
    finally:
        server.stop()


def test_claim_many_then_complete_through_the_store(redis_url: str) -> None:
    """A batch claim's tokens fence each key's complete, as a single claim's do."""
    store = RedisStore(redis_url)
    out = store.claim_many("batch", [f"m{i}" for i in range(10)], lease=30)
    for key, outcome in out.items():
        assert isinstance(outcome, Claimed)
        store.complete("batch", key, outcome.token, key.encode())
    again = store.claim_many("batch", [f"m{i}" for i in range(12)])
    assert [type(o).__name__ for o in again.values()] == ["Completed"] * 10 + ["Claimed"] * 2
    store.close()
