"""The transactional outbox (idempotent.outbox) on SQLite and a real PostgreSQL.

The publisher here is an in-process recorder (a broker stand-in, as a fake store is for
the core's unit tests); tests/test_outbox_celery.py publishes to a real redis-server broker
and real Celery workers, and SIGKILLs producers and relays.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from idempotent import IdempotencyKeyConflict, SqlStore, idempotent
from idempotent.events import OUTBOX_EVENTS, Event
from idempotent.outbox import Entry, MessageNotSerializable, Outbox, RelayReport, UnknownPublisher

LEDGER = sa.Table("ledger", sa.MetaData(), sa.Column("payment_id", sa.String(64), primary_key=True),
                  sa.Column("cents", sa.Integer, nullable=False))
ORDERS = sa.Table("orders", sa.MetaData(), sa.Column("id", sa.String(64), primary_key=True))


class Recorder:
    """Records every publish; ``fail`` makes the next publishes raise ConnectionError."""

    name = "rec"

    def __init__(self) -> None:
        self.sent: list[Entry] = []
        self.fail = 0
        self.lock = threading.Lock()

    def publish(self, entry: Entry) -> None:
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise ConnectionError("broker down")
            self.sent.append(entry)

    def ids(self) -> Counter[str]:
        with self.lock:
            return Counter(e.id for e in self.sent)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


_BOXES: list[Outbox] = []


@pytest.fixture
def store(sql_url: str) -> Iterator[SqlStore]:
    s = SqlStore(sql_url)
    yield s
    while _BOXES:
        _BOXES.pop().close()
    s.engine.dispose()


def make(store: SqlStore, **kw: Any) -> tuple[Outbox, Recorder, Clock, list[Event]]:
    rec, clock, events = Recorder(), Clock(), []
    box = Outbox(store, [rec], clock=clock, listeners=[events.append], **kw)
    _BOXES.append(box)
    store.create_schema()
    ORDERS.create(store.engine, checkfirst=True)
    return box, rec, clock, events


def rows(store: SqlStore) -> dict[str, str]:
    """Each entry's state, once the marks of the immediate publishes are written."""
    for box in _BOXES:
        assert box.flush(30)
    t = store.metadata.tables["idempotency_outbox"]
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(t.c.id, t.c.state)).all())  # type: ignore[arg-type]


def test_session_commit_publishes_at_once(store: SqlStore) -> None:
    box, rec, _, events = make(store)
    with Session(store.engine) as s, s.begin():
        s.execute(ORDERS.insert().values(id="o1"))
        box.stage(s, publisher="rec", target="orders.created", body={"order": "o1"}, id="m1")
        assert rec.sent == []  # nothing before COMMIT
    assert [(e.id, e.body) for e in rec.sent] == [("m1", {"order": "o1"})]
    assert rows(store) == {"m1": "sent"}  # no confirmation asked for: done
    assert [e.kind for e in events] == ["outbox_published"]


def test_rollback_after_staging_publishes_nothing_ever(store: SqlStore) -> None:
    box, rec, clock, _ = make(store)
    with Session(store.engine) as s:
        with s.begin():
            box.stage(s, publisher="rec", target="t", body={}, id="m1")
            s.rollback()
        with s.begin():  # the session goes on: the rolled-back id is forgotten
            box.stage(s, publisher="rec", target="t", body={}, id="m2")
    assert box.flush(30)  # the immediate publish's mark is written
    clock.now += 3600
    assert box.relay_once().published == 0
    assert rec.ids() == Counter({"m2": 1}) and rows(store) == {"m2": "sent"}


