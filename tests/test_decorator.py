"""The decorator in lease mode, on the in-process store: the core semantics, no server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from idempotent import (
    AlreadyInProgress,
    IdempotencyKeyConflict,
    LeaseLost,
    MemoryStore,
    MissingIdempotencyKey,
    PreviousAttemptFailed,
    ResultNotStored,
    State,
    current,
    current_key,
    idempotent,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock)


def counting(store: MemoryStore, **options: Any) -> tuple[Callable[..., Any], list[Any]]:
    calls: list[Any] = []

    @idempotent(store, key="id", **options)
    def handler(msg: dict[str, Any]) -> dict[str, Any]:
        calls.append(msg)
        return {"charged": msg["cents"], "key": current_key()}

    return handler, calls


def test_runs_once_and_replays_the_first_result(store: MemoryStore) -> None:
    """A duplicate does not run the handler and gets the first result."""
    handler, calls = counting(store)
    first = handler({"id": "p1", "cents": 500})
    again = handler({"id": "p1", "cents": 500})
    assert first == again == {"charged": 500, "key": "p1"}
    assert len(calls) == 1
    record = store.get(handler.namespace, "p1")  # type: ignore[attr-defined]
    assert record is not None and record.state is State.COMPLETED


def test_namespace_defaults_to_module_and_qualname(store: MemoryStore) -> None:
    """Two handlers are two namespaces: the same message is processed by each once."""
    h1, calls1 = counting(store)
    h2, calls2 = counting(store, namespace="billing.charge")
    h1({"id": "p", "cents": 1})
    h2({"id": "p", "cents": 1})
    assert (len(calls1), len(calls2)) == (1, 1)
    assert h1.namespace.endswith("counting.<locals>.handler")  # type: ignore[attr-defined]
    assert h2.namespace == "billing.charge"  # type: ignore[attr-defined]


def test_missing_key_runs_nothing(store: MemoryStore) -> None:
    """No key: MissingIdempotencyKey naming the handler, nothing recorded, nothing run."""
    handler, calls = counting(store)
    with pytest.raises(MissingIdempotencyKey) as info:
        handler({"cents": 5})
    assert info.value.namespace == handler.namespace  # type: ignore[attr-defined]
    assert calls == [] and len(store) == 0


def test_same_key_other_payload_is_a_conflict(store: MemoryStore) -> None:
    """A reused key with another payload raises IdempotencyKeyConflict, never a replay."""
    handler, calls = counting(store)
    handler({"id": "p1", "cents": 500})
    with pytest.raises(IdempotencyKeyConflict) as info:
        handler({"id": "p1", "cents": 999})
    assert info.value.key == "p1"
    assert info.value.record.result == b'{"charged":500,"key":"p1"}'
    assert len(calls) == 1


def test_fingerprint_on_chosen_fields_or_off(store: MemoryStore) -> None:
    """Fingerprinting chosen fields ignores the others; False turns the check off."""
    by_field, _ = counting(store, fingerprint=["cents"], namespace="f")
    by_field({"id": "a", "cents": 1, "note": "x"})
    assert by_field({"id": "a", "cents": 1, "note": "y"})["charged"] == 1
    with pytest.raises(IdempotencyKeyConflict):
        by_field({"id": "a", "cents": 2, "note": "x"})
    unchecked, _ = counting(store, fingerprint=False, namespace="g")
    unchecked({"id": "a", "cents": 1})
    assert unchecked({"id": "a", "cents": 2})["charged"] == 1


def test_handler_error_releases_the_key(store: MemoryStore) -> None:
    """A failed handler leaves no record: the redelivery runs again."""
    attempts: list[int] = []

    @idempotent(store, key="id")
    def flaky(msg: dict[str, Any]) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("psp timeout")
        return "ok"

    with pytest.raises(ConnectionError):
        flaky({"id": "x"})
    assert len(store) == 0
    assert flaky({"id": "x"}) == "ok"
    assert flaky({"id": "x"}) == "ok"
    assert len(attempts) == 2


def test_kept_failures_are_not_retried(store: MemoryStore) -> None:
    """Errors listed in keep_failures are stored as failed; duplicates get
    PreviousAttemptFailed with the error's type and message, not the handler again."""
    calls: list[int] = []

    @idempotent(store, key="id", keep_failures=(ValueError,))
    def poison(msg: dict[str, Any]) -> None:
        calls.append(1)
        raise ValueError("card number malformed")

    with pytest.raises(ValueError):
        poison({"id": "bad"})
    with pytest.raises(PreviousAttemptFailed, match="ValueError: card number malformed") as info:
        poison({"id": "bad"})
    assert info.value.record.state is State.FAILED
    assert len(calls) == 1


