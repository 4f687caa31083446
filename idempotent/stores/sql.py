"""The SQL store: SQLAlchemy 2 Core on PostgreSQL (psycopg 3) and SQLite.

Two ways to use it:

* **transactional** (`SqlStore.transaction`): the key is claimed inside the transaction
  that carries the handler's own writes, and commits or vanishes with them;
* **lease** (`Store.claim` / `complete` / `release` / `renew`): each operation is one
  autocommit statement, for handlers whose effects live outside the database.

Round trips, on PostgreSQL with psycopg (BEGIN is sent with the first statement):
a transactional first delivery costs what a bare transaction costs, three round trips
(BEGIN+claim pipelined, the handler's statements, result+COMMIT pipelined); a duplicate
costs one. Lease claim, complete, release and renew are one statement each; a claim
that finds another worker's record reads it with a second.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .._keys import fit
from .._record import Claimed, Outcome, Record, State, StateCount, StoreStats
from . import _sql_schema
from ._pg_fast import PgFastPath, raise_if_lock_timeout
from .._rules import outcome_of
from .base import DEFAULT_TTL, Store

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

_ASYNC_DRIVERS = {"aiosqlite", "asyncpg", "psycopg_async", "aiomysql", "asyncmy"}
_P = sa.bindparam


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _upsert_for(dialect: str) -> Callable[[sa.Table], Any] | None:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    return None


class _Statements:
    """Every statement the store runs, built once with bind parameters."""

    def __init__(self, table: sa.Table, dialect: str) -> None:
        t = table
        self.table = t
        where_key = (t.c.namespace == _P("ns")) & (t.c.key == _P("k"))
        self.select = sa.select(*[t.c[c] for c in _sql_schema.COLUMNS]).where(where_key)
        expired = t.c.expires_at <= _P("now")
        upsert = _upsert_for(dialect)
        self.upsert = upsert is not None

        # transactional claim: the row is written as completed at once; nobody sees it
        # before COMMIT, and a rollback takes it away
        tx_values: dict[str, Any] = {
            "namespace": _P("ns"), "key": _P("k"), "state": State.COMPLETED.value,
            "fingerprint": _P("fp"), "result": None, "token": None, "lease_until": None,
            "created_at": _P("now"), "completed_at": _P("now"), "expires_at": _P("exp"),
        }
        lease_values = {
            **tx_values, "state": State.IN_PROGRESS.value, "token": _P("tok"),
            "lease_until": _P("lu"), "completed_at": None,
        }
        if upsert is not None:
            ins = upsert(t).values(tx_values)
            self.claim_tx = ins.on_conflict_do_update(
                index_elements=[t.c.namespace, t.c.key],
                set_={c: ins.excluded[c] for c in _sql_schema.COLUMNS[2:]},
                where=expired,
            ).returning(t.c.key)
            ins = upsert(t).values(lease_values)
            self.claim_lease = ins.on_conflict_do_update(
                index_elements=[t.c.namespace, t.c.key],
                set_={c: ins.excluded[c] for c in _sql_schema.COLUMNS[2:]},
                where=expired
                | ((t.c.state == State.IN_PROGRESS.value) & (t.c.lease_until <= _P("now"))),
            ).returning(t.c.key)
        else:  # generic SQL: insert under a savepoint, IntegrityError means "exists"
            self.claim_tx = sa.insert(t).values(tx_values)
            self.claim_lease = sa.insert(t).values(lease_values)
        self.delete_expired = sa.delete(t).where(where_key & expired)
        # optimistic mode writes the record once, after the handler, with its result
        self.insert_done = sa.insert(t).values({**tx_values, "result": _P("res")})
        self.store_result = (
            sa.update(t).where(where_key).values(result=_P("res"))
        )
        owned = where_key & (t.c.token == _P("tok"))
        self.complete = (
            sa.update(t)
            .where(owned)
            .values(
                state=_P("st"), result=_P("res"), lease_until=None,
                completed_at=sa.func.coalesce(t.c.completed_at, _P("now")),
                expires_at=_P("exp"),
            )
        )
        in_progress = owned & (t.c.state == State.IN_PROGRESS.value)
        self.release = sa.delete(t).where(in_progress)
        self.renew = sa.update(t).where(in_progress).values(lease_until=_P("lu"))


def _to_record(row: Any) -> Record:
    return Record(
        namespace=row[0], key=row[1], state=State(row[2]), fingerprint=row[3],
        result=None if row[4] is None else bytes(row[4]), token=row[5], lease_until=row[6],
        created_at=row[7], completed_at=row[8], expires_at=row[9],
    )


class SqlStore(Store):
    """Records in a SQL table, through SQLAlchemy.

    ``bind`` is a URL (``"sqlite:///idem.db"``, ``"postgresql+psycopg://…"``), an
    `Engine`, or an `AsyncEngine` (for ``async def`` handlers). ``lock_timeout`` bounds
    how long a delivery waits for a concurrent delivery of the same key (PostgreSQL
    ``lock_timeout``; SQLite's busy timeout for engines made from a URL), after which it
    raises `AlreadyInProgress`. ``fast_path=False`` turns off the PostgreSQL fast path
    (prepared statements sent straight to libpq), for connection poolers such as PgBouncer
    in transaction mode, which do not keep prepared statements between transactions.
    """

    transactional = True

    def __init__(
        self,
        bind: str | sa.URL | Engine | AsyncEngine,
        *,
        table: str = _sql_schema.DEFAULT_TABLE,
        schema: str | None = None,
        lock_timeout: float | None = 5.0,
        clock: Callable[[], float] | None = None,
        fast_path: bool = True,
        **engine_options: Any,
    ) -> None:
        super().__init__(clock=clock)
        self.async_engine: AsyncEngine | None = None
        if isinstance(bind, (str, sa.URL)):
            bind = self._make_engine(sa.make_url(bind), lock_timeout, engine_options)
        if isinstance(bind, Engine):
            self.engine = bind
        else:
            self.async_engine = bind
            self.engine = bind.sync_engine
        self.lock_timeout = lock_timeout
        self.metadata = _sql_schema.new_metadata(schema)
        self.table = _sql_schema.records_table(self.metadata, table)
        self.dialect = self.engine.dialect.name
        self._st = _Statements(self.table, self.dialect)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite is in-process: a bare transaction takes ~50 µs, so SQLAlchemy's ~25 µs per
        # statement is most of what the store adds; the optimistic path's two statements go
        # to the sqlite3 connection directly (same transaction, same SQL)
        self._fast_sqlite = (
            fast_path
            and self.dialect == "sqlite"
            and self.engine.dialect.driver == "pysqlite"
            and self.async_engine is None
        )
        if self._fast_sqlite:
            t = self.table.fullname
            cols = ", ".join(_sql_schema.COLUMNS)
            self._sqlite_read = f"SELECT {cols} FROM {t} WHERE namespace = ? AND key = ?"
            self._sqlite_done = (
                f"INSERT INTO {t} (namespace, key, state, fingerprint, result, created_at, "
                "completed_at, expires_at) VALUES (?, ?, 'completed', ?, ?, ?, ?, ?)"
            )
        self._fast_pg = (
            fast_path
            and self.dialect == "postgresql"
            and self.engine.dialect.driver == "psycopg"
            and self.async_engine is None
        )
        if self._fast_pg:
            self._pg = PgFastPath(self.table, self.engine.dialect, lock_timeout)
        self._many = self._many_statement()

    @staticmethod
    def _make_engine(
        url: sa.URL, lock_timeout: float | None, options: dict[str, Any]
    ) -> Engine | AsyncEngine:
        driver = url.get_driver_name()
        if url.get_backend_name() == "sqlite":
            args = options.setdefault("connect_args", {})
            args.setdefault("timeout", lock_timeout if lock_timeout is not None else 5.0)
        if driver in _ASYNC_DRIVERS:
            from ..exceptions import IdempotencyError

            try:
                from sqlalchemy.ext.asyncio import create_async_engine

                async_engine = create_async_engine(url, **options)
            except ImportError as exc:  # greenlet or the async driver
                raise IdempotencyError(
                    f"async engines need extra packages: pip install 'idempotent[async]' ({exc})"
                ) from exc
            engine: Engine | AsyncEngine = async_engine
            sync_engine = async_engine.sync_engine
        else:
            engine = sync_engine = sa.create_engine(url, **options)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            sa.event.listen(sync_engine, "connect", _sqlite_pragmas)
        return engine

    @property
    def is_async(self) -> bool:
        return self.async_engine is not None

    # -- schema ----------------------------------------------------------------------
    def create_schema(self) -> Any:
        """Create the records table if missing (development and tests; production
        schemas come from the Alembic migrations). With an async engine, await it."""
        return self._run(self.metadata.create_all)

    def drop_schema(self) -> Any:
        """Drop the records table. With an async engine, await it."""
        return self._run(self.metadata.drop_all)

    def _run(self, fn: Callable[[Engine], Any]) -> Any:
        if self.async_engine is None:
            return fn(self.engine)
        from sqlalchemy.util import greenlet_spawn

        return greenlet_spawn(fn, self.engine)

    # -- lease mode: one autocommit statement each ------------------------------------
    def _claim(
        self,
        namespace: str,
        key: str,
        fingerprint: str | None,
        token: str,
        now: float | None,
        lease: float,
        ttl: float,
    ) -> Outcome | None:
        if now is None:
            now = time.time()
        lease_until, expires_at = now + lease, now + ttl
        params = {
            "ns": namespace, "k": key, "fp": fingerprint, "tok": token, "now": now,
            "lu": lease_until, "exp": expires_at,
        }
        with self._autocommit.connect() as conn:
            if self._insert(conn, self._st.claim_lease, params):
                return Claimed(token=token, lease_until=lease_until)
            record = self._select(conn, namespace, key)
        return None if record is None else outcome_of(record, token, now)

    def _complete(
        self,
        namespace: str,
        key: str,
        token: str,
        result: bytes | None,
        state: State,
        now: float | None,
        ttl: float,
    ) -> bool:
        if now is None:
            now = time.time()
        expires_at = now + ttl
        params = {
            "ns": namespace, "k": key, "tok": token, "st": state.value,
            "res": result, "now": now, "exp": expires_at,
        }
        with self._autocommit.connect() as conn:
            return conn.execute(self._st.complete, params).rowcount == 1

    def _release(self, namespace: str, key: str, token: str) -> bool:
        with self._autocommit.connect() as conn:
            params = {"ns": namespace, "k": key, "tok": token}
            return conn.execute(self._st.release, params).rowcount == 1

    def _renew(
        self, namespace: str, key: str, token: str, now: float | None, lease: float
    ) -> float | None:
        lease_until = (time.time() if now is None else now) + lease
        params = {"ns": namespace, "k": key, "tok": token, "lu": lease_until}
        with self._autocommit.connect() as conn:
            return lease_until if conn.execute(self._st.renew, params).rowcount == 1 else None

    def _get(self, namespace: str, key: str) -> Record | None:
        with self._autocommit.connect() as conn:
            return self._select(conn, namespace, key)

    def _select(self, conn: Connection, namespace: str, key: str) -> Record | None:
        row = conn.execute(self._st.select, {"ns": namespace, "k": key}).first()
        return None if row is None else _to_record(row)

    def _insert(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> bool:
        """Run a claim insert; True if this call wrote the row."""
        if self._st.upsert:
            return conn.execute(stmt, params).first() is not None
        conn.execute(self._st.delete_expired, params)
        try:
            with conn.begin_nested():
                conn.execute(stmt, params)
        except sa.exc.IntegrityError:
            return False
        return True

    # -- operations: purge and stats --------------------------------------------------------
    def _purge(
        self, now: float, older_than: float | None, namespace: str | None, batch: int
    ) -> int:
        """One autocommit DELETE per batch. PostgreSQL: the batch is picked with
        ``FOR UPDATE SKIP LOCKED``, so rows a worker (or another purge) holds are skipped,
        and a row a worker took over meanwhile is checked again once locked; SQLite runs
        one writer at a time, so each statement sees the rows as they are."""
        t = self.table
        created_before = None if older_than is None else now - older_than
        doomed = t.c.expires_at <= _P("now")
        if created_before is not None:
            doomed = doomed | (t.c.created_at < _P("before"))
        doomed = doomed & (
            (t.c.state != State.IN_PROGRESS.value)
            | t.c.lease_until.is_(None)
            | (t.c.lease_until <= _P("now"))
        )
        if namespace is not None:
            doomed = doomed & (t.c.namespace == _P("ns"))
        pick = (
            sa.select(t.c.namespace, t.c.key).where(doomed).limit(_P("n"))
            .with_for_update(skip_locked=True)
        )
        # the condition again on the DELETE itself: cheap, and it holds without the lock
        stmt = sa.delete(t).where(sa.tuple_(t.c.namespace, t.c.key).in_(pick) & doomed)
        params = {"now": now, "before": created_before, "ns": namespace, "n": batch}
        total = 0
        with self._autocommit.connect() as conn:
            while True:
                deleted = conn.execute(stmt, params).rowcount
                total += deleted
                if deleted < batch:
                    return total

    def _stats(self, now: float, namespace: str | None) -> StoreStats:
        t = self.table
        expired = sa.func.sum(sa.case((t.c.expires_at <= _P("now"), 1), else_=0))
        counts = (
            sa.select(t.c.namespace, t.c.state, sa.func.count(), expired)
            .group_by(t.c.namespace, t.c.state)
            .order_by(t.c.namespace, t.c.state)
        )
        oldest = (
            sa.select(*[t.c[c] for c in _sql_schema.COLUMNS])
            .where(t.c.state == State.IN_PROGRESS.value)
            .order_by(t.c.created_at)
            .limit(1)
        )
        if namespace is not None:
            counts = counts.where(t.c.namespace == _P("ns"))
            oldest = oldest.where(t.c.namespace == _P("ns"))
        params = {"now": now, "ns": namespace}
        with self._autocommit.connect() as conn:
            rows = conn.execute(counts, params).all()
            first = conn.execute(oldest, params).first()
        return StoreStats(
            tuple(StateCount(ns, State(st), int(n), int(exp or 0)) for ns, st, n, exp in rows),
            None if first is None else _to_record(first),
        )

    # -- transactional mode -------------------------------------------------------------
    @contextmanager
    def transaction(
        self, namespace: str, key: str, fingerprint: str | None, ttl: float = DEFAULT_TTL,
        *, optimistic: bool = False,
    ) -> Iterator[Transaction]:
        """Open a transaction for one delivery of ``key``.

        ``tx.existing`` is the committed record of an earlier delivery (the caller replays
        it; nothing was written), or None: the caller runs its writes on
        ``tx.connection`` (or ``tx.session()``) and calls ``tx.commit(result)``; leaving
        the block otherwise rolls everything back.

        Pessimistic (the default here): the key is claimed now, so a concurrent delivery
        of it waits until this transaction ends. Optimistic: the key is only read now
        and written once, with the result, at commit; a concurrent delivery runs too, and
        the later of the two fails on the key at commit, rolls back and gets the winner's
        record from ``tx.commit``.
        """
        conn = self.engine.connect()
        try:
            conn.begin()
            now = self.now()
            params = {"ns": namespace, "k": key, "fp": fingerprint, "now": now,
                      "exp": now + ttl}
            if self._fast_pg:
                existing = self._pg.begin(conn, params, optimistic)
            elif optimistic and self._fast_sqlite:
                row = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                    self._sqlite_read, (namespace, key)).fetchone()
                existing = None if row is None else _to_record(row)
            elif optimistic:
                existing = self._select(conn, namespace, key)
            else:
                self._set_lock_timeout(conn)
                existing = self._claim_in(conn, params)
            expired = existing is not None and existing.expires_at <= now
            tx = Transaction(self, conn, namespace, key, None if expired else existing,
                             owner=True, params=params, optimistic=optimistic,
                             replaces_expired=expired)
            yield tx
        finally:
            conn.close()  # rolls back whatever was not committed

    def _set_lock_timeout(self, conn: Connection) -> None:
        """Bound the wait for a concurrent delivery's key (PostgreSQL; SQLite engines made
        from a URL have it as their busy timeout)."""
        if self.dialect == "postgresql" and self.lock_timeout is not None:
            ms = max(1, int(self.lock_timeout * 1000))
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")

    def join(
        self, session: Session | Connection, namespace: str, key: str,
        fingerprint: str | None, ttl: float = DEFAULT_TTL,
    ) -> Transaction:
        """Claim ``key`` inside the caller's own transaction; never commits."""
        conn = session.connection() if isinstance(session, Session) else session
        now = self.now()
        params = {"ns": namespace, "k": key, "fp": fingerprint, "now": now, "exp": now + ttl}
        existing = self._claim_in(conn, params)
        return Transaction(self, conn, namespace, key, existing, owner=False, session=session,
                           params=params)

    def _claim_in(self, conn: Connection, params: dict[str, Any]) -> Record | None:
        try:
            if self._insert(conn, self._st.claim_tx, params):
                return None
        except sa.exc.DBAPIError as exc:
            raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        record = self._select(conn, params["ns"], params["k"])
        if record is None:
            raise sa.exc.InvalidRequestError(
                "idempotency record vanished between claim and read (purged?)"
            )
        return record

    # -- the primitive: join the caller's transaction --------------------------------------
    @overload
    def record(
        self, session: Session | Connection, namespace: str, key: str, *,
        fingerprint: str | None = None, ttl: float = DEFAULT_TTL,
    ) -> bool: ...

    @overload
    def record(
        self, session: AsyncSession | AsyncConnection, namespace: str, key: str, *,
        fingerprint: str | None = None, ttl: float = DEFAULT_TTL,
    ) -> Awaitable[bool]: ...

    def record(
        self, session: Any, namespace: str, key: str, *,
        fingerprint: str | None = None, ttl: float = DEFAULT_TTL,
    ) -> bool | Awaitable[bool]:
        """Record ``key`` in the caller's transaction; True if it is new.

        Never commits: the caller's commit makes the key and its writes durable together,
        its rollback forgets both. False means the key was processed before (do nothing).
        With ``fingerprint``, a key reused with another payload raises
        `IdempotencyKeyConflict`. A concurrent transaction holding the same key makes this
        wait until it ends. With an async session or connection, await the result.
        """
        sync, is_async = _sync_handle(session)
        if is_async:
            from sqlalchemy.util import greenlet_spawn

            return greenlet_spawn(self._record, sync, namespace, key, fingerprint, ttl)
        return self._record(sync, namespace, key, fingerprint, ttl)

    def _record(
        self, session: Session | Connection, namespace: str, key: str,
        fingerprint: str | None, ttl: float,
    ) -> bool:
        from .._rules import check_fingerprint

        tx = self.join(session, namespace, fit(key), fingerprint, ttl)
        if tx.existing is None:
            return True
        check_fingerprint(tx.existing, fingerprint)
        return False

    @overload
    def record_many(
        self, session: Session | Connection, namespace: str, keys: Iterable[str], *,
        ttl: float = DEFAULT_TTL,
    ) -> set[str]: ...

    @overload
    def record_many(
        self, session: AsyncSession | AsyncConnection, namespace: str, keys: Iterable[str],
        *, ttl: float = DEFAULT_TTL,
    ) -> Awaitable[set[str]]: ...

    def record_many(
        self, session: Any, namespace: str, keys: Iterable[str], *, ttl: float = DEFAULT_TTL
    ) -> set[str] | Awaitable[set[str]]:
        """Record a batch of keys in one statement; returns the keys not seen before.

        Same transaction rules as `record`. Keys repeated inside the batch count once.
        """
        sync, is_async = _sync_handle(session)
        if is_async:
            from sqlalchemy.util import greenlet_spawn

            return greenlet_spawn(self._record_many, sync, namespace, keys, ttl)
        return self._record_many(sync, namespace, keys, ttl)

    def _record_many(
        self, session: Session | Connection, namespace: str, keys: Iterable[str], ttl: float
    ) -> set[str]:
        stored = {fit(k): k for k in keys}
        if not stored:
            return set()
        conn = session.connection() if isinstance(session, Session) else session
        now = self.now()
        if self._many is not None:
            batch: Any = list(stored)
            if self.dialect == "sqlite":
                import json

                batch = json.dumps(batch)
            fresh = conn.execute(self._many, {"ns": namespace, "keys": batch, "now": now,
                                              "exp": now + ttl}).scalars().all()
            return {stored[k] for k in fresh}
        new = set()
        for k, original in stored.items():
            params = {"ns": namespace, "k": k, "fp": None, "now": now, "exp": now + ttl}
            if self._insert(conn, self._st.claim_tx, params):
                new.add(original)
        return new

    def _many_statement(self) -> sa.TextClause | None:
        """One statement that records a batch of keys and returns the new ones."""
        t, name = self.table.fullname, self.table.name
        if self.dialect == "postgresql":
            source, excluded = "SELECT :ns, k, 'completed', :now, :now, :exp " \
                "FROM unnest(CAST(:keys AS text[])) AS k", "EXCLUDED"
        elif self.dialect == "sqlite":  # WHERE true: SQLite's parser needs it before ON
            source, excluded = "SELECT :ns, value, 'completed', :now, :now, :exp " \
                "FROM json_each(:keys) WHERE true", "excluded"
        else:
            return None
        return sa.text(
            f"INSERT INTO {t} (namespace, key, state, created_at, completed_at, expires_at) "
            f"{source} ON CONFLICT (namespace, key) DO UPDATE SET state = 'completed', "
            "fingerprint = NULL, result = NULL, token = NULL, lease_until = NULL, "
            f"created_at = {excluded}.created_at, completed_at = {excluded}.completed_at, "
            f"expires_at = {excluded}.expires_at WHERE {name}.expires_at <= :now RETURNING key"
        )