def test_a_savepoint_rolled_back_publishes_nothing_of_it(store: SqlStore) -> None:
    """Entries staged in a SAVEPOINT that rolled back are not published when the rest of
    the transaction commits (Session and Connection)."""
    box, rec, clock, _ = make(store)
    with Session(store.engine) as s, s.begin():
        box.stage(s, publisher="rec", target="t", body={}, id="kept-1")
        sp = s.begin_nested()
        box.stage(s, publisher="rec", target="t", body={}, id="gone-1")
        sp.rollback()
        with s.begin_nested():  # a savepoint that is released: its entry is published
            box.stage(s, publisher="rec", target="t", body={}, id="kept-2")
    with box.begin() as conn:
        sp2 = conn.begin_nested()
        box.stage(conn, publisher="rec", target="t", body={}, id="gone-2")
        sp2.rollback()
        box.stage(conn, publisher="rec", target="t", body={}, id="kept-3")
    with Session(store.engine) as s:  # a released SAVEPOINT is not a commit
        s.begin()
        # (a write first: pysqlite sends no BEGIN before one, and a SAVEPOINT outside a
        # transaction is a transaction of its own on SQLite, which its RELEASE commits)
        s.execute(ORDERS.insert().values(id="o-never"))
        with s.begin_nested():
            box.stage(s, publisher="rec", target="t", body={}, id="never")
        assert rec.ids()["never"] == 0
        s.rollback()
    assert rows(store) == {"kept-1": "sent", "kept-2": "sent", "kept-3": "sent"}
    clock.now += 3600
    assert box.relay_once().published == 0
    assert rec.ids() == Counter({"kept-1": 1, "kept-2": 1, "kept-3": 1})


def test_a_rolled_back_connection_leaves_nothing_for_the_next_commit(store: SqlStore) -> None:
    """What a rolled-back transaction staged stays in the pooled connection's info; a
    later transaction on that connection that commits must not publish it."""
    box, rec, _, _ = make(store)
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        box.stage(conn, publisher="rec", target="t", body={}, id="rolled-back")
        raise RuntimeError("the producer's transaction fails")
    with box.begin() as conn:  # the pool hands out the same connection again
        box.stage(conn, publisher="rec", target="t", body={}, id="committed")
    with store.engine.connect() as conn:
        with conn.begin():
            pass
        assert box.publish_staged(conn) == 0
    assert rec.ids() == Counter({"committed": 1})
    assert rows(store) == {"committed": "sent"}


def test_connection_begin_and_publish_staged(store: SqlStore) -> None:
    box, rec, _, _ = make(store)
    with box.begin() as conn:
        box.stage(conn, publisher="rec", target="t", body=[1], id="a")
    assert rec.ids() == Counter({"a": 1})
    with store.engine.connect() as conn:
        with conn.begin():
            box.stage(conn, publisher="rec", target="t", body=[2], id="b")
        assert rec.ids()["b"] == 0
        assert box.publish_staged(conn) == 1
    assert rec.ids() == Counter({"a": 1, "b": 1})


def test_committed_but_unpublished_is_published_by_the_relay(store: SqlStore) -> None:
    """The producer's immediate publish fails (or the process died after COMMIT): the
    entry stays pending, and a relay publishes it once its grace has passed."""
    box, rec, clock, events = make(store, grace=5)
    rec.fail = 1
    with Session(store.engine) as s, s.begin():
        box.stage(s, publisher="rec", target="t", body={}, id="m1")
    assert rec.sent == [] and rows(store) == {"m1": "pending"}
    entry = box.get("m1")
    assert entry is not None and entry.last_error == "ConnectionError: broker down"
    assert box.relay_once().published == 0  # not due yet
    clock.now += 1 * 1.1 + 0.01
    assert box.relay_once().published == 1
    assert rec.ids() == Counter({"m1": 1}) and rows(store) == {"m1": "sent"}
    assert [e.kind for e in events] == ["outbox_publish_failed", "outbox_published"]