def test_unserialisable_result_completes_the_key_and_duplicates_say_so(
        store: MemoryStore) -> None:
    """Lease mode: the handler returned, so its effect happened; a result JSON cannot hold
    completes the key with a marker (never a release): the handler runs once, the first
    call gets its value, every duplicate gets ResultNotStored."""
    charges: list[str] = []
    made = object()

    @idempotent(store, key="id")
    def weird(msg: dict[str, Any]) -> object:
        charges.append(msg["id"])
        return made

    assert weird({"id": "w"}) is made
    for _ in range(2):
        with pytest.raises(ResultNotStored, match="processed once") as info:
            weird({"id": "w"})
    assert charges == ["w"]
    assert info.value.key == "w"
    assert info.value.record is not None and info.value.record.state is State.COMPLETED


def test_in_progress_then_takeover_after_lease(store: MemoryStore, clock: Clock) -> None:
    """A live lease gives AlreadyInProgress with a retry hint; an expired one is taken
    over with a new token, and the stale owner's complete raises LeaseLost."""
    first = store.claim("ns", "k", fingerprint=None, lease=30)
    second = store.claim("ns", "k", fingerprint=None, lease=30)
    assert type(first).__name__ == "Claimed" and type(second).__name__ == "InProgress"

    handler_calls: list[int] = []

    @idempotent(store, key="id", namespace="ns", fingerprint=False, heartbeat=False)
    def h(msg: dict[str, Any]) -> int:
        handler_calls.append(1)
        return 7

    with pytest.raises(AlreadyInProgress) as info:
        h({"id": "k"})
    assert info.value.lease_until == clock.now + 30
    assert info.value.retry_after == pytest.approx(30)

    clock.now += 31  # the first owner's lease ran out
    assert h({"id": "k"}) == 7
    assert handler_calls == [1]
    with pytest.raises(LeaseLost):
        store.complete("ns", "k", first.token, b"999")  # type: ignore[union-attr]
    record = store.get("ns", "k")
    assert record is not None and record.result == b"7"


def test_ttl_expiry_processes_again(store: MemoryStore, clock: Clock) -> None:
    """After ttl the key is forgotten and the message is processed again."""
    handler, calls = counting(store, ttl=60)
    handler({"id": "t", "cents": 1})
    clock.now += 59
    handler({"id": "t", "cents": 1})
    clock.now += 2
    handler({"id": "t", "cents": 1})
    assert len(calls) == 2


def test_scope_separates_clients(store: MemoryStore) -> None:
    """The same key from two clients is two keys; a missing scope is a missing key."""
    seen: list[str] = []

    @idempotent(store, key="id", scope=lambda msg: msg.get("client"))
    def h(msg: dict[str, Any]) -> str:
        seen.append(msg["client"])
        return msg["client"]

    assert h({"id": "1", "client": "a"}) == "a"
    assert h({"id": "1", "client": "b"}) == "b"
    with pytest.raises(MissingIdempotencyKey):
        h({"id": "1"})
    assert seen == ["a", "b"]


