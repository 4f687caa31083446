"""Lease renewal for long handlers.

One daemon thread keeps the time of every live lease of the process and, when one is due
(about when a third of it is spent), hands its renewal to a worker thread; the leases of
``async def`` handlers are renewed on their own event loop, which the thread hands the
renewal to. A renewal that finds the lease lost stops renewing: the handler's
``complete`` will raise `LeaseLost`.

**The thread never waits on a renewal.** A renewal is a network call that can hang (a
blackholed Redis socket, a stuck PostgreSQL connection); made on the scheduling thread it
would stop the renewal of every other lease, whose keys other workers would then take
over and run again. So each renewal runs on a worker, and has a deadline of one interval
(a third of the lease) after it started: one not returned by then is abandoned (it ends
when its socket times out) and another attempt starts beside it, with a warning naming
the lease. A beat's renewal is never started twice at once before that deadline. With the
lease three intervals long, a first attempt made at most half an interval late and
abandoned leaves the next one half an interval or more.

The workers are our own small pool rather than a `concurrent.futures.ThreadPoolExecutor`:
an executor has a fixed size, so enough hung calls would fill it and queue every other
renewal behind them (the stall again), and its threads are joined at interpreter exit,
where one hung call would hang the exit. Ours are daemon threads; one more starts whenever
all are busy (so hung calls never delay others; there are at most as many as renewals
under way), and an idle one ends after `_WORKER_IDLE` seconds. Only renewals use them, and
most handlers end before their first.

Most handlers end long before their first renewal, so registering and unregistering a
lease must be nearly free: registering appends the beat to a deque (atomic, no lock) and
stopping sets a flag; the thread moves new beats into its own list and drops stopped ones
when it wakes, and a registering caller does the same under the lock once the deque holds
`_COMPACT_AT` beats (so a long sleep never lets stopped beats pile up). The thread is never
woken by a registration, except by a lease that needs a period shorter than its own
(the shortest interval among the live leases); it also wakes at the deadline of a renewal
under way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

from .exceptions import LeaseLost

log = logging.getLogger("idempotent")

#: The longest the idle thread sleeps between looks (its period doubles up to this while
#: no lease is live, so a process that once had a tiny lease does not keep waking fast).
_IDLE_PERIOD = 60.0
#: How many beats may wait in the deque of new ones before a registering caller moves
#: them to the thread's list itself (dropping the stopped ones).
_COMPACT_AT = 1024
#: Seconds an idle worker thread waits for another renewal before it ends.
_WORKER_IDLE = 60.0

_STUCK = ("idempotent: lease renewal %s%r has not returned after %.3gs; "
          "trying again beside it")


class Beat:
    """One lease being kept alive: ``renew(*args)`` is called when it is due; ``stop()``
    ends it. ``lost`` is set when a renewal found the lease taken over (the beat stops by
    itself then). ``started`` is when the renewal under way began (None if none is)."""

    __slots__ = ("args", "call", "due", "interval", "lost", "renew", "started", "stopped")

    def __init__(
        self, renew: Callable[..., object], interval: float, renewer: _Renewer | None = None,
        args: tuple[object, ...] = (),
    ) -> None:
        # ``renewer`` is kept for callers that pass it; a stopped beat needs no renewer.
        self.renew = renew
        self.args = args
        self.call = (renew, args)  # read in one go by a renewal (stop() replaces it)
        self.interval = interval
        self.stopped = False
        self.lost = False
        self.started: float | None = None
        self.due = time.monotonic() + interval  # when the shared thread renews it next

    def stop(self) -> None:
        """Renew no more. Never waits: a renewal already under way may still finish, but
        none starts after this returns. The thread, or the next compaction, drops the beat
        from its list; until then it must not keep the store (and its connections) alive,
        so what the renewal would have called is forgotten here."""
        self.stopped = True
        self.call = _STOPPED
        self.renew, self.args = _nothing, ()

    def beat(self) -> bool:
        """Renew once, here; False when renewing should stop."""
        if self.stopped:
            return False
        renew, args = self.call
        try:
            renew(*args)
        except LeaseLost:
            self.lost = True
            self.stopped = True
            return False
        except Exception:  # a store hiccup: try again at the next beat
            log.warning("idempotent: lease renewal failed; will retry", exc_info=True)
        return not self.stopped


class _Workers:
    """Daemon threads that run renewals; a new one starts whenever none is idle, so a
    hung call never delays another. Idle ones end after `_WORKER_IDLE` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._idle = 0  # workers waiting for a task that none was promised yet
        self.size = 0  # workers alive

    def submit(self, task: Callable[[], object]) -> None:
        """Run ``task`` on an idle worker, or on a new one. Never blocks on a task."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # promised to one waiting worker
                self._tasks.put(task)
                return
            self.size += 1
        try:
            threading.Thread(target=self._work, args=(task,), name="idempotent-renewal",
                             daemon=True).start()
        except BaseException:
            with self._lock:
                self.size -= 1
            raise

    def _work(self, task: Callable[[], object]) -> None:
        get, lock = self._tasks.get, self._lock
        while True:
            try:
                task()
            except BaseException:  # a task catches its own errors; never lose the thread
                log.exception("idempotent: lease renewal task failed")
            with lock:
                self._idle += 1
            while True:
                try:
                    task = get(timeout=_WORKER_IDLE)
                    break
                except queue.Empty:
                    with lock:
                        if self._idle:  # no task promised to a waiting worker: end one
                            self._idle -= 1
                            self.size -= 1
                            return


class _Renewer:
    """The shared thread and the beats it renews: new ones in a deque that registering
    threads append to without a lock, the thread's own list of the others."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self._new: deque[Beat] = deque()
        self._live: list[Beat] = []  # under the lock; beats whose renewals ended dropped
        self._flying: list[Beat] = []  # under the lock; beats with a renewal on a worker
        self.period = float("inf")  # the thread's current sleep; only add() shortens it
        self.wakeups = 0  # how many times the thread woke (for tests)
        self.workers = _Workers()
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
        wake, inf = self._wake, float("inf")
        next_deadline = inf  # the earliest deadline of a renewal under way
        while True:
            sleep = min(self.period, next_deadline - time.monotonic())
            wake.wait(min(max(sleep, 0.001), threading.TIMEOUT_MAX))
            wake.clear()  # before the look below: a later add() wakes us again
            now = time.monotonic()
            send: list[tuple[Beat, float, float | None]] = []  # (beat, started, stuck for)
            on_loops: list[Beat] = []
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
                # Renewals under way past their deadline: abandon them, try again.
                flying = []
                for b in self._flying:
                    if b.stopped or b.started is None:
                        continue
                    if now >= b.started + b.interval:
                        send.append((b, now, now - b.started))
                        b.started, b.due = now, now + b.interval
                    flying.append(b)
                period = self.period
                # Renew at the wake-up nearest to each due time, so a beat is never
                # more than half a period late.
                limit = now + period / 2
                for b in live:
                    if b.due > limit:
                        continue
                    if isinstance(b, _AsyncBeat):  # its loop keeps its own deadlines
                        on_loops.append(b)
                        b.due = now + b.interval
                    elif b.started is None:  # (else under way, not past its deadline)
                        send.append((b, now, None))
                        b.started, b.due = now, now + b.interval
                        flying.append(b)
                self._flying = flying
                next_deadline = min((b.started + b.interval for b in flying
                                     if b.started is not None), default=inf)
            for b in on_loops:  # never blocks: only hands the renewal to the loop
                if not b.beat():
                    b.stopped = True  # renewing ended (the loop closed): drop it
            for b, started, stuck in send:
                try:
                    self.workers.submit(functools.partial(self._renew, b, started, stuck))
                except Exception:  # no thread to be had: the next pass tries again
                    log.warning("idempotent: could not start a lease renewal", exc_info=True)
                    with self.lock:
                        if b.started == started:
                            b.started, b.due = None, now

    def _renew(self, b: Beat, started: float, stuck: float | None) -> None:
        """On a worker: the renewal attempt of ``b`` that began at ``started``; ``stuck``
        is how long the attempt it replaces had been under way, if it replaces one."""
        try:
            if b.stopped:
                return
            if stuck is not None:
                log.warning(_STUCK, getattr(b.renew, "__qualname__", b.renew), b.args, stuck)
            b.beat()
        finally:
            with self.lock:
                if b.started == started:  # not abandoned meanwhile
                    b.started = None

    def _after_fork(self) -> None:
        """In a forked child the threads are gone and the live beats are the parent's."""
        self._reset()


