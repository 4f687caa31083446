"""The lease renewer: the shared thread and its workers for plain handlers, and the
renewals handed to the event loop of async ones.

No test sleeps for a fixed time: each waits, with a deadline, for renewals it can count,
and a stopped beat is shown idle by waiting for renewals of another, live beat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

import pytest

from idempotent import LeaseLost, _heartbeat
from idempotent._heartbeat import Beat, _Renewer

DEADLINE = 10.0  # seconds; generous for a loaded 2-core machine, only spent on failure


class Counter:
    """A renew callback that counts its calls; ``wait_for(n)`` waits until n calls."""

    def __init__(self, action: Callable[[int], object] | None = None) -> None:
        self.calls = 0
        self.action = action
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.calls += 1
            n = self.calls
            self._cond.notify_all()
        if self.action is not None:
            self.action(n)

    def wait_for(self, n: int, timeout: float = DEADLINE) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.calls >= n, timeout)


def add(renewer: _Renewer, renew: Callable[[], object], interval: float) -> Beat:
    """`_heartbeat.start` on a private renewer, so tests do not share one thread."""
    beat = Beat(renew, interval, renewer)
    renewer.add(beat)
    return beat


def test_a_live_beat_is_renewed_repeatedly() -> None:
    """The public entry point renews every interval until stopped."""
    renew = Counter()
    beat = _heartbeat.start(renew, 0.02)
    try:
        assert renew.wait_for(3), f"only {renew.calls} renewals in {DEADLINE}s"
        assert not beat.lost
    finally:
        beat.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll ``predicate`` until true or ``timeout``: for state no callback reports."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def test_a_stopped_beat_is_never_renewed_again() -> None:
    """After stop(), and once the renewals then under way have returned, no renewal of
    the stopped beats starts again while a live beat is renewed twice more."""
    renewer = _Renewer()
    doomed = [Counter() for _ in range(10)]
    live = Counter()
    beats = [add(renewer, c, 0.02) for c in doomed]
    b = add(renewer, live, 0.02)
    try:
        assert all(c.wait_for(1) for c in doomed), "the beats were not renewed"
        for beat in beats:
            beat.stop()

        def idle() -> bool:  # no renewal of theirs on a worker any more
            with renewer.lock:
                return all(beat.started is None for beat in beats)

        assert wait_until(idle), "a renewal of a stopped beat never ended"
        at_stop, live_at_stop = [c.calls for c in doomed], live.calls
        # Renewals of `live` started after this point: passes past a due time of all.
        assert live.wait_for(live_at_stop + 2), "the live beat stopped being renewed"
        assert [c.calls for c in doomed] == at_stop
        assert renewer.beats == {b}
    finally:
        b.stop()


def test_lease_lost_stops_the_beat_and_sets_lost() -> None:
    """A renewal that raises LeaseLost ends the beat: ``lost`` is set, no more renewals
    start (an interval long enough that the first attempt ends before its deadline)."""
    renewer = _Renewer()
    interval = 0.3
    lost_seen: list[bool] = []  # beat.lost at the start of each renewal of `losing`

    def lose(n: int) -> None:
        lost_seen.append(a.lost)
        raise LeaseLost("taken over", namespace="ns", key="k")

    times: list[float] = []
    losing, live = Counter(lose), Counter(lambda n: times.append(time.monotonic()))
    a = add(renewer, losing, interval)
    b = add(renewer, live, 0.02)
    try:
        assert losing.wait_for(1)
        assert wait_until(lambda: a.lost)
        lost_at = time.monotonic()
        # Two renewals of `live` after the losing beat would have been due again.
        assert live.wait_for(len(times) + 2)
        assert wait_until(lambda: sum(t > lost_at + interval for t in times) >= 2)
        assert losing.calls == 1
        assert lost_seen == [False]
        assert a not in renewer.beats
        assert not b.lost
    finally:
        a.stop()
        b.stop()


def test_other_errors_are_logged_and_renewal_continues(caplog: pytest.LogCaptureFixture) -> None:
    """A store hiccup is logged as a warning; the beat keeps renewing."""
    renewer = _Renewer()

    def flaky(n: int) -> None:
        if n <= 2:
            raise RuntimeError(f"store hiccup {n}")

    renew = Counter(flaky)
    with caplog.at_level(logging.WARNING, logger="idempotent"):
        beat = add(renewer, renew, 0.02)
        try:
            assert renew.wait_for(4), f"only {renew.calls} renewals"
        finally:
            beat.stop()
    assert not beat.lost
    failures = [r for r in caplog.records if "lease renewal failed" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.levelno == logging.WARNING for r in failures)
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
        "store hiccup 1", "store hiccup 2"]


def test_start_and_stop_do_not_wake_the_thread() -> None:
    """Registering and ending leases is a set operation; the thread sleeps through it,
    and is woken only by a lease that needs a shorter period."""
    renewer = _Renewer()
    long = add(renewer, Counter(), 60.0)  # starts the thread with a 60 s period
    try:
        woken = renewer.wakeups
        for _ in range(1000):
            add(renewer, Counter(), 60.0).stop()
            add(renewer, Counter(), 90.0).stop()
        assert renewer.wakeups == woken
        assert renewer.beats == {long}
        short = Counter()
        quick = add(renewer, short, 0.02)  # must not wait out the 60 s sleep
        try:
            assert short.wait_for(2)
            assert renewer.period == 0.02
        finally:
            quick.stop()
    finally:
        long.stop()


def test_renewals_come_about_every_interval() -> None:
    """A beat is renewed at the wake-up nearest its due time: not much before, and well
    within the lease (three intervals) after; the decorator's leases rely on it."""
    renewer = _Renewer()
    times: list[float] = []
    renew = Counter(lambda n: times.append(time.monotonic()))
    interval = 0.2
    started = time.monotonic()
    beat = add(renewer, renew, interval)
    try:
        assert renew.wait_for(4)
    finally:
        beat.stop()
    gaps = [b - a for a, b in zip([started, *times], times, strict=False)]
    assert all(interval / 2 <= g < 3 * interval for g in gaps), gaps


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads, 3.12+
def test_a_forked_child_renews_with_its_own_thread() -> None:
    """The parent's thread does not exist in a child; the child starts its own."""
    _heartbeat.start(Counter(), 0.02).stop()  # the parent's thread is running
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            renew = Counter()
            beat = _heartbeat.start(renew, 0.02)
            code = 0 if renew.wait_for(2, timeout=DEADLINE) else 2
            beat.stop()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_async_beat_renews_until_stopped() -> None:
    """``start_async`` renews on the running loop, and stop() cancels the next renewal."""
    calls = 0
    renewed = asyncio.Event()

    async def renew() -> None:
        nonlocal calls
        calls += 1
        renewed.set()

    beat = _heartbeat.start_async(renew, 0.01)
    for _ in range(3):
        await asyncio.wait_for(renewed.wait(), DEADLINE)
        renewed.clear()
    beat.stop()
    at_stop = calls
    other = asyncio.Event()

    async def tick() -> None:
        other.set()

    witness = _heartbeat.start_async(tick, 0.01)
    for _ in range(3):  # three intervals of the witness pass
        await asyncio.wait_for(other.wait(), DEADLINE)
        other.clear()
    witness.stop()
    assert calls == at_stop


