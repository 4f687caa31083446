"""Events: each path of a delivery reports what happened (claimed, duplicate, conflict,
in_progress, completed, failed, released, lease_lost, store_retry) to per-handler and
global listeners and to the ``idempotent`` logger, naming namespace and key and never
the payload; a failing listener cannot break processing; the OpenTelemetry adapter counts
the events."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import tenacity

from idempotent import (
    AlreadyInProgress,
    IdempotencyKeyConflict,
    LeaseLost,
    MemoryStore,
    PreviousAttemptFailed,
    SqlStore,
    idempotent,
    is_transient,
    transient_retry,
)
from idempotent.events import EVENTS, LISTENERS, Event, add_listener, listening, remove_listener

SECRET = "4111-1111-1111-1111"  # a payload value that must never reach a log line


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def kinds(self) -> list[tuple[str, str]]:
        return [(e.kind, e.key) for e in self.events]


@pytest.fixture(autouse=True)
def no_global_listeners() -> Iterator[None]:
    yield
    assert LISTENERS == [], "a test left a global listener behind"


def test_lease_mode_paths() -> None:
    """New key, duplicate, conflict, in-progress, released, failed: one event each, with
    namespace, key and timing."""
    rec = Recorder()
    store = MemoryStore()

    @idempotent(store, key="id", namespace="pay", listeners=[rec],
                keep_failures=(ValueError,))
    def pay(msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("boom"):
            raise (ValueError if msg["boom"] == "keep" else RuntimeError)("no")
        return {"ok": True}

    pay({"id": "a", "card": SECRET})
    pay({"id": "a", "card": SECRET})
    with pytest.raises(IdempotencyKeyConflict):
        pay({"id": "a", "card": "other"})
    store.claim("pay", "busy", fingerprint=None, lease=60)
    with pytest.raises(AlreadyInProgress):
        pay({"id": "busy"})
    with pytest.raises(RuntimeError):
        pay({"id": "r", "boom": "release"})
    with pytest.raises(ValueError):
        pay({"id": "f", "boom": "keep"})
    with pytest.raises(PreviousAttemptFailed):
        pay({"id": "f", "boom": "keep"})
    assert rec.kinds == [
        ("claimed", "a"), ("completed", "a"), ("duplicate", "a"), ("conflict", "a"),
        ("in_progress", "busy"), ("claimed", "r"), ("released", "r"), ("claimed", "f"),
        ("failed", "f"), ("duplicate", "f"),
    ]
    assert {e.namespace for e in rec.events} == {"pay"}
    assert all(e.elapsed is not None and e.elapsed >= 0 for e in rec.events)
    assert [(e.kind, e.error) for e in rec.events if e.error] == [
        ("released", "RuntimeError"), ("failed", "ValueError")]
    assert {e.kind for e in rec.events} | {"lease_lost", "store_retry",
                                           "result_not_stored"} == set(EVENTS)


def test_result_not_stored(caplog: pytest.LogCaptureFixture) -> None:
    """A lease-mode result that cannot be stored: claimed, result_not_stored (a WARNING
    naming the key), completed; the duplicate is a duplicate."""
    from idempotent import ResultNotStored

    rec = Recorder()

    @idempotent(MemoryStore(), key="id", namespace="odd", listeners=[rec])
    def odd(msg: dict[str, Any]) -> object:
        return {1j}

    with caplog.at_level("WARNING", logger="idempotent"):
        odd({"id": "k"})
    with pytest.raises(ResultNotStored):
        odd({"id": "k"})
    assert rec.kinds == [("claimed", "k"), ("result_not_stored", "k"), ("completed", "k"),
                         ("duplicate", "k")]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "result_not_stored odd/k (ResultNotSerializable)")]


def test_lease_lost() -> None:
    """A worker whose lease was taken over mid-handler reports lease_lost."""
    rec = Recorder()
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])

    @idempotent(store, key="id", namespace="slow", lease=5, heartbeat=False, listeners=[rec])
    def slow(msg: dict[str, Any]) -> None:
        now[0] += 10  # the lease runs out and another worker takes the key over
        assert type(store.claim("slow", msg["id"], fingerprint=None)).__name__ == "Claimed"

    with pytest.raises(LeaseLost):
        slow({"id": "k"})
    assert rec.kinds == [("claimed", "k"), ("lease_lost", "k")]


class FlakyStore(MemoryStore):
    """A memory store whose first ``faults`` claims fail like a dropped connection."""

    may_fail_transiently = True

    def __init__(self, faults: int) -> None:
        super().__init__()
        self.faults = faults

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        if self.faults:
            self.faults -= 1
            raise ConnectionResetError("connection dropped")
        return super().claim(*args, **kwargs)


def test_store_retry_numbers_the_attempts() -> None:
    rec = Recorder()

    @idempotent(FlakyStore(faults=2), key="id", namespace="r", listeners=[rec],
                retry=transient_retry(attempts=5, initial=0.001, max_wait=0.002))
    def handle(msg: dict[str, Any]) -> int:
        return 1

    assert handle({"id": "k"}) == 1
    retries = [e for e in rec.events if e.kind == "store_retry"]
    assert [(e.attempt, e.error) for e in retries] == [
        (1, "ConnectionResetError"), (2, "ConnectionResetError")]
    assert retries[1].elapsed is not None and retries[0].elapsed is not None
    assert retries[1].elapsed >= retries[0].elapsed
    assert rec.kinds[-2:] == [("claimed", "k"), ("completed", "k")]


def _policy(before_sleep: Any) -> tenacity.Retrying:
    return tenacity.Retrying(retry=tenacity.retry_if_exception(is_transient),
                             stop=tenacity.stop_after_attempt(5), wait=tenacity.wait_none(),
                             reraise=True, before_sleep=before_sleep)


def test_store_retry_keeps_the_policys_own_hook() -> None:
    """The policy's own before_sleep still runs, after the event is reported."""
    rec, theirs = Recorder(), []

    @idempotent(FlakyStore(faults=3), key="id", namespace="r", listeners=[rec],
                retry=_policy(lambda state: theirs.append(state.attempt_number)))
    def handle(msg: dict[str, Any]) -> int:
        return 1

    assert handle({"id": "k"}) == 1
    assert [e.attempt for e in rec.events if e.kind == "store_retry"] == [1, 2, 3]
    assert theirs == [1, 2]  # tenacity counts from the attempt it took over


