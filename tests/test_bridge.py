"""The greenlet bridge of async handlers: pooled greenlets that keep the caller's context,
interleave, and hand errors and cancellations through the flow."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from idempotent import MemoryStore, _bridge, current_key, idempotent

tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


async def test_interleaved_deliveries_keep_their_own_context_and_key() -> None:
    """Deliveries awaiting at the same time each see their own contextvars and key, and
    their greenlets go back to the pool afterwards."""
    store = MemoryStore()
    release = asyncio.Event()

    @idempotent(store, key="id")
    async def handler(msg: dict[str, Any]) -> tuple[str, str]:
        await release.wait()  # every delivery is parked here at once
        return tenant.get(), current_key()

    async def one(i: int) -> tuple[str, str]:
        tenant.set(f"t{i}")
        return await handler({"id": f"k{i}"})

    tasks = [asyncio.ensure_future(one(i)) for i in range(20)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [(f"t{i}", f"k{i}") for i in range(20)]
    assert len(_bridge._local.pool) >= 20


async def test_errors_and_cancellation_go_through_the_flow() -> None:
    """A handler's error reaches the caller as itself; a cancelled delivery releases its
    key (the CancelledError is thrown into the flow), so a redelivery runs."""
    store = MemoryStore()
    started = asyncio.Event()
    runs: list[str] = []

    @idempotent(store, key="id")
    async def handler(msg: dict[str, Any]) -> str:
        runs.append(msg["id"])
        if msg.get("boom"):
            raise LookupError("no such account")
        if msg.get("hang"):
            started.set()
            await asyncio.Event().wait()
        return "ok"

    with pytest.raises(LookupError, match="no such account"):
        await handler({"id": "e", "boom": True})
    task = asyncio.ensure_future(handler({"id": "c", "hang": True}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(store) == 0  # both keys released
    assert await handler({"id": "c"}) == "ok"
    assert runs == ["e", "c", "c"]