async def test_async_lease_lost_sets_lost() -> None:
    """An async renewal that raises LeaseLost sets ``lost`` and renews no more."""
    tried = asyncio.Event()
    calls = 0

    async def lose() -> None:
        nonlocal calls
        calls += 1
        tried.set()
        raise LeaseLost("taken over", namespace="ns", key="k")

    beat = _heartbeat.start_async(lose, 0.01)
    await asyncio.wait_for(tried.wait(), DEADLINE)
    other = asyncio.Event()

    async def tick() -> None:
        other.set()

    witness = _heartbeat.start_async(tick, 0.01)
    for _ in range(2):
        await asyncio.wait_for(other.wait(), DEADLINE)
        other.clear()
    witness.stop()
    assert beat.lost
    assert calls == 1
    assert beat not in _heartbeat._renewer.beats


async def test_async_renewals_do_not_overlap_before_their_deadline() -> None:
    """A slow async renewal is not started again while under way, until its deadline
    (one interval after it started); once it returns, renewals go on."""
    interval = 0.3
    entered: list[tuple[float, float | None, bool]] = []  # (when, beat.started, released)
    came, release = asyncio.Event(), asyncio.Event()
    beat: Beat | None = None

    async def slow() -> None:
        entered.append((time.monotonic(), getattr(beat, "started", None), release.is_set()))
        came.set()
        await release.wait()

    beat = _heartbeat.start_async(slow, interval)
    await asyncio.wait_for(came.wait(), DEADLINE)
    came.clear()
    other = asyncio.Event()

    async def tick() -> None:
        other.set()

    witness = _heartbeat.start_async(tick, 0.01)
    for _ in range(3):  # the witness is renewed while the slow renewal is held
        await asyncio.wait_for(other.wait(), DEADLINE)
        other.clear()
    release.set()
    while not entered[-1][2]:  # then renewals resume (one started after the release)
        await asyncio.wait_for(came.wait(), DEADLINE)
        came.clear()
    beat.stop()
    witness.stop()
    first_started = entered[0][1]
    assert first_started is not None
    for when, _, released in entered[1:]:  # any attempt beside the held one: only late
        assert released or when >= first_started + interval, entered


def test_a_beat_of_a_closed_loop_is_dropped() -> None:
    """A beat whose event loop has closed (never stopped) leaves the thread's set."""
    async def renew() -> None:
        return None

    async def leave_a_beat() -> Beat:
        return _heartbeat.start_async(renew, 0.02)

    orphan = asyncio.run(leave_a_beat())  # the loop closes with the beat live
    live = Counter()
    witness = _heartbeat.start(live, 0.02)
    try:
        assert live.wait_for(2)  # a whole pass after the orphan came due
        assert orphan not in _heartbeat._renewer.beats
    finally:
        witness.stop()
