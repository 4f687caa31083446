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

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .._keys import fit
from .._record import Claimed, Outcome, Record, State
from ..exceptions import AlreadyInProgress
from . import _sql_schema
from .base import DEFAULT_TTL, Store, outcome_of

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

_ASYNC_DRIVERS = {"aiosqlite", "asyncpg", "psycopg_async", "aiomysql", "asyncmy"}
_COLUMNS = (
    "namespace", "key", "state", "fingerprint", "result", "token",
    "lease_until", "created_at", "completed_at", "expires_at",
)
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
        self.select = sa.select(*[t.c[c] for c in _COLUMNS]).where(where_key)
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
                set_={c: ins.excluded[c] for c in _COLUMNS[2:]},
                where=expired,
            ).returning(t.c.key)
            ins = upsert(t).values(lease_values)
            self.claim_lease = ins.on_conflict_do_update(
                index_elements=[t.c.namespace, t.c.key],
                set_={c: ins.excluded[c] for c in _COLUMNS[2:]},
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
        clock: Callable[[], float] = time.time,
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
        self._fast_pg = (
            fast_path
            and self.dialect == "postgresql"
            and self.engine.dialect.driver == "psycopg"
            and self.async_engine is None
        )
        if self._fast_pg:
            self._pg = _PgSql(self.table, self.engine.dialect, lock_timeout)
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
        now: float,
        lease_until: float,
        expires_at: float,
    ) -> Outcome | None:
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
        now: float,
        expires_at: float,
    ) -> bool:
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

    def _renew(self, namespace: str, key: str, token: str, lease_until: float) -> bool:
        params = {"ns": namespace, "k": key, "tok": token, "lu": lease_until}
        with self._autocommit.connect() as conn:
            return conn.execute(self._st.renew, params).rowcount == 1

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
            now = self.clock()
            params = {"ns": namespace, "k": key, "fp": fingerprint, "now": now,
                      "exp": now + ttl}
            if self._fast_pg:
                existing = self._pg.begin(conn, params, optimistic)
            else:
                if self.dialect == "postgresql" and self.lock_timeout is not None:
                    ms = max(1, int(self.lock_timeout * 1000))
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                if optimistic:
                    existing = self._select(conn, namespace, key)
                else:
                    existing = self._claim_in(conn, params)
            expired = existing is not None and existing.expires_at <= now
            tx = Transaction(self, conn, namespace, key, None if expired else existing,
                             owner=True, params=params, optimistic=optimistic,
                             replaces_expired=expired)
            yield tx
        finally:
            conn.close()  # rolls back whatever was not committed

    def join(
        self, session: Session | Connection, namespace: str, key: str,
        fingerprint: str | None, ttl: float = DEFAULT_TTL,
    ) -> Transaction:
        """Claim ``key`` inside the caller's own transaction; never commits."""
        conn = session.connection() if isinstance(session, Session) else session
        now = self.clock()
        params = {"ns": namespace, "k": key, "fp": fingerprint, "now": now, "exp": now + ttl}
        existing = self._claim_in(conn, params)
        return Transaction(self, conn, namespace, key, existing, owner=False, session=session,
                           params=params)

    def _claim_in(self, conn: Connection, params: dict[str, Any]) -> Record | None:
        try:
            if self._insert(conn, self._st.claim_tx, params):
                return None
        except sa.exc.DBAPIError as exc:
            _raise_if_lock_timeout(exc, params, self.lock_timeout)
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
        from .._machine import check_fingerprint

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
        now = self.clock()
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
            if self._replaces_expired:
                conn.execute(store._st.delete_expired, params)
            try:  # no savepoint: on failure the whole transaction goes anyway
                conn.execute(store._st.insert_done, params)
            except sa.exc.IntegrityError:  # a concurrent delivery committed the key first
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


