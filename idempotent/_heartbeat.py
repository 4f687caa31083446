"""Lease renewal for long handlers.

Plain handlers share one daemon thread that renews every live lease when it is a third
spent (starting a thread per call would cost more than the rest of the decorator);
``async def`` handlers use a timer on their own event loop. A renewal that finds the
lease lost stops renewing: the handler's ``complete`` will raise `LeaseLost`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from .exceptions import LeaseLost

log = logging.getLogger("idempotent")


class Beat:
    """One lease being kept alive; ``stop()`` ends it."""

    __slots__ = ("interval", "lost", "renew", "stopped", "timer")

    def __init__(self, renew: Callable[[], object], interval: float) -> None:
        self.renew = renew
        self.interval = interval
        self.stopped = False
        self.lost = False
        self.timer: asyncio.TimerHandle | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()

    def beat(self) -> bool:
        """Renew once; False when renewing should stop."""
        if self.stopped:
            return False
        try:
            self.renew()
        except LeaseLost:
            self.lost = True
            return False
        except Exception:  # a store hiccup: try again at the next beat
            log.warning("idempotent: lease renewal failed; will retry", exc_info=True)
        return not self.stopped


class _Renewer:
    """The shared thread: a heap of (due time, beat), woken when an earlier one arrives."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Beat]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, beat: Beat) -> None:
        due = time.monotonic() + beat.interval
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), beat))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="idempotent-heartbeat", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is beat:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    if self._heap and self._heap[0][2].stopped:
                        heapq.heappop(self._heap)  # stopped beats leave without waiting
                        continue
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                _, _, beat = heapq.heappop(self._heap)
            if beat.beat():
                self.add(beat)


_renewer = _Renewer()


def start(renew: Callable[[], object], interval: float) -> Beat:
    """Call ``renew`` every ``interval`` seconds from the shared thread until stopped."""
    beat = Beat(renew, interval)
    _renewer.add(beat)
    return beat


def start_async(renew: Callable[[], Awaitable[object]], interval: float) -> Beat:
    """Await ``renew()`` every ``interval`` seconds on the running loop until stopped."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def once() -> None:
        try:
            await renew()
        except LeaseLost:
            beat.lost = True
            return
        except Exception:
            log.warning("idempotent: lease renewal failed; will retry", exc_info=True)
        if not beat.stopped:
            beat.timer = loop.call_later(interval, fire)

    def fire() -> None:
        if not beat.stopped:
            task = loop.create_task(once())
            tasks.add(task)  # keep a reference until it ends
            task.add_done_callback(tasks.discard)

    beat = Beat(lambda: None, interval)
    beat.timer = loop.call_later(interval, fire)
    return beat
