"""A renewal that never returns (a blackholed socket) must not stall the others.

Issue 9, hole 6: the shared renewer used to call each renewal in turn on its one thread, so
one stuck call stopped the renewal of every other lease of the process; another worker
then took those keys over and ran their effects twice. These tests block a renewal on an
event that is only set at teardown, and wait, with a deadline, for what must still happen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idempotent import AlreadyInProgress, LeaseLost, MemoryStore, _heartbeat, idempotent
from idempotent._heartbeat import Beat, _Renewer

DEADLINE = 10.0  # seconds; only spent on failure


class Calls:
    """A renew callback that records each call (its start time, and the start time the
    renewer gave that attempt) and runs ``action(n)`` for the n-th call."""

    def __init__(self, action: Callable[[int], object] | None = None) -> None:
        self.action = action
        self.entered: list[float] = []  # time.monotonic() at each call's start
        self.attempt_started: list[float | None] = []  # beat.started seen by each call
        self.running = 0  # calls under way now
        self.most_running = 0
        self.beat: Beat | None = None
        self._cond = threading.Condition()

    @property
    def calls(self) -> int:
        return len(self.entered)

    def __call__(self, *args: object) -> None:
        with self._cond:
            self.entered.append(time.monotonic())
            self.attempt_started.append(getattr(self.beat, "started", None))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            n = len(self.entered)
            self._cond.notify_all()
        try:
            if self.action is not None:
                self.action(n)
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_for(self, n: int, timeout: float = DEADLINE) -> bool:
        return self.wait_until(lambda: self.calls >= n, timeout)

    def wait_past(self, t: float, n: int = 2) -> bool:
        """Wait until ``n`` calls started after monotonic time ``t``."""
        return self.wait_until(lambda: sum(e > t for e in self.entered) >= n)


def add(renewer: _Renewer, renew: Calls, interval: float, *args: object) -> Beat:
    """`_heartbeat.start` on a private renewer, so tests do not share one thread."""
    beat = Beat(renew, interval, renewer, args)
    renew.beat = beat
    renewer.add(beat)
    return beat


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll ``predicate`` until true or ``timeout``: for state no callback reports."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """What blocked renewals wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def blocked_by(release: threading.Event) -> Callable[[int], object]:
    return lambda n: release.wait()


def test_a_stuck_renewal_does_not_stall_the_other_beats(release: threading.Event) -> None:
    """The regression: while beat A's renewal hangs, beat B is still renewed, many times."""
    renewer = _Renewer()
    stuck, other = Calls(blocked_by(release)), Calls()
    a = add(renewer, stuck, 0.02, "ns", "stuck-key")
    b = add(renewer, other, 0.02, "ns", "other-key")
    try:
        assert stuck.wait_for(1), "A was never renewed"
        at_stuck = other.calls
        assert other.wait_for(at_stuck + 5), (
            f"B renewed {other.calls - at_stuck} times while A's renewal hung")
        assert not b.lost
    finally:
        a.stop()
        b.stop()