class Transaction:
    """One delivery's open transaction (see `SqlStore.transaction`)."""

    def __init__(
        self,
        store: SqlStore,
        connection: Connection,
        namespace: str,
        key: str,
        existing: Record | None,
        *,
        owner: bool,
        params: dict[str, Any],
        session: Session | Connection | None = None,
        optimistic: bool = False,
        replaces_expired: bool = False,
    ) -> None:
        self.store = store
        self.connection = connection
        self.namespace = namespace
        self.key = key
        self.existing = existing
        self._owner = owner
        self._params = params
        self._optimistic = optimistic
        self._replaces_expired = replaces_expired
        self._session: Session | None = session if isinstance(session, Session) else None

    def session(self) -> Session:
        """An ORM `Session` joined to this transaction (created on first use)."""
        if self._session is None:
            self._session = Session(bind=self.connection)
        return self._session

    def commit(self, result: bytes | None) -> Record | None:
        """Store ``result`` with the key and, when the store opened the transaction,
        commit the key, the result and the handler's writes together.

        Returns None when they committed; in optimistic mode, the record of a concurrent
        delivery that committed the key first (this transaction was rolled back).
        """
        if self._session is not None:
            self._session.flush()
        conn = self.connection
        if not conn.in_transaction():
            raise sa.exc.InvalidRequestError(
                f"{self.namespace}: the handler for key {self.key!r} ended the transaction "
                "itself; nothing was recorded"
            )
        params = {**self._params, "res": result}
        store = self.store
        if self._owner and store._fast_pg:
            return store._pg.finish(conn, params, self._optimistic, self._replaces_expired)
        if self._optimistic:
            store._set_lock_timeout(conn)
            if self._replaces_expired:
                conn.execute(store._st.delete_expired, params)
            try:  # no savepoint: on failure the whole transaction goes anyway
                if self._owner and store._fast_sqlite:
                    conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                        store._sqlite_done, (params["ns"], params["k"], params["fp"], result,
                                             params["now"], params["now"], params["exp"]))
                else:
                    conn.execute(store._st.insert_done, params)
            except sa.exc.OperationalError as exc:
                raise_if_lock_timeout(exc, params, store.lock_timeout)
                raise
            except (sa.exc.IntegrityError, sqlite3.IntegrityError):
                # a concurrent delivery committed the key first
                tx = conn.get_transaction()
                assert tx is not None
                tx.rollback()
                return store._select(conn, self.namespace, self.key)
        elif result is not None:
            conn.execute(store._st.store_result, params)
        if self._owner:
            tx = conn.get_transaction()
            assert tx is not None
            tx.commit()
        return None


def _sync_handle(session: Any) -> tuple[Session | Connection, bool]:
    """The sync Session/Connection behind ``session``, and whether it was async."""
    if isinstance(session, (Session, Connection)):
        return session, False
    sync = getattr(session, "sync_session", None) or getattr(session, "sync_connection", None)
    if sync is None:
        raise TypeError(
            "expected a SQLAlchemy Session, Connection, AsyncSession or AsyncConnection, "
            f"not {type(session).__qualname__}"
        )
    return sync, True