class _PgSql:
    """The psycopg fast path: a transaction in the round trips of a bare one.

    psycopg would send BEGIN on its own before the claim, and the result UPDATE and the
    COMMIT would be two more round trips; on loopback each costs about a tenth of a small
    transaction. So ``BEGIN; claim`` and ``UPDATE result; COMMIT`` each go to libpq as one
    simple query. The statements are prepared once per connection (SQL ``PREPARE``), so
    the server does not plan them again for every message, and their arguments are
    quoted by libpq (``escape_literal``) or hex-encoded: nothing is spliced in raw.
    psycopg reads the transaction status from libpq, so it sends no BEGIN of its own
    for the handler's statements, and its COMMIT afterwards is a no-op.
    """

    def __init__(self, table: sa.Table, dialect: sa.Dialect, lock_timeout: float | None) -> None:
        t = dialect.identifier_preparer.format_table(table)
        digest = hashlib.sha1(f"{t}:v1".encode()).hexdigest()[:12]
        self.prepared_flag = f"idempotent_prepared_{digest}"
        claim, read, done = (f"idem_{what}_{digest}" for what in ("claim", "read", "done"))
        self.prepare = (
            f"PREPARE {claim} (text, text, text, float8, float8) AS "
            f"INSERT INTO {t} AS r (namespace, key, state, fingerprint, created_at, "
            "completed_at, expires_at) VALUES ($1, $2, 'completed', $3, $4, $4, $5) "
            "ON CONFLICT (namespace, key) DO UPDATE SET state = 'completed', "
            "fingerprint = EXCLUDED.fingerprint, result = NULL, token = NULL, "
            "lease_until = NULL, created_at = EXCLUDED.created_at, "
            "completed_at = EXCLUDED.completed_at, expires_at = EXCLUDED.expires_at "
            "WHERE r.expires_at <= $4 RETURNING 1; "
            f"PREPARE {read} (text, text) AS SELECT {', '.join(_COLUMNS)} FROM {t} "
            "WHERE namespace = $1 AND key = $2; "
            f"PREPARE {done} (text, text, text, bytea, float8, float8) AS "
            f"INSERT INTO {t} (namespace, key, state, fingerprint, result, created_at, "
            "completed_at, expires_at) VALUES ($1, $2, 'completed', $3, $4, $5, $5, $6); "
        ).encode()
        self.execute_done = f"EXECUTE {done}(".encode()
        # The optimistic insert runs after the handler: if psycopg dropped our prepared
        # statements meanwhile (DEALLOCATE ALL, on a rollback of its own or after DDL), the
        # transaction is lost and the attempt is retried; from then on this store inserts
        # with a plain statement, so a handler that triggers that cannot fail again.
        self.done_prepared = True
        ms = None if lock_timeout is None else max(1, int(lock_timeout * 1000))
        # lock_timeout holds for the whole transaction: a concurrent delivery of the same
        # key waits at most that long, and so does any lock wait of the handler's
        self.set_lock = b"" if ms is None else f"SET LOCAL lock_timeout = {ms}; ".encode()
        self.execute_claim = f"EXECUTE {claim}(".encode()
        self.execute_read = f"EXECUTE {read}(".encode()
        # not prepared: a transaction that lost its prepared statement to psycopg's
        # DEALLOCATE ALL would be lost with it; the claim, first in line, can recover
        self.store_result = f"UPDATE {t} SET result = decode('".encode()
        self.insert_done = (
            f"INSERT INTO {t} (namespace, key, state, fingerprint, result, created_at, "
            "completed_at, expires_at) VALUES ("
        ).encode()
        self.delete_expired = f"DELETE FROM {t} WHERE namespace = ".encode()
        self.lock_timeout = lock_timeout

    def _literals(self, conn: Connection) -> tuple[Any, bytes]:
        """libpq's literal quoting for this connection, and whether (b"" or the PREPARE
        statements) the connection still needs our statements prepared."""
        info = conn.connection.info
        lit = info.get(self.prepared_flag)
        if lit is not None:
            return lit, b""
        from psycopg import pq

        raw: Any = conn.connection.driver_connection
        lit = info[self.prepared_flag] = pq.Escaping(raw.pgconn).escape_literal
        return lit, self.prepare

    def begin(self, conn: Connection, params: dict[str, Any], optimistic: bool) -> Record | None:
        """BEGIN and claim (pessimistic) or read (optimistic) the key: one round trip.
        Returns the record of an earlier delivery, or None."""
        raw: Any = conn.connection.driver_connection
        lit, prepare = self._literals(conn)
        enc = raw.info.encoding
        ns, key = lit(params["ns"].encode(enc)), lit(params["k"].encode(enc))
        fp = params["fp"]
        begin = b"BEGIN"
        if raw.isolation_level is not None:  # the engine's isolation level, as psycopg would
            begin += b" ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " ").encode()
        begin += b"; "
        if optimistic:
            claim = b"".join((self.set_lock, self.execute_read, ns, b",", key, b")"))
        else:
            claim = b"".join((
                self.set_lock, self.execute_claim, ns, b",", key, b",",
                b"NULL" if fp is None else lit(fp.encode(enc)), b",",
                repr(float(params["now"])).encode(), b",", repr(float(params["exp"])).encode(),
                b")",
            ))
        try:
            try:  # PREPARE after BEGIN: an isolation level must come first; rollbacks keep it
                res = _exec(conn, begin + prepare + claim)
            except Exception as exc:
                state = getattr(exc, "sqlstate", None)
                if state == "42P05":  # prepared already (by an earlier store on this session)
                    res = _exec(conn, b"ROLLBACK; " + begin + claim)
                elif state == "26000":
                    # psycopg ran DEALLOCATE ALL (it does on its own rollbacks and after
                    # DDL): nothing ran in this transaction yet; prepare again and claim
                    res = _exec(conn, b"ROLLBACK; " + begin + self.prepare + claim)
                else:
                    raise
        except Exception as exc:
            _raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        if optimistic:
            if not res.ntuples:
                return None
            record = _record_from_text(res)
            if record.expires_at > params["now"]:  # a duplicate: end the transaction here,
                _exec(conn, b"ROLLBACK")  # through libpq (psycopg would DEALLOCATE ALL)
            return record
        if res.ntuples:
            return None
        # a duplicate: end the transaction and read the committed record in one round
        # trip, through libpq, so psycopg does not see a ROLLBACK (it would DEALLOCATE ALL)
        return self._read_after_rollback(conn, ns, key)

    def _read_after_rollback(self, conn: Connection, ns: bytes, key: bytes) -> Record:
        res = _exec(conn, b"".join((b"ROLLBACK; ", self.execute_read, ns, b",", key, b")")))
        if not res.ntuples:
            raise sa.exc.InvalidRequestError(
                "idempotency record vanished between claim and read (purged?)"
            )
        return _record_from_text(res)

    def finish(
        self, conn: Connection, params: dict[str, Any], optimistic: bool, replaces_expired: bool
    ) -> Record | None:
        """Store the result and COMMIT, one round trip. Optimistic: insert the record;
        if a concurrent delivery committed the key first, roll back and return its record."""
        raw: Any = conn.connection.driver_connection
        result = params["res"]
        lit = conn.connection.info[self.prepared_flag]
        enc = raw.info.encoding
        ns, key = lit(params["ns"].encode(enc)), lit(params["k"].encode(enc))
        hexed = b"NULL" if result is None else b"decode('" + result.hex().encode() + b"', 'hex')"
        if optimistic:
            fp = b"NULL" if params["fp"] is None else lit(params["fp"].encode(enc))
            now, exp = repr(float(params["now"])).encode(), repr(float(params["exp"])).encode()
            if self.done_prepared:
                parts = [self.execute_done, ns, b",", key, b",", fp, b",", hexed, b",", now,
                         b",", exp, b"); COMMIT"]
            else:
                parts = [self.insert_done, ns, b",", key, b",'completed',", fp, b",", hexed,
                         b",", now, b",", now, b",", exp, b"); COMMIT"]
            if replaces_expired:
                parts[:0] = [self.delete_expired, ns, b" AND key = ", key,
                             b" AND expires_at <= ", now, b"; "]
            query = b"".join(parts)
        elif result is None:
            query = b"COMMIT"
        else:
            query = b"".join((self.store_result, result.hex().encode(),
                              b"', 'hex') WHERE namespace = ", ns, b" AND key = ", key,
                              b"; COMMIT"))
        try:
            res = _exec(conn, query)
        except Exception as exc:
            state = getattr(exc, "sqlstate", None)
            if optimistic and state == "23505":  # unique_violation: a concurrent delivery won
                return self._read_after_rollback(conn, ns, key)
            if state == "26000":  # see done_prepared; the retry policy runs the attempt again
                self.done_prepared = False
                conn.connection.info.pop(self.prepared_flag, None)
            _raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        if res.command_status != b"COMMIT":  # COMMIT of a failed transaction says ROLLBACK
            raise sa.exc.InvalidRequestError(
                f"{params['ns']}: the transaction for key {params['k']!r} was rolled back "
                f"at commit ({res.command_status.decode()}); nothing was recorded"
            )
        return None


