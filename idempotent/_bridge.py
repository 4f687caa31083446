"""How an ``async def`` handler runs the one (synchronous) delivery flow.

The flow, and the stores under it, are plain synchronous code that awaits what must be
awaited (the handler's coroutine, an asyncio driver's I/O) with SQLAlchemy's
``await_only``; so they run in a greenlet whose parent, the event loop's, does the
awaiting. That is SQLAlchemy's ``greenlet_spawn`` protocol, and `run` speaks it, with one
difference: ``greenlet_spawn`` makes a new greenlet per call, which costs about 6 µs here
(greenlet 3), more than the rest of a delivery on an in-process store, while switching into
a greenlet that waits for work costs about 0.5 µs. So `run` takes a parked greenlet from a
per-thread pool, and parks it again when the call is done.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent, greenlet  # type: ignore[import-untyped]

#: Parked greenlets kept per thread; more concurrent deliveries than this make new ones.
_POOL_SIZE = 256


class _Done:
    """What a worker greenlet hands back when its call ended (never an awaitable)."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error


class _Worker(greenlet):  # type: ignore[misc]  # greenlet ships no types for subclassing
    """A greenlet that runs one call per switch into it, and waits for the next."""

    # SQLAlchemy's await_only works in a greenlet that says it provides the protocol
    __sqlalchemy_greenlet_provider__ = True

    def __init__(self) -> None:
        super().__init__(self._serve)

    def _serve(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        while True:
            try:
                done = _Done(fn(*args), None)
            except BaseException as exc:  # handed to the awaiting caller to raise
                done = _Done(None, exc)
            fn = args = None  # type: ignore[assignment]  # hold nothing while parked
            # a GreenletExit thrown in here, while parked (the greenlet is collected),
            # ends the greenlet; one raised by the call itself went to its caller above
            fn, args = self.parent.switch(done)


_local = threading.local()


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a greenlet, awaiting each awaitable it passes to ``await_only``,
    in the caller's context (its contextvars); returns its result or raises its error."""
    pool: list[_Worker] | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = []
    worker = pool.pop() if pool else _Worker()
    here = getcurrent()
    worker.parent = here
    worker.gr_context = here.gr_context
    result = worker.switch(fn, args)
    while type(result) is not _Done:
        try:
            value = await result
        except BaseException:  # into the flow, where it is raised by await_only
            result = worker.throw(*sys.exc_info())
        else:
            result = worker.switch(value)
    worker.gr_context = None
    if len(pool) < _POOL_SIZE:
        pool.append(worker)
    if result.error is not None:
        error, result.error = result.error, None
        raise error
    return result.value