async def test_store_retry_with_an_async_hook() -> None:
    """An async handler's policy may have an async before_sleep: it is awaited."""
    rec, theirs = Recorder(), []

    async def hook(state: tenacity.RetryCallState) -> None:
        theirs.append(state.attempt_number)

    @idempotent(FlakyStore(faults=2), key="id", namespace="r", listeners=[rec],
                retry=_policy(hook))
    async def handle(msg: dict[str, Any]) -> int:
        return 1

    assert await handle({"id": "k"}) == 1
    assert [e.attempt for e in rec.events if e.kind == "store_retry"] == [1, 2]
    assert theirs == [1]


def test_transactional_mode(sqlite_url: str) -> None:
    """On a SqlStore: claimed and completed commit; a raising handler is released (its
    transaction rolled back); a duplicate replays."""
    rec = Recorder()
    store = SqlStore(sqlite_url)
    store.create_schema()

    @idempotent(store, key="id", namespace="tx", listeners=[rec])
    def apply(msg: dict[str, Any], *, connection: sa.Connection) -> str:
        if msg.get("fail"):
            raise KeyError("fail")
        return "done"

    apply({"id": "a"})
    apply({"id": "a"})
    with pytest.raises(KeyError):
        apply({"id": "b", "fail": True})
    with store.engine.begin() as conn:  # the caller's own transaction
        apply({"id": "c"}, connection=conn)
    assert rec.kinds == [("claimed", "a"), ("completed", "a"), ("duplicate", "a"),
                         ("claimed", "b"), ("released", "b"), ("claimed", "c"),
                         ("completed", "c")]
    store.engine.dispose()


async def test_async_handler_reports_too() -> None:
    rec = Recorder()

    @idempotent(MemoryStore(), key="id", namespace="aio", listeners=[rec])
    async def handle(msg: dict[str, Any]) -> int:
        return 2

    assert await handle({"id": "k"}) == 2
    assert await handle({"id": "k"}) == 2
    assert rec.kinds == [("claimed", "k"), ("completed", "k"), ("duplicate", "k")]


def test_global_listeners_and_removal() -> None:
    """A global listener hears every handler until removed; a handler's own listener
    hears only that handler."""
    everyone, own = Recorder(), Recorder()
    store = MemoryStore()
    first = idempotent(store, key="id", namespace="one", listeners=[own])(lambda m: 1)
    second = idempotent(store, key="id", namespace="two")(lambda m: 2)
    with listening(everyone):
        first({"id": "x"})
        second({"id": "y"})
    second({"id": "z"})
    assert everyone.kinds == [("claimed", "x"), ("completed", "x"), ("claimed", "y"),
                              ("completed", "y")]
    assert own.kinds == [("claimed", "x"), ("completed", "x")]
    assert add_listener(everyone) is everyone
    remove_listener(everyone)
    remove_listener(everyone)  # not registered: ignored