def test_bad_input_is_refused_at_staging_and_stages_nothing(store: SqlStore) -> None:
    box, rec, _, _ = make(store)
    with Session(store.engine) as s, s.begin():
        with pytest.raises(MessageNotSerializable) as bad:
            box.stage(s, publisher="rec", target="t", body={"x": object()}, id="m1")
        assert bad.value.key == "m1" and "JSON" in str(bad.value)
        with pytest.raises(UnknownPublisher) as unknown:
            box.stage(s, publisher="kafka", target="t", body={}, id="m2")
        assert "'kafka'" in str(unknown.value) and "rec" in str(unknown.value)
        with pytest.raises(MessageNotSerializable):  # JSON has no NaN
            box.stage(s, publisher="rec", target="t", body={"f": float("nan")}, id="m3")
        with pytest.raises(TypeError):
            box.stage(s, publisher="rec", target="t", body={}, id="")
        box.stage(s, publisher="rec", target="t", body={"ok": 1}, id="m4")
    assert rows(store) == {"m4": "sent"} and rec.ids() == Counter({"m4": 1})


def test_same_id_staged_twice(store: SqlStore) -> None:
    box, rec, _, _ = make(store)
    with Session(store.engine) as s, s.begin():
        box.stage(s, publisher="rec", target="t", body={"cents": 5}, id="m1")
        box.stage(s, publisher="rec", target="t", body={"cents": 5}, id="m1")  # one entry
        with pytest.raises(IdempotencyKeyConflict):
            box.stage(s, publisher="rec", target="t", body={"cents": 6}, id="m1")
    assert rec.ids() == Counter({"m1": 1})


def test_confirmation_republish_and_unconfirmed_report(store: SqlStore) -> None:
    """An entry whose consumer record never appears is re-published with backoff, a
    bounded number of times, then reported as unconfirmed and kept; one whose record
    appears is confirmed and never published again."""
    box, rec, clock, events = make(store, confirm_after=10, max_publishes=3)
    clock.now = 2_000_000.0
    with Session(store.engine) as s, s.begin():
        box.stage(s, publisher="rec", target="t", body={}, id="lost", confirm=("pay", "k-lost"))
        box.stage(s, publisher="rec", target="t", body={}, id="ok", confirm=("pay", "k-ok"))
    assert rec.ids() == Counter({"lost": 1, "ok": 1})
    # published at once, and not marked: the relay's first look, confirm_after later,
    # tells from the consumer's record whether it arrived
    assert rows(store) == {"lost": "pending", "ok": "pending"}
    claimed = store.claim("pay", "k-ok", fingerprint=None)
    store.complete("pay", "k-ok", claimed.token, b"{}")  # type: ignore[union-attr]

    clock.now += 5
    assert box.relay_once() == RelayReport()  # not due yet
    clock.now += 10 * 1.1  # the first look
    report = box.relay_once()
    assert (report.confirmed, report.published) == (1, 1)
    clock.now += 5  # 10 s after that publish at the earliest: not due yet
    assert box.relay_once() == RelayReport()
    clock.now += 6 * 1.1
    assert box.relay_once().republished == 1
    clock.now += 20 * 1.1  # the backoff doubled
    assert box.relay_once().republished == 1
    clock.now += 40 * 1.1
    report = box.relay_once()
    assert (report.republished, report.unconfirmed) == (0, 1)  # 3 relay publishes: bound
    assert rec.ids() == Counter({"lost": 4, "ok": 1})
    assert rows(store) == {"lost": "unconfirmed", "ok": "confirmed"}
    assert box.stats().counts == {"unconfirmed": 1, "confirmed": 1}
    clock.now += 10**6
    assert box.relay_once() == RelayReport()  # kept, never dropped, nothing more to do
    assert box.purge(older_than=0) == 1 and rows(store) == {"lost": "unconfirmed"}
    kinds = Counter(e.kind for e in events)
    assert kinds == {"outbox_published": 3, "outbox_confirmed": 1, "outbox_republished": 2,
                     "outbox_unconfirmed": 1}
    assert set(kinds) <= set(OUTBOX_EVENTS)


def test_publisher_down_retries_with_backoff(store: SqlStore) -> None:
    box, rec, clock, _ = make(store, grace=0, confirm_after=1)
    rec.fail = 10**6
    with Session(store.engine) as s, s.begin():
        box.stage(s, publisher="rec", target="t", body={}, id="m1")
    assert box.flush(30)  # the failed immediate publish is marked
    for _ in range(5):
        clock.now += 3600
        assert box.relay_once().failed == 1
    assert rows(store) == {"m1": "pending"}  # retried, never lost, never marked done
    rec.fail = 0
    clock.now += 3600
    assert box.relay_once().published == 1 and rows(store) == {"m1": "sent"}