def _raise_if_lock_timeout(
    exc: BaseException, params: dict[str, Any], lock_timeout: float | None
) -> None:
    """A claim that waited lock_timeout for a concurrent delivery: `AlreadyInProgress`."""
    orig = getattr(exc, "orig", exc)  # SQLAlchemy wraps, the libpq path does not
    if getattr(orig, "sqlstate", None) == "55P03":
        raise AlreadyInProgress(
            f"{params['ns']}: key {params['k']!r} is held by a concurrent "
            f"transaction (waited {lock_timeout}s)",
            namespace=params["ns"],
            key=params["k"],
            retry_after=lock_timeout or 1.0,
        ) from exc


def _record_from_text(res: Any) -> Record:
    """The record in the first row of a libpq result in text format."""
    v = [res.get_value(0, i) for i in range(len(_COLUMNS))]

    def num(b: bytes | None) -> float | None:
        return None if b is None else float(b)

    result = v[4]
    if result is not None:  # bytea, hex output format: \x...
        result = bytes.fromhex(result[2:].decode())
    return Record(
        namespace=v[0].decode(), key=v[1].decode(), state=State(v[2].decode()),
        fingerprint=None if v[3] is None else v[3].decode(), result=result,
        token=None if v[5] is None else v[5].decode(), lease_until=num(v[6]),
        created_at=float(v[7]), completed_at=num(v[8]), expires_at=float(v[9]),
    )


def _exec(conn: Connection, query: bytes, ok_sqlstates: tuple[str, ...] = ()) -> Any:
    """Run ``query`` on the raw libpq connection; raise psycopg's error on failure."""
    import psycopg
    from psycopg import pq

    raw: Any = conn.connection.driver_connection
    res = raw.pgconn.exec_(query)
    if res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return res
    if raw.pgconn.status != pq.ConnStatus.OK:
        conn.invalidate()  # a dead connection must not go back to the pool
        raise psycopg.OperationalError("the connection to PostgreSQL was lost")
    error = psycopg.errors.error_from_result(res, encoding=raw.info.encoding)
    if error.sqlstate in ok_sqlstates:
        return res
    raise error


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