def test_a_failing_listener_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    after = Recorder()
    store = MemoryStore()
    handle = idempotent(store, key="id", namespace="ns", listeners=[broken, after])(
        lambda m: {"v": 1})
    with caplog.at_level(logging.ERROR, logger="idempotent"):
        assert handle({"id": "k"}) == {"v": 1}
    record = store.get("ns", "k")
    assert record is not None and record.state.value == "completed"
    assert after.kinds == [("claimed", "k"), ("completed", "k")]
    failures = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(failures) == 2 and "claimed event of ns/k" in failures[0].getMessage()
    assert failures[0].exc_info is not None


def test_log_lines_name_namespace_and_key_never_the_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DEBUG for each delivery's events, WARNING for a conflict; the structured fields are
    on the record; no payload or result value appears."""
    store = MemoryStore()
    handle = idempotent(store, key="id", namespace="cards")(lambda m: {"card": m["card"]})
    with caplog.at_level(logging.DEBUG, logger="idempotent"):
        handle({"id": "k1", "card": SECRET})
        handle({"id": "k1", "card": SECRET})
        with pytest.raises(IdempotencyKeyConflict):
            handle({"id": "k1", "card": "5500-0000-0000-0004"})
    ours = [r for r in caplog.records if r.name == "idempotent"]
    assert [(r.levelname, r.getMessage().split(" (")[0]) for r in ours] == [
        ("DEBUG", "claimed cards/k1"), ("DEBUG", "completed cards/k1"),
        ("DEBUG", "duplicate cards/k1"), ("WARNING", "conflict cards/k1"),
    ]
    fields = [vars(r) for r in ours]
    assert [f["idempotent_event"] for f in fields] == [
        "claimed", "completed", "duplicate", "conflict"]
    assert {(f["idempotent_namespace"], f["idempotent_key"]) for f in fields} == {("cards", "k1")}
    assert not any(SECRET in r.getMessage() or "5500" in r.getMessage() for r in ours)


def test_opentelemetry_adapter_counts_events() -> None:
    """The counter has one series per (namespace, event); handler durations go to a
    histogram."""
    from idempotent.integrations.opentelemetry import instrument, uninstrument
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    listener = instrument(MeterProvider(metric_readers=[reader]), claim_duration=True)
    try:
        store = MemoryStore()
        ok = idempotent(store, key="id", namespace="pay")(lambda m: 1)

        @idempotent(store, key="id", namespace="mail")
        def fail(m: dict[str, Any]) -> None:
            raise OSError("smtp down")

        for i in range(3):
            ok({"id": i})
        ok({"id": 0})
        with pytest.raises(OSError):
            fail({"id": 9})
    finally:
        uninstrument(listener)
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics}
    counts = {
        tuple(sorted(dict(p.attributes or {}).items())): p.value
        for p in metrics["idempotent.events"].data.data_points
    }
    assert counts == {
        (("event", "claimed"), ("namespace", "pay")): 3,
        (("event", "completed"), ("namespace", "pay")): 3,
        (("event", "duplicate"), ("namespace", "pay")): 1,
        (("event", "claimed"), ("namespace", "mail")): 1,
        (("error.type", "OSError"), ("event", "released"), ("namespace", "mail")): 1,
    }
    durations = {dict(p.attributes or {})["event"]: p.count
                 for p in metrics["idempotent.handler.duration"].data.data_points}
    assert durations == {"completed": 3, "released": 1}
    claims = sum(p.count for p in metrics["idempotent.claim.duration"].data.data_points)
    assert claims == 5


def test_opentelemetry_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without opentelemetry-api the import error says which extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "idempotent.integrations.opentelemetry", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'idempotent-py\[otel\]'"):
        import idempotent.integrations.opentelemetry  # noqa: F401


def test_opentelemetry_claim_duration_is_opt_in() -> None:
    from idempotent.integrations.opentelemetry import MetricsListener
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    listener = MetricsListener(MeterProvider(metric_readers=[reader]))
    idempotent(MemoryStore(), key="id", namespace="n", listeners=[listener])(lambda m: 1)(
        {"id": 1})
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert names == {"idempotent.events", "idempotent.handler.duration"}