def test_consume_write_produce_commits_together(store: SqlStore) -> None:
    """A transactional handler stages its outgoing message on its own connection: the
    records row, the ledger row and the outbox entry commit together, or not at all."""
    box, rec, clock, _ = make(store, grace=0)
    LEDGER.create(store.engine, checkfirst=True)
    crash = {"on": True}

    @idempotent(store, key="payment_id", namespace="pay")
    def apply(msg: dict, *, connection: sa.Connection) -> str:
        connection.execute(LEDGER.insert().values(payment_id=msg["payment_id"],
                                                  cents=msg["cents"]))
        box.stage(connection, publisher="rec", target="receipts", body=msg,
                  id=f"receipt-{msg['payment_id']}")
        if crash["on"]:
            raise RuntimeError("crash before commit")
        return "ok"

    with pytest.raises(RuntimeError):
        apply({"payment_id": "p1", "cents": 5})
    assert rows(store) == {} and store.get("pay", "p1") is None
    crash["on"] = False
    assert apply({"payment_id": "p1", "cents": 5}) == "ok"
    assert rec.ids() == Counter({"receipt-p1": 1})  # published right after our COMMIT
    assert apply({"payment_id": "p1", "cents": 5}) == "ok"  # duplicate: nothing staged
    assert box.flush(30)
    clock.now += 1
    assert box.relay_once().published == 0
    assert rec.ids() == Counter({"receipt-p1": 1}) and rows(store) == {"receipt-p1": "sent"}


@pytest.mark.parametrize("sql_url", ["postgres"], indirect=True)
def test_three_relays_in_parallel_over_10000_entries(store: SqlStore) -> None:
    """Three relays at once (SKIP LOCKED) over 10,000 committed, unpublished entries:
    every entry is published at least once; a consumer keyed by the message id applies
    each once."""
    box, _, clock, _ = make(store, grace=0)
    LEDGER.create(store.engine, checkfirst=True)

    @idempotent(store, key="id", namespace="consumer", fingerprint=False)
    def consume(entry: dict, *, connection: sa.Connection) -> None:
        connection.execute(LEDGER.insert().values(payment_id=entry["id"], cents=entry["cents"]))

    class Applier:
        name = "rec"

        def __init__(self) -> None:
            self.count: Counter[str] = Counter()
            self.lock = threading.Lock()

        def publish(self, entry: Entry) -> None:
            with self.lock:
                self.count[entry.id] += 1
            consume({"id": entry.id, "cents": entry.body["cents"]})

    applier = Applier()
    box.publishers["rec"] = applier
    n = 10_000
    t = box.table
    with store.engine.begin() as conn:  # staged and committed; the producer died
        conn.execute(t.insert(), [
            {"id": f"m{i:05d}", "publisher": "rec", "target": "t",
             "body": b'{"cents":%d}' % i, "state": "pending", "publishes": 0, "failures": 0,
             "created_at": clock.now, "next_at": clock.now} for i in range(n)])
    clock.now += 1
    stop = threading.Event()
    relays = [threading.Thread(target=box.run_relay, kwargs={"interval": 0.05, "stop": stop,
                                                             "batch": 200}) for _ in range(3)]
    for r in relays:
        r.start()
    try:
        from _celery_harness import wait_until

        wait_until(lambda: box.stats().counts == {"sent": n}, 240, "every entry published",
                   describe=lambda: str(box.stats().counts))
    finally:
        stop.set()
        for r in relays:
            r.join(60)
    assert len(applier.count) == n and min(applier.count.values()) >= 1
    with store.engine.connect() as conn:
        count, total = conn.execute(sa.select(sa.func.count(), sa.func.sum(LEDGER.c.cents))).one()
    assert (count, total) == (n, sum(range(n)))
    # SKIP LOCKED: the three relays never published the same entry twice
    assert sum(applier.count.values()) == n