def test_a_stuck_renewal_is_retried_after_its_deadline_not_before(
        release: threading.Event, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal still under way is not started again until its deadline (one interval
    after it started); then another attempt starts beside the blocked one, with a warning
    naming the lease."""
    renewer = _Renewer()
    interval = 0.25
    stuck = Calls(blocked_by(release))
    with caplog.at_level(logging.WARNING, logger="idempotent"):
        a = add(renewer, stuck, interval, "ns", "stuck-key")
        try:
            assert stuck.wait_for(3), f"{stuck.calls} attempts of the stuck renewal"
        finally:
            a.stop()
    assert stuck.running == stuck.calls  # all still blocked: retried beside, not after
    for n in (1, 2):
        started = stuck.attempt_started[n - 1]
        assert started is not None
        assert stuck.entered[n] >= started + interval, f"attempt {n + 1} came early"
    stuck_warnings = [r for r in caplog.records if "has not returned" in r.getMessage()]
    assert len(stuck_warnings) >= 2
    assert all("stuck-key" in r.getMessage() for r in stuck_warnings)
    assert all(r.levelno == logging.WARNING for r in stuck_warnings)


def test_a_stopped_stuck_beat_is_not_retried(release: threading.Event) -> None:
    """stop() while a renewal hangs: its deadline passes without another attempt."""
    renewer = _Renewer()
    interval = 0.1
    stuck, witness = Calls(blocked_by(release)), Calls()
    a = add(renewer, stuck, interval, "ns", "stuck-key")
    w = add(renewer, witness, 0.02)
    try:
        assert stuck.wait_for(1)
        a.stop()
        started = stuck.attempt_started[0]
        assert started is not None
        assert witness.wait_past(started + interval, 3)  # passes after A's deadline
        assert stuck.calls == 1
        assert a not in renewer.beats
    finally:
        w.stop()


def test_lease_lost_from_a_retry_stops_the_beat(release: threading.Event) -> None:
    """The first attempt hangs, the retry finds the lease lost: the beat is lost and
    stops, and the hung attempt returning later does not revive it."""
    renewer = _Renewer()
    interval = 0.1

    def first_hangs_then_lost(n: int) -> None:
        if n == 1:
            release.wait()
            return
        raise LeaseLost("taken over", namespace="ns", key="k")

    renew, witness = Calls(first_hangs_then_lost), Calls()
    a = add(renewer, renew, interval, "ns", "k")
    w = add(renewer, witness, 0.02)
    try:
        assert renew.wait_for(2), "the hung renewal was not retried"
        assert wait_until(lambda: a.lost), "LeaseLost did not mark the beat lost"
        release.set()
        assert renew.wait_until(lambda: renew.running == 0)
        lost_at = time.monotonic()
        assert witness.wait_past(lost_at + interval, 3)
        assert renew.calls == 2
        assert a.lost
        assert a not in renewer.beats
    finally:
        w.stop()
        a.stop()


def test_idle_renewal_threads_exit(monkeypatch: pytest.MonkeyPatch,
                                   release: threading.Event) -> None:
    """The threads started for stuck renewals end once they are idle again."""
    monkeypatch.setattr(_heartbeat, "_WORKER_IDLE", 0.05)
    renewer = _Renewer()
    stuck = Calls(blocked_by(release))
    a = add(renewer, stuck, 0.05)
    try:
        assert stuck.wait_for(3)
        assert renewer.workers.size >= 3
    finally:
        a.stop()
        release.set()
    assert wait_until(lambda: renewer.workers.size == 0), renewer.workers.size


async def test_a_hung_async_renewal_is_retried_after_its_deadline() -> None:
    """On the loop too: a renewal that hangs is left running, and another attempt starts
    once it is one interval old (not before); other async beats go on meanwhile."""
    interval = 0.2
    hang = asyncio.Event()
    entered: list[tuple[float, float | None]] = []  # (start time, beat.started seen)
    more = asyncio.Event()
    beat: Beat | None = None

    async def hung() -> None:
        entered.append((time.monotonic(), getattr(beat, "started", None)))
        more.set()
        await hang.wait()

    ticks = 0
    ticked = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        ticked.set()

    beat = _heartbeat.start_async(hung, interval)
    witness = _heartbeat.start_async(tick, 0.01)
    try:
        while len(entered) < 3:
            await asyncio.wait_for(more.wait(), DEADLINE)
            more.clear()
        at = ticks
        for _ in range(3):  # the witness is renewed while the attempts hang
            await asyncio.wait_for(ticked.wait(), DEADLINE)
            ticked.clear()
        assert ticks > at
        for (_, started), (later, _) in itertools.pairwise(entered):
            assert started is not None
            assert later >= started + interval, "retried before the deadline"
    finally:
        beat.stop()
        witness.stop()
        hang.set()
        # let the hung attempts (and the beat's retry loop) end before the loop closes
        end = time.monotonic() + DEADLINE
        while any(not t.done() for t in _heartbeat._tasks) and time.monotonic() < end:
            await asyncio.sleep(0.001)


def test_end_to_end_a_stuck_key_does_not_let_another_be_taken_over(
        release: threading.Event) -> None:
    """With MemoryStore (real clock): the renewal of key "a" hangs; the handler of key "b"
    then runs for one and a half leases, and a redelivery of "b" meanwhile is refused as in
    progress (b's lease was kept alive) instead of running the payment a second time, and
    b completes without LeaseLost."""
    lease = 1.0  # the shortest the decorator accepts
    a_stuck = threading.Event()
    b_renewals = Calls()

    class StuckStore(MemoryStore):
        def renew(self, namespace: str, key: str, token: str, lease: float) -> float:
            if key == "a":  # a blackholed socket, for this key only
                a_stuck.set()
                release.wait()
            else:
                b_renewals()
            return super().renew(namespace, key, token, lease)

    store = StuckStore()
    effects = {"a": 0, "b": 0}
    b_done = threading.Event()
    redelivery: list[str] = []

    @idempotent(store, key="id", namespace="stall", lease=lease)
    def pay(msg: dict[str, Any]) -> str:
        key = msg["id"]
        effects[key] += 1
        if key == "a":
            assert b_done.wait(DEADLINE)
            return "paid a"
        if effects["b"] > 1:  # the redelivery got the key: the payment ran twice
            return "paid b again"
        time.sleep(1.5 * lease)  # the handler's own long work
        try:
            redelivery.append(pay({"id": "b"}))
        except AlreadyInProgress:
            redelivery.append("refused: in progress")
        return "paid b"

    results: list[str] = []
    worker_a = threading.Thread(target=lambda: results.append(pay({"id": "a"})))
    worker_a.start()
    try:
        assert a_stuck.wait(DEADLINE), "a's renewal never started"
        assert pay({"id": "b"}) == "paid b"
    finally:
        b_done.set()
        worker_a.join(DEADLINE)
    assert redelivery == ["refused: in progress"]
    assert effects == {"a": 1, "b": 1}
    assert b_renewals.calls >= 2
    assert results == ["paid a"]
