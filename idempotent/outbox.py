"""The transactional outbox: messages staged in the caller's own transaction and published
after it commits, so a producer that dies after COMMIT loses nothing and one whose
transaction rolls back sends nothing.

A message is a row of the outbox table (``idempotency_outbox``, in the `SqlStore`'s
database), written by `Outbox.stage` on the caller's `Session` or `Connection`, so the
row commits or vanishes with the caller's writes. After the commit:

* the committing process publishes it at once: a `Session` does so by itself (its
  ``after_commit`` event), a `Connection` when the caller runs `Outbox.begin` or calls
  `Outbox.publish_staged`;
* whatever a crash left behind (staged and committed, never published) is published by a
  **relay** (`Outbox.relay_once`, `Outbox.run_relay`, the ``idempotent relay`` command);
  several relays may run at once: each picks its entries with ``FOR UPDATE SKIP LOCKED``
  on PostgreSQL.

Every message carries a deterministic id (the Celery task id, a message id): a relay that
dies after publishing and before marking the entry publishes it again, and the consumer
drops the duplicate by that id.

**End-to-end confirmation.** An entry staged with ``confirm=(namespace, key)`` counts as
delivered once the consumer's record of that key exists (completed, or failed and kept),
in this store's records table or in ``confirm_store``. Until then the relay re-publishes it
``confirm_after`` seconds after each publish, doubling up to ``backoff_max``, at most
``max_publishes`` times in all; an entry still unconfirmed after that is marked
``unconfirmed``, reported by `Outbox.stats`, ``idempotent stats`` and the
``outbox_unconfirmed`` event (a WARNING log line), and never dropped. An entry staged
without ``confirm`` is done once published.

Entry states: ``pending`` (staged, not yet published), ``published`` (waiting for its
confirmation), ``confirmed``, ``unconfirmed`` (gave up re-publishing; needs a human), and
``sent`` (published, no confirmation asked for).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from ._keys import check_text
from .events import Event, Listener, emit
from .exceptions import IdempotencyError, IdempotencyKeyConflict
from .stores.base import Store
from .stores.sql import SqlStore

__all__ = [
    "Entry",
    "MessageNotSerializable",
    "Outbox",
    "OutboxStats",
    "Publisher",
    "RelayReport",
    "UnknownPublisher",
]

log = logging.getLogger("idempotent.outbox")

_STAGED = "idempotent.outbox.staged"
_LISTENING = "idempotent.outbox.listening"
#: states the relay still has work for
_OPEN = ("pending", "published")
MAX_ERROR = 500


class MessageNotSerializable(IdempotencyError, TypeError):
    """The message cannot be encoded as JSON; nothing was staged."""


class UnknownPublisher(IdempotencyError, LookupError):
    """The message names a publisher this outbox does not have; nothing was staged."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One staged message, as the relay and the publishers see it."""

    id: str
    publisher: str
    target: str
    body: Any
    state: str
    publishes: int
    failures: int
    confirm_namespace: str | None
    confirm_key: str | None
    created_at: float
    next_at: float | None
    last_error: str | None


class Publisher(Protocol):
    """Sends one entry to its broker. ``name`` is what `Outbox.stage` names it by;
    ``publish`` raises when the broker did not take the message (the entry is then
    retried), and must give the message ``entry.id`` as its broker-level id."""

    name: str

    def publish(self, entry: Entry) -> None: ...


@dataclass(frozen=True, slots=True)
class RelayReport:
    """What one relay pass did."""

    published: int = 0
    republished: int = 0
    confirmed: int = 0
    unconfirmed: int = 0
    failed: int = 0

    def __add__(self, other: RelayReport) -> RelayReport:
        return RelayReport(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))


