"""Property test of the record state machine: random interleavings of claims, completions,
releases, renewals, crashes (a worker forgetting its claim) and lease expiry, run against
a model, on the memory store and on SQLite."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from idempotent import Claimed, Completed, InProgress, LeaseLost, MemoryStore, SqlStore, State
from idempotent.stores.base import Store

LEASE, TTL = 10.0, 100.0
KEYS = st.sampled_from(["a", "b"])
WORKERS = st.integers(0, 2)


@dataclass
class ModelRecord:
    state: State
    token: str | None
    lease_until: float | None
    expires_at: float
    result: bytes | None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordMachine(RuleBasedStateMachine):
    def make_store(self, clock: Clock) -> Store:
        return MemoryStore(clock=clock)

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.store = self.make_store(self.clock)
        self.model: dict[str, ModelRecord] = {}
        self.held: dict[tuple[int, str], str] = {}  # (worker, key) -> token it believes it owns

    def live(self, key: str) -> ModelRecord | None:
        rec = self.model.get(key)
        if rec is None or rec.expires_at <= self.clock.now:
            return None
        return rec

    @rule(worker=WORKERS, key=KEYS)
    def claim(self, worker: int, key: str) -> None:
        out = self.store.claim("ns", key, fingerprint=None, lease=LEASE, ttl=TTL)
        rec = self.live(key)
        lease_over = (
            rec is not None and rec.state is State.IN_PROGRESS
            and rec.lease_until is not None and rec.lease_until <= self.clock.now
        )
        if rec is None or lease_over:
            assert isinstance(out, Claimed), (key, rec, out)
            self.model[key] = ModelRecord(
                State.IN_PROGRESS, out.token, self.clock.now + LEASE, self.clock.now + TTL, None
            )
            self.held[worker, key] = out.token
        elif rec.state is State.IN_PROGRESS:
            assert isinstance(out, InProgress), (key, rec, out)
            assert out.record.token == rec.token
        else:
            assert isinstance(out, Completed), (key, rec, out)
            assert out.record.result == rec.result

    def _owns(self, worker: int, key: str) -> tuple[str | None, bool]:
        token = self.held.get((worker, key))
        rec = self.model.get(key)
        return token, (token is not None and rec is not None and rec.token == token)

    @rule(worker=WORKERS, key=KEYS, failed=st.booleans())
    def complete(self, worker: int, key: str, failed: bool) -> None:
        token, owns = self._owns(worker, key)
        if token is None:
            return
        result = f"{worker}:{self.clock.now}".encode()
        state = State.FAILED if failed else State.COMPLETED
        try:
            self.store.complete("ns", key, token, result, ttl=TTL, state=state)
            assert owns, "a stale owner completed"
            rec = self.model[key]
            rec.state, rec.result, rec.lease_until = state, result, None
            rec.expires_at = self.clock.now + TTL
        except LeaseLost:
            assert not owns, "the owner was refused"
        del self.held[worker, key]

    @rule(worker=WORKERS, key=KEYS)
    def release(self, worker: int, key: str) -> None:
        token, owns = self._owns(worker, key)
        if token is None:
            return
        in_progress = owns and self.model[key].state is State.IN_PROGRESS
        assert self.store.release("ns", key, token) is in_progress
        if in_progress:
            del self.model[key]
        del self.held[worker, key]

    @rule(worker=WORKERS, key=KEYS)
    def renew(self, worker: int, key: str) -> None:
        token, owns = self._owns(worker, key)
        if token is None:
            return
        in_progress = owns and self.model[key].state is State.IN_PROGRESS
        try:
            until = self.store.renew("ns", key, token, LEASE)
            assert in_progress
            self.model[key].lease_until = until
        except LeaseLost:
            assert not in_progress

    @rule(worker=WORKERS, key=KEYS)
    def crash(self, worker: int, key: str) -> None:
        """The worker dies: it forgets its claim, which stays until its lease runs out."""
        self.held.pop((worker, key), None)

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.0, 11.0, 60.0, 120.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def store_matches_model(self) -> None:
        for key in ("a", "b"):
            got = self.store.get("ns", key)
            rec = self.model.get(key)
            if rec is None:
                assert got is None
                continue
            assert got is not None
            assert (got.state, got.token, got.result) == (rec.state, rec.token, rec.result)


class SqliteRecordMachine(RecordMachine):
    def make_store(self, clock: Clock) -> Store:
        self.tmp = tempfile.TemporaryDirectory()
        store = SqlStore(f"sqlite:///{self.tmp.name}/m.db", clock=clock)
        store.create_schema()
        return store

    def teardown(self) -> None:
        assert isinstance(self.store, SqlStore)
        self.store.engine.dispose()
        self.tmp.cleanup()


TestMemoryRecordMachine = RecordMachine.TestCase
TestMemoryRecordMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestSqliteRecordMachine = SqliteRecordMachine.TestCase
TestSqliteRecordMachine.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
