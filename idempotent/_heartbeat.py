"""Lease renewal for long handlers.

One daemon thread keeps the time of every live lease and renews each about when a third
of it is spent (starting a thread per call would cost more than the rest of the
decorator); the leases of ``async def`` handlers are renewed on their own event loop,
which the thread hands the renewal to. A renewal that finds the lease lost stops
renewing: the handler's ``complete`` will raise `LeaseLost`.

Most handlers end long before their first renewal, so registering and unregistering a
lease must be nearly free: registering appends the beat to a deque (atomic, no lock) and
stopping sets a flag; the thread moves new beats into its own list and drops stopped ones
when it wakes, and a registering caller does the same under the lock once the deque holds
`_COMPACT_AT` beats (so a long sleep never lets stopped beats pile up). The thread is never
woken by a registration, except by a lease that needs a period shorter than its own
(the shortest interval among the live leases); it renews the leases that are due, outside
the lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

from .exceptions import LeaseLost

log = logging.getLogger("idempotent")

#: The longest the idle thread sleeps between looks (its period doubles up to this while
#: no lease is live, so a process that once had a tiny lease does not keep waking fast).
_IDLE_PERIOD = 60.0
#: How many beats may wait in the deque of new ones before a registering caller moves
#: them to the thread's list itself (dropping the stopped ones).
_COMPACT_AT = 1024


class Beat:
    """One lease being kept alive: ``renew(*args)`` is called when it is due; ``stop()``
    ends it. ``lost`` is set when a renewal found the lease taken over (the beat stops by
    itself then)."""

    __slots__ = ("args", "due", "interval", "lost", "renew", "stopped")

    def __init__(
        self, renew: Callable[..., object], interval: float, renewer: _Renewer | None = None,
        args: tuple[object, ...] = (),
    ) -> None:
        # ``renewer`` is kept for callers that pass it; a stopped beat needs no renewer.
        self.renew = renew
        self.args = args
        self.interval = interval
        self.stopped = False
        self.lost = False
        self.due = time.monotonic() + interval  # when the shared thread renews it next

    def stop(self) -> None:
        """Renew no more. Never waits for the thread: a renewal already under way may
        still finish, but none starts after this returns. (Only a flag: the thread, or
        the next compaction, drops the beat from its list.)"""
        self.stopped = True

    def beat(self) -> bool:
        """Renew once; False when renewing should stop."""
        if self.stopped:
            return False
        try:
            self.renew(*self.args)
        except LeaseLost:
            self.lost = True
            return False
        except Exception:  # a store hiccup: try again at the next beat
            log.warning("idempotent: lease renewal failed; will retry", exc_info=True)
        return not self.stopped


class _Renewer:
    """The shared thread and the beats it renews: new ones in a deque that registering
    threads append to without a lock, the thread's own list of the others."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self._new: deque[Beat] = deque()
        self._live: list[Beat] = []  # under the lock; beats whose renewals ended dropped
        self.period = float("inf")  # the thread's current sleep; only add() shortens it
        self.wakeups = 0  # how many times the thread woke (for tests)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def beats(self) -> set[Beat]:
        """The beats still renewed (neither stopped nor ended by a renewal)."""
        with self.lock:
            self._absorb()
            return {b for b in self._live if not b.stopped}

    def add(self, beat: Beat) -> None:
        self._new.append(beat)  # deque.append is atomic: no lock on the common path
        if beat.interval < self.period:  # rare: the thread must wake sooner
            with self.lock:
                if beat.interval < self.period:
                    self._shorten(beat.interval)
        if len(self._new) >= _COMPACT_AT:
            with self.lock:
                self._absorb()

    def _absorb(self) -> float:
        """Move the new beats to the live list, dropping stopped ones (under the lock);
        returns the shortest interval among those moved (inf if none)."""
        new, live = self._new, self._live
        pop, shortest = new.popleft, float("inf")
        for _ in range(len(new)):  # popleft is atomic: appends may go on meanwhile
            b = pop()
            if not b.stopped:
                live.append(b)
                shortest = min(shortest, b.interval)
        return shortest

    def _shorten(self, period: float) -> None:
        """Make the thread's period ``period`` now (under the lock); start it if need be."""
        self.period = period
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="idempotent-heartbeat", daemon=True
            )
            self._thread.start()
        else:
            self._wake.set()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait(min(max(self.period, 0.001), threading.TIMEOUT_MAX))
            wake.clear()  # before the look below: a later add() wakes us again
            now = time.monotonic()
            with self.lock:
                self.wakeups += 1
                self._absorb()
                live = self._live = [b for b in self._live if not b.stopped]
                self.period = (min(b.interval for b in live) if live
                               else max(self.period, min(self.period * 2, _IDLE_PERIOD)))
                # add() appends, then compares with the period without the lock: one that
                # read the period from before the line above did not wake us, but its
                # beat is in the deque by now.
                self.period = min(self.period, self._absorb())
                if not live:
                    continue
                period = self.period
                # Renew at the wake-up nearest to each due time, so a beat is never
                # more than half a period late.
                limit = now + period / 2
                due = [b for b in live if b.due <= limit]
            for b in due:
                if b.beat():
                    b.due = now + b.interval
                else:
                    b.stopped = True  # renewing ended (lease lost, loop closed): drop it

    def _after_fork(self) -> None:
        """In a forked child the thread is gone and the live beats are the parent's."""
        self._reset()


_renewer = _Renewer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renewer._after_fork)


def start(renew: Callable[..., object], interval: float, *args: object) -> Beat:
    """Call ``renew(*args)`` every ``interval`` seconds from the shared thread until
    stopped (arguments rather than a closure: one object less per call)."""
    beat = Beat(renew, interval, None, args)
    _renewer.add(beat)
    return beat


class _AsyncBeat(Beat):
    """A lease of an ``async def`` handler. The shared thread keeps its time like any
    other beat's; when it is due, the renewal is handed to the handler's event loop (a
    timer per call on the loop would cost more than the thread's deque append)."""

    __slots__ = ("loop", "renew_async", "running")

    def __init__(
        self,
        renew: Callable[[], Awaitable[object]],
        interval: float,
        loop: asyncio.AbstractEventLoop,
        renewer: _Renewer,
    ) -> None:
        super().__init__(_nothing, interval)
        self.renew_async = renew
        self.loop = loop
        self.running = False  # a renewal is scheduled or under way on the loop

    def beat(self) -> bool:
        """On the shared thread: schedule one renewal on the loop, unless one is pending."""
        if self.stopped:
            return False
        if not self.running:
            self.running = True
            try:
                self.loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # the loop is closed: nobody is left to renew for
                return False
        return True

    def _fire(self) -> None:
        if self.stopped:
            self.running = False
            return
        task = self.loop.create_task(self._once())
        _tasks.add(task)  # keep a reference until it ends
        task.add_done_callback(_tasks.discard)

    async def _once(self) -> None:
        try:
            await self.renew_async()
        except LeaseLost:
            self.lost = True
            self.stop()
        except Exception:
            log.warning("idempotent: lease renewal failed; will retry", exc_info=True)
        finally:
            self.running = False


_tasks: set[asyncio.Task[None]] = set()


def _nothing() -> None:
    return None


def start_async(renew: Callable[[], Awaitable[object]], interval: float) -> Beat:
    """Await ``renew()`` every ``interval`` seconds on the running loop until stopped."""
    beat = _AsyncBeat(renew, interval, asyncio.get_running_loop(), _renewer)
    _renewer.add(beat)
    return beat