def test_current_key_outside_a_handler() -> None:
    """current_key() outside a handler is a LookupError; current() is None."""
    with pytest.raises(LookupError):
        current_key()
    assert current() is None


def test_concurrent_threads_run_a_key_once(store: MemoryStore) -> None:
    """Eight threads delivering the same key: one runs, the others see it in progress or done."""
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    @idempotent(store, key="id")
    def slow(msg: dict[str, Any]) -> str:
        runs.append(1)
        started.set()
        assert release.wait(10)
        return "done"

    outcomes: list[str] = []

    def deliver() -> None:
        try:
            outcomes.append(slow({"id": "same"}))
        except AlreadyInProgress:
            outcomes.append("in_progress")

    first = threading.Thread(target=deliver)
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=deliver) for _ in range(7)]
    for t in others:
        t.start()
    for t in others:
        t.join(10)
    release.set()
    first.join(10)
    assert runs == [1]
    assert sorted(outcomes) == ["done"] + ["in_progress"] * 7
    assert slow({"id": "same"}) == "done"


def test_heartbeat_keeps_a_long_handler_s_lease(clock: Clock) -> None:
    """While a handler runs, its lease is renewed, so nobody takes the key over."""
    import time as real_time

    store = MemoryStore()  # real clock: the heartbeat thread renews in real time
    renewed = threading.Event()
    original = store._renew

    def spy(*args: Any) -> float | None:
        ok = original(*args)
        renewed.set()
        return ok

    store._renew = spy  # type: ignore[method-assign]

    @idempotent(store, key="id", lease=1.2)
    def long_one(msg: dict[str, Any]) -> str:
        assert renewed.wait(5), "the heartbeat never renewed the lease"
        deadline = real_time.monotonic() + 5
        while real_time.monotonic() < deadline:  # past the original lease of 1.2 s
            record = store.get(long_one.namespace, "L")  # type: ignore[attr-defined]
            assert record is not None and record.lease_until is not None
            if record.lease_until > record.created_at + 1.2:
                break
        other = store.claim(long_one.namespace, "L", fingerprint=None)  # type: ignore[attr-defined]
        assert type(other).__name__ == "InProgress"
        return "finished"

    assert long_one({"id": "L"}) == "finished"


async def test_async_handler(store: MemoryStore) -> None:
    """An async def handler has the same semantics."""
    calls: list[int] = []

    @idempotent(store, key="id")
    async def charge(msg: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return {"key": current_key()}

    assert await charge({"id": "a1"}) == {"key": "a1"}
    assert await charge({"id": "a1"}) == {"key": "a1"}
    assert calls == [1]
    with pytest.raises(IdempotencyKeyConflict):
        await charge({"id": "a1", "other": True})


def test_session_handlers_need_a_sql_store(store: MemoryStore) -> None:
    """A handler taking `session` on a non-transactional store is refused at decoration."""
    with pytest.raises(TypeError, match="SqlStore"):

        @idempotent(store, key="id")
        def h(msg: dict[str, Any], *, session: Any) -> None: ...


def test_a_message_passed_by_keyword_has_the_same_key_and_fingerprint(
        store: MemoryStore) -> None:
    """``charge(msg=m)`` finds the key in ``m`` as ``charge(m)`` does, and the two are the
    same delivery (same fingerprint: no conflict, one run); issue 15 item 3 (was, at
    70b75f3: MissingIdempotencyKey for the call by keyword)."""
    runs: list[str] = []

    @idempotent(store, key="payment_id")
    def charge(msg: dict[str, Any], note: str | None = None) -> str:
        runs.append(msg["payment_id"])
        return "charged"

    m = {"payment_id": "p1", "cents": 500}
    assert charge(msg=m) == "charged"
    assert charge(m) == "charged"
    assert runs == ["p1"]
    with pytest.raises(IdempotencyKeyConflict):  # a keyword the first call lacked
        charge(msg=m, note="other")
