"""``Store.purge`` and ``Store.stats`` on memory, SQLite and PostgreSQL: what is deleted
and what never is, in batches; two purges at once; and a purge running while four worker
processes claim and complete against PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import test_store_contract
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_store_contract import Clock

from idempotent import Claimed, Record, SqlStore, State
from idempotent.stores._sql_schema import COLUMNS as _COLUMNS
from idempotent.stores.base import Store, purgeable

#: The contract tests' fixture (memory, SQLite, PostgreSQL; a hand-moved clock), as ``store``.
store = test_store_contract.contract


def put(store: Store, ns: str, key: str, *, ttl: float, lease: float = 30,
        state: State | None = State.COMPLETED) -> str:
    """A record in ``state`` (None: left in progress); returns its token."""
    got = store.claim(ns, key, fingerprint=None, lease=lease, ttl=ttl)
    assert isinstance(got, Claimed)
    if state is not None:
        store.complete(ns, key, got.token, b"{}", ttl=ttl, state=state)
    return got.token


def keys(store: Store, ns: str, names: list[str]) -> set[str]:
    return {k for k in names if store.get(ns, k) is not None}


def test_purge_deletes_expired_and_never_a_live_lease(store: tuple[Store, Clock]) -> None:
    """Expired records go (completed, failed, in progress with a dead lease); live ones
    and in-progress records whose lease is live stay, however old or expired."""
    s, clock = store
    put(s, "a", "done-old", ttl=10)
    put(s, "a", "failed-old", ttl=10, state=State.FAILED)
    put(s, "a", "dead-lease", ttl=10, lease=5, state=None)
    put(s, "a", "live-lease-expired", ttl=10, lease=1000, state=None)
    clock.now += 20
    put(s, "a", "done-new", ttl=100)
    put(s, "a", "running", ttl=100, lease=30, state=None)
    names = ["done-old", "failed-old", "dead-lease", "live-lease-expired", "done-new", "running"]

    assert s.purge() == 3
    assert keys(s, "a", names) == {"live-lease-expired", "done-new", "running"}
    assert s.purge() == 0
    # older_than: everything created before now - 5, still never a live lease
    clock.now += 10
    assert s.purge(older_than=5) == 1
    assert keys(s, "a", names) == {"live-lease-expired", "running"}
    clock.now += 1000
    assert s.purge() == 2
    assert keys(s, "a", names) == set()


def test_purge_in_batches_and_by_namespace(store: tuple[Store, Clock]) -> None:
    """Every batch is deleted and counted once; ``namespace`` spares the others."""
    s, clock = store
    for i in range(23):
        put(s, "a", f"k{i}", ttl=1)
        put(s, "b", f"k{i}", ttl=1)
    clock.now += 2
    assert s.purge(namespace="a", batch=5) == 23
    assert len(keys(s, "b", [f"k{i}" for i in range(23)])) == 23
    assert keys(s, "a", [f"k{i}" for i in range(23)]) == set()
    assert s.purge(batch=23) == 23  # a full last batch: one more (empty) step ends it
    assert s.stats().counts == ()


def test_purge_rejects_bad_arguments(store: tuple[Store, Clock]) -> None:
    s, _ = store
    with pytest.raises(ValueError, match="batch"):
        s.purge(batch=0)
    with pytest.raises(ValueError, match="older_than"):
        s.purge(older_than=-1)


def test_stats_counts_per_namespace_and_state(store: tuple[Store, Clock]) -> None:
    """Counts per namespace and state, how many of them are expired, and the oldest
    in-progress record."""
    s, clock = store
    put(s, "b", "first-running", ttl=5, state=None)
    clock.now += 1
    put(s, "a", "x", ttl=100)
    put(s, "a", "y", ttl=5)
    put(s, "a", "z", ttl=100, state=State.FAILED)
    put(s, "b", "second-running", ttl=100, state=None)
    clock.now += 10
    stats = s.stats()
    got = [(c.namespace, c.state, c.count, c.expired) for c in stats.counts]
    assert got == [
        ("a", State.COMPLETED, 2, 1),
        ("a", State.FAILED, 1, 0),
        ("b", State.IN_PROGRESS, 2, 1),
    ]
    oldest = stats.oldest_in_progress
    assert oldest is not None and (oldest.namespace, oldest.key) == ("b", "first-running")
    assert oldest.created_at == 2_000_000.0
    only_a = s.stats(namespace="a")
    assert [c.namespace for c in only_a.counts] == ["a", "a"]
    assert only_a.oldest_in_progress is None


def _create_schema(url: str) -> None:
    s = SqlStore(url)
    s.create_schema()
    s.engine.dispose()


def _seed_expired(url: str, ns: str, n: int) -> None:
    seed = SqlStore(url)
    with seed.engine.begin() as conn:
        assert len(seed.record_many(conn, ns, [f"old-{i}" for i in range(n)], ttl=-1)) == n
    seed.engine.dispose()


def _count(url: str, ns: str | None = None) -> int:
    s = SqlStore(url)
    try:
        return sum(c.count for c in s.stats(namespace=ns).counts)
    finally:
        s.engine.dispose()


def _run_all(calls: list[Callable[[], int]]) -> list[int]:
    """Run the calls in threads started together; re-raise the first error."""
    results: list[Any] = [None] * len(calls)
    go = threading.Barrier(len(calls))

    def run(i: int) -> None:
        go.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # handed to the test thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_two_purges_at_once(sql_url: str) -> None:
    """Two purges started together delete every expired record once between them."""
    _create_schema(sql_url)
    _seed_expired(sql_url, "old", 3000)
    stores = [SqlStore(sql_url), SqlStore(sql_url)]
    counts = _run_all([lambda s=s: s.purge(batch=100) for s in stores])  # type: ignore[misc]
    assert sum(counts) == 3000
    assert _count(sql_url) == 0
    for s in stores:
        s.engine.dispose()


WORKER = textwrap.dedent("""
    import json, sys
    from idempotent import Claimed, LeaseLost, SqlStore

    url, wid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SqlStore(url)
    out = {"claimed": 0, "completed": 0, "abandoned": 0, "busy": 0, "lease_lost": [],
           "errors": []}
    for i in range(n):
        # every third delivery reuses one of 40 shared keys that expire at once, so
        # workers keep taking over records the purges are deleting
        shared = i % 3 == 0
        key = f"shared-{i % 40}" if shared else f"{wid}-{i}"
        # (a claim-to-complete slower than ttl lets another worker take an expired
        # in-progress record over, by rule CLAIMABLE: LeaseLost. Under a loaded machine
        # 50 ms was too short for that never to happen.)
        ttl = 0.3 if shared else 2.0
        try:
            got = store.claim("live", key, fingerprint=None, lease=30, ttl=ttl)
            if not isinstance(got, Claimed):
                out["busy"] += 1
                continue
            out["claimed"] += 1
            if i % 10 == 1:  # a worker that died: its short lease runs out
                store.renew("live", key, got.token, 0.2)
                out["abandoned"] += 1
                continue
            store.complete("live", key, got.token, b"{}", ttl=ttl)
            out["completed"] += 1
        except LeaseLost:
            out["lease_lost"].append(key)
        except Exception as exc:
            out["errors"].append(repr(exc))
        if i == 20:
            print("ready", flush=True)
    print(json.dumps(out), flush=True)