_renewer = _Renewer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renewer._after_fork)


def start(renew: Callable[..., object], interval: float, *args: object) -> Beat:
    """Call ``renew(*args)`` every ``interval`` seconds, on a worker thread, until
    stopped (arguments rather than a closure: one object less per call)."""
    beat = Beat(renew, interval, None, args)
    _renewer.add(beat)
    return beat


class _AsyncBeat(Beat):
    """A lease of an ``async def`` handler. The shared thread keeps its time like any
    other beat's; when it is due, the renewal is handed to the handler's event loop (a
    timer per call on the loop would cost more than the thread's deque append). There an
    attempt that has not returned after one interval is left running and another starts
    beside it, as on the workers."""

    __slots__ = ("loop", "renew_async", "running")

    def __init__(
        self,
        renew: Callable[..., Awaitable[object]],
        interval: float,
        loop: asyncio.AbstractEventLoop,
        renewer: _Renewer | None = None,
        args: tuple[object, ...] = (),
    ) -> None:
        super().__init__(_nothing, interval, None, args)
        self.renew_async = renew
        self.call = (renew, args)
        self.loop = loop
        self.running = False  # a renewal is scheduled or under way on the loop

    def stop(self) -> None:
        super().stop()
        self.call = _STOPPED_ASYNC

    def beat(self) -> bool:
        """On the shared thread: schedule one renewal on the loop, unless one is pending
        (the loop itself retries one past its deadline)."""
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
        _keep(self.loop.create_task(self._renew_in_time()))

    async def _renew_in_time(self) -> None:
        """Renew once; an attempt not done one interval after it started is abandoned
        (left to end by itself) and another started."""
        try:
            while not self.stopped:
                started = self.started = time.monotonic()
                attempt = _keep(self.loop.create_task(self._once()))
                await asyncio.wait((attempt,), timeout=self.interval)
                if attempt.done() or self.stopped:
                    break
                log.warning(_STUCK, getattr(self.renew_async, "__qualname__",
                                            self.renew_async), self.args,
                            time.monotonic() - started)
        finally:
            self.started = None
            self.running = False

    async def _once(self) -> None:
        try:
            renew, args = self.call
            await cast("Awaitable[object]", renew(*args))
        except LeaseLost:
            self.lost = True
            self.stop()
        except Exception:
            log.warning("idempotent: lease renewal failed; will retry", exc_info=True)


_tasks: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> asyncio.Task[None]:
    """Hold a reference to ``task`` until it ends (the loop keeps only weak ones)."""
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


def _nothing() -> None:
    return None


async def _nothing_async() -> None:
    return None


#: What a stopped beat would call (nothing), so it holds no reference to a store.
_STOPPED: tuple[Callable[..., object], tuple[object, ...]] = (_nothing, ())
_STOPPED_ASYNC: tuple[Callable[..., object], tuple[object, ...]] = (_nothing_async, ())


def start_async(renew: Callable[..., Awaitable[object]], interval: float,
                *args: object) -> Beat:
    """Await ``renew(*args)`` every ``interval`` seconds on the running loop until stopped
    (arguments rather than a closure: fewer objects that outlive a short handler, which
    the garbage collector would otherwise have to walk)."""
    beat = _AsyncBeat(renew, interval, asyncio.get_running_loop(), None, args)
    _renewer.add(beat)
    return beat