def _fields(report: RelayReport) -> tuple[int, ...]:
    return (report.published, report.republished, report.confirmed, report.unconfirmed,
            report.failed)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Entries per state, and the oldest entry still waiting to be published."""

    counts: dict[str, int]
    oldest_pending: Entry | None


class Outbox:
    """Stage messages in a transaction of ``store``'s database; publish them after COMMIT.

    * ``publishers``: the `Publisher` objects, by their ``name``;
    * ``confirm_store``: where the consumers' records are (default: ``store`` itself);
    * ``grace``: seconds after staging before a relay publishes an entry the committing
      process has not (it normally publishes within milliseconds of its commit);
    * ``confirm_after`` / ``backoff_max``: seconds from a publish to the first re-check of
      its confirmation, doubling with each re-publish up to ``backoff_max``;
    * ``max_publishes``: publishes of one entry in all before it is marked ``unconfirmed``;
    * ``retry_after`` / ``retry_max``: seconds before a publish that failed (the broker is
      down) is tried again, doubling with each failure up to ``retry_max``;
    * ``listeners``: callables that get the outbox's `Event` objects (``outbox_published``,
      ``outbox_republished``, ``outbox_confirmed``, ``outbox_publish_failed``,
      ``outbox_unconfirmed``; ``namespace`` is the publisher and target, ``key`` the id).
    """

    def __init__(
        self,
        store: SqlStore,
        publishers: Iterable[Publisher],
        *,
        confirm_store: Store | None = None,
        grace: float = 5.0,
        confirm_after: float = 60.0,
        backoff_max: float = 3600.0,
        max_publishes: int = 10,
        retry_after: float = 1.0,
        retry_max: float = 60.0,
        listeners: Iterable[Listener] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(store, SqlStore):
            raise TypeError("the outbox lives in a SqlStore's database (the caller's transaction)")
        if store.is_async:
            raise TypeError("the outbox needs a sync engine")
        if max_publishes < 1:
            raise ValueError("max_publishes must be at least 1")
        for name, value in (("grace", grace), ("confirm_after", confirm_after),
                            ("backoff_max", backoff_max), ("retry_after", retry_after),
                            ("retry_max", retry_max)):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        self.store = store
        self.table: sa.Table = store.outbox
        self.publishers: dict[str, Publisher] = {p.name: p for p in publishers}
        self.confirm_store: Store = confirm_store if confirm_store is not None else store
        self.grace, self.confirm_after, self.backoff_max = grace, confirm_after, backoff_max
        self.max_publishes = max_publishes
        self.retry_after, self.retry_max = retry_after, retry_max
        self._listeners = tuple(listeners)
        self._clock = clock
        self._skip_locked = store.dialect == "postgresql"
        self._insert_or_nothing: Any = None
        if store.dialect in ("postgresql", "sqlite"):
            from sqlalchemy.dialects import postgresql, sqlite

            dialect_insert = (postgresql.insert if store.dialect == "postgresql"
                              else sqlite.insert)
            self._insert_or_nothing = dialect_insert(self.table).on_conflict_do_nothing(
                index_elements=["id"]).returning(self.table.c.id)
        self._marker = _Marker(self)

    # -- staging -----------------------------------------------------------------------
    def stage(
        self,
        tx: Session | sa.Connection,
        *,
        publisher: str,
        target: str,
        body: Any,
        id: str,
        confirm: tuple[str, str] | None = None,
    ) -> str:
        """Write one message into the outbox in ``tx``'s transaction; returns its id.

        Never commits. The message is published after ``tx`` commits and never if it rolls
        back. ``body`` must be JSON (`MessageNotSerializable` otherwise); ``publisher`` must
        be one of this outbox's (`UnknownPublisher`). Staging the same ``id`` twice with
        the same message is one entry; with another message it raises
        `idempotent.IdempotencyKeyConflict`.
        """
        if publisher not in self.publishers:
            raise UnknownPublisher(
                f"no publisher {publisher!r} in this outbox (it has "
                f"{sorted(self.publishers) or 'none'}); nothing was staged", key=id)
        for what, text in (("message id", id), ("target", target)):
            if not isinstance(text, str) or not text:
                raise TypeError(f"the {what} must be a non-empty str")
            check_text("key", text)
        if len(id) > 200:
            raise ValueError("a message id is at most 200 characters")
        if confirm is not None:
            namespace, key = confirm
            check_text("namespace", namespace)
            check_text("key", key)
        try:
            encoded = json.dumps(body, sort_keys=True, separators=(",", ":"),
                                 allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise MessageNotSerializable(
                f"the message {id!r} for {publisher}:{target} cannot be encoded as JSON "
                f"({exc}); nothing was staged", key=id) from exc
        conn = tx.connection() if isinstance(tx, Session) else tx
        now = self._clock()
        row = {
            "id": id, "publisher": publisher, "target": target, "body": encoded,
            "state": "pending", "publishes": 0, "failures": 0,
            "confirm_namespace": confirm[0] if confirm else None,
            "confirm_key": confirm[1] if confirm else None,
            # an entry its consumer confirms needs no mark after its immediate publish: the
            # relay first looks at it ``confirm_after`` later, and publishes it only if
            # its record is not there (another publish: the first may have been lost)
            "created_at": now, "next_at": now + (self.confirm_after if confirm else self.grace),
        }
        t = self.table
        if self._insert_or_nothing is not None:
            inserted = conn.execute(self._insert_or_nothing, row).first() is not None
        else:
            inserted = conn.execute(sa.select(t.c.id).where(t.c.id == id)).first() is None
            if inserted:
                conn.execute(t.insert(), row)
        if not inserted:
            existing = conn.execute(
                sa.select(t.c.publisher, t.c.target, t.c.body).where(t.c.id == id)).one()
            if tuple(existing) != (publisher, target, encoded):
                raise IdempotencyKeyConflict(
                    f"the message id {id!r} is already staged with another message; nothing "
                    "was staged", namespace=f"outbox:{publisher}", key=id)
            return id  # the same message staged again: one entry
        # staged inside a SAVEPOINT: that savepoint may roll back while the transaction
        # commits, so the publish after COMMIT reads whether the entry is there
        nested = tx.in_nested_transaction()
        self._remember(tx, _Staged(self, id, publisher, target, body, confirm is not None,
                                   nested, tx.get_transaction()))
        return id

    def _remember(self, tx: Session | sa.Connection, staged: _Staged) -> None:
        info = tx.info
        if isinstance(tx, Session) and not info.get(_LISTENING):
            # once per session: publish what each commit made durable; forget what a
            # rollback of the outermost transaction took away
            sa_event.listen(tx, "after_commit", self._after_session_commit)
            sa_event.listen(tx, "after_soft_rollback", _forget_staged)
            info[_LISTENING] = True
        info.setdefault(_STAGED, []).append(staged)

    def _after_session_commit(self, session: Session) -> None:
        if session.in_nested_transaction():  # a SAVEPOINT was released: not yet durable
            return
        staged = session.info.pop(_STAGED, None)
        if staged:  # a rollback of the outermost transaction forgot what it staged
            _publish_all(staged, committed=None, trust=True)

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """``engine.begin()`` that publishes what was staged in it once it has committed."""
        with self.store.engine.connect() as conn:
            with conn.begin() as root:
                yield conn
            staged = conn.info.pop(_STAGED, None)
        if staged:
            _publish_all(staged, committed=root)

    def publish_staged(self, conn: sa.Connection) -> int:
        """Publish what was staged on ``conn`` since the last call, after its commit.
        Entries whose transaction rolled back are not in the table and are skipped."""
        staged = conn.info.pop(_STAGED, None)
        return _publish_all(staged, committed=None) if staged else 0

    def _publish_after_commit(self, staged: Sequence[_Staged], *, committed: Any = None,
                              trust: bool = False) -> int:
        """The committing process's immediate publish, marked by a background thread in
        batches. An entry is published unread only when it was staged, outside any
        SAVEPOINT, in the transaction known to have just committed (``committed``, or
        ``trust``: a Session's, whose rollbacks forget what they staged); any other (staged
        in a SAVEPOINT that may have rolled back, left on a pooled connection by a
        transaction that rolled back, or a caller that only says it committed) is read
        first, and published only if it is in the table. A failure is logged, never
        raised: the caller's transaction has committed, and the relay retries the entry."""
        t = self.table
        staged = list({e.id: e for e in staged}.values())  # an id staged twice: one publish
        known = [e for e in staged if not e.nested and (trust or (
            committed is not None and e.root is committed))]
        there = {e.id for e in known}
        check = [e.id for e in staged if e.id not in there]
        if check:
            try:
                with self.store._autocommit.connect() as conn:
                    there.update(r[0] for r in conn.execute(sa.select(t.c.id).where(
                        t.c.id.in_(check), t.c.state == "pending")))
            except Exception:
                log.warning("could not read %d staged message(s) after commit; the relay "
                            "will publish them", len(check), exc_info=True)
        published = 0
        for item in staged:
            if item.id not in there:
                continue
            entry = item.entry()
            try:
                self.publishers[item.publisher].publish(entry)
            except Exception as exc:
                log.warning("publishing %s (%s:%s) after commit failed (%s: %s); the relay "
                            "will publish it", item.id, item.publisher, item.target,
                            type(exc).__name__, exc)
                self._marker.put((item.id, f"{type(exc).__name__}: {exc}"[:MAX_ERROR]))
                self._event("outbox_publish_failed", entry, error=type(exc).__name__)
                continue
            published += 1
            if not item.confirm:  # else: no write at all on the producer's path
                self._marker.put((item.id, None))
            self._event("outbox_published", entry, attempt=1)
        return published

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the marks of what this process published are written; False on
        timeout. (A mark that is never written costs a duplicate publish by a relay.)"""
        return self._marker.flush(timeout)

    def close(self) -> None:
        """Write the outstanding marks and stop the background marker thread."""
        self._marker.close()

    def _write_marks(self, marks: list[tuple[str, str | None]]) -> None:
        """The marker thread's batch of ``(id, error)``: published entries (no error) become
        ``sent``; failed ones keep ``pending`` with their error and a retry time. (An entry
        that asks for confirmation is never marked: the relay confirms it.)"""
        t = self.table
        now = self._clock()
        sent = [m[0] for m in marks if m[1] is None]
        failed = [(m[0], m[1]) for m in marks if m[1] is not None]
        with self.store.engine.begin() as conn:
            self._async_commit(conn)
            pending = t.c.state == "pending"
            if sent:
                conn.execute(t.update().where(t.c.id.in_(sent), pending).values(
                    state="sent", publishes=t.c.publishes + 1, failures=0, published_at=now,
                    next_at=None, last_error=None))
            for id, error in failed:
                conn.execute(t.update().where(t.c.id == id, pending).values(
                    failures=t.c.failures + 1,
                    next_at=now + self.retry_after * random.uniform(1.0, 1.1),
                    last_error=error))

    def _async_commit(self, conn: sa.Connection) -> None:
        """A lost mark costs only a duplicate publish (the consumer drops it by the id), so
        the relay's and the marker's transactions need not wait for the WAL flush."""
        if self._skip_locked:  # PostgreSQL
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    # -- the relay ---------------------------------------------------------------------
    def relay_once(self, batch: int = 100) -> RelayReport:
        """One pass: publish entries that are due (never published, or unconfirmed past
        their re-check time), confirm those whose consumer record exists, mark those out of
        publishes ``unconfirmed``. Returns what it did."""
        return self._pass(batch=batch)

    def run_relay(self, *, interval: float = 1.0, batch: int = 100,
                  stop: threading.Event | None = None) -> RelayReport:
        """Relay until ``stop`` is set: passes back to back while there is work, else
        one every ``interval`` seconds."""
        stop = stop or threading.Event()
        total = RelayReport()
        while not stop.is_set():
            try:
                report = self._pass(batch=batch)
            except Exception:
                log.warning("outbox relay pass failed; retrying in %.1f s", interval,
                            exc_info=True)
                stop.wait(interval)
                continue
            total = total + report
            if sum(_fields(report)) < batch:
                stop.wait(interval)
        return total

    def _pass(self, *, batch: int = 100) -> RelayReport:
        t = self.table
        now = self._clock()
        query = (sa.select(t).where(t.c.state.in_(_OPEN), t.c.next_at <= now)
                 .order_by(t.c.next_at).limit(batch))
        if self._skip_locked:
            query = query.with_for_update(skip_locked=True)
        published = republished = confirmed = unconfirmed = failed = 0
        done: dict[tuple[str, int], list[str]] = {}  # (new state, publishes) -> ids
        with self.store.engine.begin() as conn:
            self._async_commit(conn)
            entries = [_entry(row) for row in conn.execute(query).mappings().all()]
            arrived = self._confirmed(conn, [e for e in entries if e.confirm_key is not None])
            for entry in entries:
                if entry.id in arrived:
                    done.setdefault(("confirmed", 0), []).append(entry.id)
                    confirmed += 1
                    self._event("outbox_confirmed", entry)
                    continue
                if entry.publishes >= self.max_publishes:
                    done.setdefault(("unconfirmed", 0), []).append(entry.id)
                    unconfirmed += 1
                    log.warning(
                        "outbox entry %s (%s:%s) is still unconfirmed after %d publishes; "
                        "it stays in the outbox as 'unconfirmed' (idempotent stats lists it)",
                        entry.id, entry.publisher, entry.target, entry.publishes)
                    self._event("outbox_unconfirmed", entry)
                    continue
                try:
                    self.publishers[entry.publisher].publish(entry)
                except Exception as exc:
                    failed += 1
                    conn.execute(t.update().where(t.c.id == entry.id).values(
                        failures=entry.failures + 1,
                        next_at=now + min(self.retry_after * 2 ** entry.failures,
                                          self.retry_max) * random.uniform(1.0, 1.1),
                        last_error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR]))
                    self._event("outbox_publish_failed", entry, error=type(exc).__name__)
                    continue
                n = entry.publishes + 1
                state = "published" if entry.confirm_key is not None else "sent"
                done.setdefault((state, n), []).append(entry.id)
                if entry.publishes == 0:
                    published += 1
                    self._event("outbox_published", entry, attempt=n)
                else:
                    republished += 1
                    self._event("outbox_republished", entry, attempt=n)
            for (state, n), ids in done.items():
                values: dict[str, Any]
                if state == "confirmed":
                    values = {"confirmed_at": now, "next_at": None}
                elif state == "unconfirmed":
                    values = {"next_at": None}
                else:
                    values = {"publishes": n, "failures": 0, "published_at": now,
                              "last_error": None,
                              "next_at": now + self._delay(n) if state == "published" else None}
                conn.execute(t.update().where(t.c.id.in_(ids)).values(state=state, **values))
        return RelayReport(published, republished, confirmed, unconfirmed, failed)

    def _delay(self, publishes: int) -> float:
        """Seconds until the next look at an entry published ``publishes`` times."""
        base = self.confirm_after * 2 ** max(publishes - 1, 0)
        return min(base, self.backoff_max) * random.uniform(1.0, 1.1)

    def _confirmed(self, conn: sa.Connection, entries: list[Entry]) -> set[str]:
        """The ids of ``entries`` whose consumer record exists (completed, or failed and
        kept): one query when the records are in this database, else one read each."""
        if not entries:
            return set()
        wanted = {(e.confirm_namespace, e.confirm_key): e.id for e in entries}
        store = self.confirm_store
        if store is self.store:
            r = store.table
            found = conn.execute(sa.select(r.c.namespace, r.c.key).where(
                sa.tuple_(r.c.namespace, r.c.key).in_(list(wanted)),
                r.c.state.in_(("completed", "failed"))))
            return {wanted[(ns, key)] for ns, key in found}
        arrived = set()
        for (ns, key), id in wanted.items():
            assert ns is not None and key is not None
            record = store.get(ns, key)
            if record is not None and record.state.value in ("completed", "failed"):
                arrived.add(id)
        return arrived

    def _event(self, kind: str, entry: Entry, *, attempt: int | None = None,
               error: str | None = None) -> None:
        emit(Event(kind, f"{entry.publisher}:{entry.target}", entry.id, attempt=attempt,
                   error=error), self._listeners)

    # -- inspection and clean-up ---------------------------------------------------------
    def stats(self) -> OutboxStats:
        """Entries per state, and the oldest one not yet published."""
        t = self.table
        with self.store.engine.connect() as conn:
            counts = {state: n for state, n in conn.execute(
                sa.select(t.c.state, sa.func.count()).group_by(t.c.state))}
            oldest = conn.execute(sa.select(t).where(t.c.state == "pending")
                                  .order_by(t.c.created_at).limit(1)).mappings().first()
        return OutboxStats(counts, _entry(oldest) if oldest is not None else None)

    def get(self, id: str) -> Entry | None:
        """The entry of message ``id``, or None."""
        t = self.table
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == id)).mappings().first()
        return _entry(row) if row is not None else None

    def purge(self, *, older_than: float, batch: int = 1000) -> int:
        """Delete done entries (``confirmed``, ``sent``) staged more than ``older_than``
        seconds ago; ``pending``, ``published`` and ``unconfirmed`` ones are kept."""
        t = self.table
        cutoff = self._clock() - older_than
        deleted = 0
        while True:
            with self.store.engine.begin() as conn:
                ids = [r[0] for r in conn.execute(
                    sa.select(t.c.id).where(t.c.state.in_(("confirmed", "sent")),
                                            t.c.created_at < cutoff).limit(batch))]
                if not ids:
                    return deleted
                deleted += conn.execute(t.delete().where(
                    t.c.id.in_(ids), t.c.state.in_(("confirmed", "sent")))).rowcount
            if len(ids) < batch:
                return deleted


@dataclass(frozen=True, slots=True)
class _Staged:
    """What the committing process remembers of a message it staged."""

    outbox: Outbox
    id: str
    publisher: str
    target: str
    body: Any
    confirm: bool
    nested: bool
    root: Any  # the root transaction it was staged in

    def entry(self) -> Entry:
        return Entry(id=self.id, publisher=self.publisher, target=self.target, body=self.body,
                     state="pending", publishes=0, failures=0, confirm_namespace=None,
                     confirm_key=None, created_at=0.0, next_at=None, last_error=None)


class _Marker:
    """The background thread that writes the marks of the immediate publishes in batches
    (one transaction for what 50 ms of publishes gathered, up to 1,000, without waiting for
    the WAL flush). Started on first
    use, again after a fork; a daemon, so a process that exits without `Outbox.close`
    only leaves marks unwritten: those entries are published once more by a relay."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._marks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # marks put and not yet written (or given up)
        self._thread: threading.Thread | None = None
        self._pid = 0

    def put(self, mark: tuple[str, str | None]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's marks are not ours
                self._marks = queue.SimpleQueue()
                self._pending = 0
                self._thread = None
                self._pid = os.getpid()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, args=(self._marks,),
                                                name="idempotent-outbox-marks", daemon=True)
                self._thread.start()
            self._pending += 1
            self._marks.put(mark)

    def _run(self, marks: queue.SimpleQueue[Any]) -> None:
        while True:
            try:
                first = marks.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    if self._pending == 0 and marks is self._marks:
                        self._thread = None  # idle: the next put starts a new one
                        return
                continue
            if first is _STOP:
                return
            batch = [first]
            stop = False
            linger = time.monotonic() + _LINGER  # gather what the next commits publish
            while len(batch) < 1000:
                try:
                    item = marks.get(timeout=max(0.0, linger - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            for attempt in range(3):
                try:
                    self._outbox._write_marks(batch)
                    break
                except Exception:
                    if attempt == 2:
                        log.warning("could not write %d outbox mark(s); a relay will publish "
                                    "those entries again", len(batch), exc_info=True)
                    else:
                        time.sleep(0.1 * (attempt + 1))
            with self._lock:
                self._pending -= len(batch)
                self._idle.notify_all()
            if stop:
                return

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        self.flush(30.0)
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._marks.put(_STOP)
            thread.join(10)


_STOP: Any = object()
#: seconds the marker gathers marks before it writes a batch
_LINGER = 0.05


def _publish_all(staged: Sequence[_Staged], *, committed: Any, trust: bool = False) -> int:
    """Publish staged entries, each through its own outbox."""
    by_outbox: dict[int, list[_Staged]] = {}
    for item in staged:
        by_outbox.setdefault(id(item.outbox), []).append(item)
    return sum(items[0].outbox._publish_after_commit(items, committed=committed, trust=trust)
               for items in by_outbox.values())


def after_commit(connection: sa.Connection, session: Session | None, committed: Any) -> None:
    """Called by `SqlStore` once a delivery's own transaction (``committed``, the root
    transaction of ``connection``) has committed: publish what the handler staged on its
    connection or session."""
    for info in (connection.info, session.info if session is not None else None):
        if info is not None:
            staged = info.pop(_STAGED, None)
            if staged:
                _publish_all(staged, committed=committed, trust=info is not connection.info)


def _forget_staged(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:  # the outermost transaction rolled back
        session.info.pop(_STAGED, None)


def _entry(row: Mapping[str, Any]) -> Entry:
    return Entry(
        id=row["id"], publisher=row["publisher"], target=row["target"],
        body=json.loads(row["body"]), state=row["state"], publishes=row["publishes"],
        failures=row["failures"],
        confirm_namespace=row["confirm_namespace"], confirm_key=row["confirm_key"],
        created_at=row["created_at"], next_at=row["next_at"], last_error=row["last_error"],
    )