""")


@pytest.mark.slow
@pytest.mark.postgres
def test_purge_while_four_processes_work(pg_url: str, tmp_path: Path) -> None:
    """Two purges loop (expired only, and everything older than 0 s) while 4 processes
    claim, complete, abandon and take over keys: no worker loses a lease to a purge, no
    error, every record expired before the purges is gone, live leases survive."""
    _create_schema(pg_url)
    _seed_expired(pg_url, "old", 2000)
    seeder = SqlStore(pg_url)
    live_tokens = {f"live-{i}": put(seeder, "kept", f"live-{i}", ttl=-1, lease=3600, state=None)
                   for i in range(50)}
    seeder.engine.dispose()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen([sys.executable, str(script), pg_url, f"w{w}", "600"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    try:
        for w in workers:  # each has claimed for a while before the purges start
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready", w.stderr.read() if w.stderr else ""
        done = threading.Event()
        purged = [0, 0]
        passes = [0, 0]

        def purging(i: int, older_than: float | None) -> int:
            s = SqlStore(pg_url)
            try:
                while not done.is_set() or passes[i] == 0:
                    purged[i] += s.purge(older_than=older_than, batch=25)
                    passes[i] += 1
                return passes[i]
            finally:
                s.engine.dispose()

        def wait_workers() -> int:
            try:
                for w in workers:
                    w.wait(timeout=300)
            finally:
                done.set()
            return 0

        _run_all([lambda: purging(0, None), lambda: purging(1, 0.0), wait_workers])
        reports = []
        for w in workers:
            out, err = w.communicate(timeout=30)
            assert w.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert all(r["errors"] == [] for r in reports), reports
    assert all(r["lease_lost"] == [] for r in reports), reports
    assert sum(r["completed"] for r in reports) > 1000
    assert min(passes) >= 1 and purged[0] + purged[1] >= 2000
    assert _count(pg_url, "old") == 0
    check = SqlStore(pg_url)
    for key, token in live_tokens.items():  # still there, still owned by their token
        record = check.get("kept", key)
        assert record is not None and record.token == token
    # a minute later every lease and ttl of the workers has run out: all of theirs go
    check.clock = lambda: time.time() + 60
    check.purge(batch=500)
    assert [(c.namespace, c.count) for c in check.stats().counts] == [("kept", 50)]
    check.engine.dispose()


@pytest.mark.postgres
def test_purge_skips_a_key_a_transaction_holds(pg_url: str) -> None:
    """A pessimistic transactional delivery that took over an expired key holds its row:
    a purge meanwhile skips it (SKIP LOCKED, no waiting) and the delivery commits."""
    _create_schema(pg_url)
    _seed_expired(pg_url, "ns", 3)  # old-0, old-1, old-2
    worker, purger = SqlStore(pg_url), SqlStore(pg_url)
    try:
        with worker.transaction("ns", "old-1", None, 60, optimistic=False) as tx:
            assert tx.existing is None  # the expired record was taken over, row locked
            deleted: list[int] = []
            purge = threading.Thread(target=lambda: deleted.append(purger.purge(older_than=0)))
            purge.start()
            purge.join(timeout=30)  # a guard against hanging, not a measurement
            blocked = purge.is_alive()
            tx.commit(b'"done"')
        purge.join()
        assert not blocked, "the purge waited for the row the transaction holds"
        assert deleted == [2]  # old-0 and old-2; old-1 skipped
        record = purger.get("ns", "old-1")
        assert record is not None and record.result == b'"done"'
        assert record.state is State.COMPLETED and record.expires_at > time.time()
    finally:
        worker.engine.dispose()
        purger.engine.dispose()


_STATES = [State.IN_PROGRESS, State.COMPLETED, State.FAILED]
_record = st.tuples(
    st.sampled_from(["a", "b"]), st.sampled_from(_STATES),
    st.integers(-3, 3), st.integers(-3, 3), st.none() | st.integers(-3, 3),
)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
# the boundaries, always tried: expiry, lease deadline and cut-off each equal to now/cut
@example(records=[("a", State.IN_PROGRESS, 0, 0, 0), ("a", State.IN_PROGRESS, 0, 0, 1),
                  ("a", State.COMPLETED, 0, 0, None), ("a", State.COMPLETED, -2, 1, None),
                  ("a", State.COMPLETED, -1, 1, None)],
         older_than=None, namespace=None, batch=2)
@example(records=[("a", State.COMPLETED, -2, 1, None), ("a", State.COMPLETED, -1, 1, None),
                  ("b", State.IN_PROGRESS, -3, 1, -1), ("b", State.IN_PROGRESS, -3, 1, 0)],
         older_than=2, namespace=None, batch=1)
@given(records=st.lists(_record, max_size=12), older_than=st.none() | st.integers(0, 4),
       namespace=st.none() | st.just("a"), batch=st.integers(1, 5))
def test_sql_purge_agrees_with_the_rule(
    sql_store: SqlStore, records: list[tuple[str, State, int, int, int | None]],
    older_than: int | None, namespace: str | None, batch: int,
) -> None:
    """On random records whose times sit on the boundaries (equal to now, to the cut-off,
    to the lease deadline), the SQL purge deletes exactly what `purgeable` says."""
    now = 1000.0
    sql_store.clock = lambda: now
    rows = [
        Record(ns, f"k{i}", state, None, None, "t" * 32, None if lease is None else now + lease,
               now + created, None, now + expires)
        for i, (ns, state, created, expires, lease) in enumerate(records)
    ]
    with sql_store.engine.begin() as conn:
        conn.execute(sql_store.table.delete())
        if rows:
            conn.execute(sql_store.table.insert(), [
                {c: getattr(r, c) for c in _COLUMNS} | {"state": r.state.value}
                for r in rows])
    cut = None if older_than is None else now - older_than
    doomed = {r.key for r in rows
              if (namespace is None or r.namespace == namespace) and purgeable(r, now, cut)}
    assert sql_store.purge(older_than=older_than, namespace=namespace, batch=batch) == len(
        doomed)
    with sql_store.engine.connect() as conn:
        left = set(conn.execute(sa.select(sql_store.table.c.key)).scalars())
    assert left == {r.key for r in rows} - doomed


@pytest.fixture
def sql_store(sql_url: str) -> Iterator[SqlStore]:
    s = SqlStore(sql_url)
    s.create_schema()
    yield s
    s.engine.dispose()
