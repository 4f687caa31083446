"""The SQL store: SQLAlchemy 2 Core on PostgreSQL (psycopg 3) and SQLite.

Two ways to use it:

* **transactional** (`SqlStore.transaction`, `SqlStore.join`): the key is claimed inside
  the transaction that carries the handler's own writes, and commits or vanishes with them;
* **lease** (`Store.claim` / `complete` / `release` / `renew`): each operation is one
  autocommit statement, for handlers whose effects live outside the database.

**Time is the store's** (rule STORE TIME of `idempotent._rules`). On PostgreSQL each
statement that needs "now" computes it once, on the database's clock: a CTE ``idem_now``
holds ``COALESCE(:now, extract(epoch FROM clock_timestamp()))``, where ``:now`` is NULL
unless a test injected a clock, and every "now" of the statement reads it (a lease claim
returns it, and the lease deadline, from the database). SQLite is embedded, on one host:
its time is the local clock, ``time.time()``, bound as ``:now``.

**The SQL text exists once.** Every statement is built here with Core (`_Statements`,
each naming the rule it implements); the fast paths run the same statements compiled for
their driver: PostgreSQL prepared statements (`_pg_fast`), SQLite qmark SQL on the
``sqlite3`` connection. Table and schema names are quoted by the dialect wherever they
appear.

**An infinite ttl** (``ttl=float("inf")``) is stored as it is: ``'Infinity'`` in
PostgreSQL's double precision, ``Inf`` in SQLite's REAL. Such a record never expires; a
purge removes it only with ``older_than``.

Round trips, on PostgreSQL with psycopg (BEGIN is sent with the first statement):
a transactional first delivery costs what a bare transaction costs, three round trips
(BEGIN+claim pipelined, the handler's statements, result+COMMIT pipelined); a duplicate
costs one. Lease claim, complete, release and renew are one statement each; a lease
claim of a key that exists writes nothing (no row lock, no transaction id). On SQLite a
lease claim reads first and writes only a new key or a claimable record.
"""

from __future__ import annotations

import hashlib
import json
import operator
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .._keys import check_text, fit
from .._record import Claimed, Outcome, Record, State, StateCount, StoreStats
from .._rules import check_fingerprint, claimable, is_takeover, outcome_of
from . import _sql_schema
from ._pg_fast import PgFastPath, raise_if_lock_timeout
from ._sql_schema import COLUMNS
from .base import DEFAULT_TTL, Store

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

_ASYNC_DRIVERS = {"aiosqlite", "asyncpg", "psycopg_async", "aiomysql", "asyncmy"}
_P = sa.bindparam
_IN_PROGRESS = State.IN_PROGRESS.value
_COMPLETED = State.COMPLETED.value
#: Where `SqlStore.join` keeps the caller's lock_timeout while it claims (PostgreSQL; a
#: custom setting, local to the transaction).
SAVED_LOCK_TIMEOUT = "idempotent.caller_lock_timeout"


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


def _const(value: str) -> Any:
    """One of our own constants (a state name) written into the SQL, not bound."""
    return sa.literal_column(f"'{value}'", sa.String)


def _pg_clock() -> Any:
    """PostgreSQL's clock in epoch seconds, double precision (``extract`` gives numeric)."""
    return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Double)


class _Statements:
    """Every statement the store runs, built once with Core and bind parameters; the
    fast paths compile these same objects for their drivers.

    Binds: ``ns``, ``k`` (the key), ``fp``, ``tok``, ``res``, ``st``; durations ``ttl``,
    ``lease``; ``now`` (STORE TIME: on PostgreSQL NULL unless a test injected a clock, the
    statement then reads the database's clock once, in the CTE ``idem_now``; elsewhere
    the local clock); ``lt`` (join's lock_timeout, ms).
    """

    def __init__(self, table: sa.Table, dialect: str) -> None:
        t = self.table = table
        self.pg = pg = dialect == "postgresql"
        upsert = _upsert_for(dialect)
        self.upsert = upsert is not None
        ns, k = _P("ns", type_=sa.String), _P("k", type_=sa.String)
        fp, tok = _P("fp", type_=sa.String), _P("tok", type_=sa.String)
        ttl, lease = _P("ttl", type_=sa.Double), _P("lease", type_=sa.Double)
        res = _P("res", type_=sa.LargeBinary)
        now_bind = _P("now", type_=sa.Double)
        cols = [t.c[c] for c in COLUMNS]
        where_key = (t.c.namespace == ns) & (t.c.key == k)
        # a plain read of the record (`Store.get`; the record a duplicate replays: REPLAY)
        self.select = sa.select(*cols).where(where_key)

        # STORE TIME: the statement's one "now"
        now_cte = (sa.select(sa.func.coalesce(now_bind, _pg_clock()).label("t"))
                   .cte("idem_now") if pg else None)
        # (SELECT t FROM idem_now): the CTE is volatile, so PostgreSQL runs it once per
        # statement and every reference reads that one row
        now: Any = now_bind if now_cte is None else sa.select(now_cte.c.t).scalar_subquery()
        # STORE TIME: the database's clock on its own (`SqlStore.now`, purge, stats)
        self.clock = sa.select(_pg_clock())

        def new_row(now: Any, state: str, **over: Any) -> dict[str, Any]:
            """A new record's columns: created now, expiring ``ttl`` later."""
            row = {
                "namespace": ns, "key": k, "state": _const(state), "fingerprint": fp,
                "result": sa.null(), "token": sa.null(), "lease_until": sa.null(),
                "created_at": now, "completed_at": now if state == _COMPLETED else sa.null(),
                "expires_at": now + ttl,
            }
            row.update(over)
            return row

        def insert_row(ins: Any, row: dict[str, Any], where: Any = None) -> Any:
            """``ins`` with ``row``: VALUES, or a SELECT of them ``where``."""
            if where is None:
                return ins.values(row)
            source = sa.select(*[v.label(c) for c, v in row.items()]).where(where)
            return ins.from_select(list(row), source)

        def claim_tx(now: Any, *returning: Any) -> Any:
            """CLAIMABLE (transactional): insert the key as completed (nobody sees it
            before COMMIT, a rollback takes it away), or take over an expired record:
            ``expires_at <= EXCLUDED.created_at``, the statement's now (STORE TIME)."""
            row = new_row(now, _COMPLETED)
            if upsert is None:  # generic SQL: insert under a savepoint, IntegrityError: "exists"
                return sa.insert(t).values(row)
            ins = insert_row(upsert(t), row)
            return ins.on_conflict_do_update(
                index_elements=[t.c.namespace, t.c.key],
                set_={c: ins.excluded[c] for c in COLUMNS[2:]},
                where=t.c.expires_at <= ins.excluded.created_at,
            ).returning(t.c.key, *returning)

        # the record and, on the store's clock, whether it expired (STORE TIME, CLAIMABLE)
        self.read = sa.select(*cols, (t.c.expires_at <= now).label("expired")).where(where_key)
        self.claim_tx = claim_tx(now)
        # CLAIMABLE: an expired record goes before its key is inserted again
        self.delete_expired = sa.delete(t).where(where_key & (t.c.expires_at <= now))
        # optimistic mode writes the record once, after the handler, with its result
        # (STORE TIME: created and completed at the statement's now)
        self.insert_done = insert_row(sa.insert(t), new_row(now, _COMPLETED, result=res))
        # the result into the row this transaction claimed; its uncommitted row lock
        # keeps every other writer out until COMMIT (FENCED by the transaction, no token)
        self.store_result = sa.update(t).where(where_key).values(result=res)

        # -- caller-owned transactions (join, record_many) on PostgreSQL: the claim alone
        # is bounded by the store's lock_timeout. The CTE sets it for the transaction
        # (set_config(..., true)) after saving the caller's value, nested so that the
        # save runs first; the RETURNING or the read that follows puts the caller's value
        # back, so the rest of the caller's transaction keeps its own setting.
        self.claim_join = self.read_join = self.many_join = None
        if pg:
            setting, saved = _const("lock_timeout"), _const(SAVED_LOCK_TIMEOUT)
            keep = sa.func.set_config(saved, sa.func.current_setting(setting), sa.true())
            lock_cte = sa.select(
                sa.func.coalesce(now_bind, _pg_clock()).label("t"),
                sa.func.set_config(setting, sa.func.concat(
                    _P("lt", type_=sa.String), sa.func.left(keep, sa.literal_column("0"))),
                    sa.true()).label("lt"),
            ).cte("idem_now")
            restore = sa.func.set_config(
                setting, sa.func.current_setting(saved), sa.true()).label("restored")
            lock_now = sa.select(lock_cte.c.t).scalar_subquery()
            self.claim_join = claim_tx(lock_now, restore)
            self.read_join = sa.select(*cols, restore).where(where_key)

        # -- record_many: one statement for a batch (CLAIMABLE, STORE TIME as claim_tx)
        self.many: Any = None
        if pg or dialect == "sqlite":
            def many(now: Any) -> Any:
                assert upsert is not None
                if pg:
                    from sqlalchemy.dialects.postgresql import ARRAY

                    keys = sa.func.unnest(sa.cast(_P("keys"), ARRAY(sa.Text))).table_valued(
                        "value").render_derived("idem_keys")
                    source = sa.select(ns.label("namespace"), keys.c.value.label("key"),
                                       _const(_COMPLETED).label("state"),
                                       now.label("created_at"), now.label("completed_at"),
                                       (now + ttl).label("expires_at")).select_from(keys)
                else:  # WHERE true: SQLite's parser needs it before ON CONFLICT
                    keys = sa.func.json_each(_P("keys", type_=sa.String)).table_valued(
                        "value").alias("idem_keys")
                    source = sa.select(ns.label("namespace"), keys.c.value.label("key"),
                                       _const(_COMPLETED).label("state"),
                                       now.label("created_at"), now.label("completed_at"),
                                       (now + ttl).label("expires_at")
                                       ).select_from(keys).where(sa.true())
                ins = upsert(t).from_select(
                    ["namespace", "key", "state", "created_at", "completed_at", "expires_at"],
                    source)
                return ins.on_conflict_do_update(
                    index_elements=[t.c.namespace, t.c.key],
                    set_={c: ins.excluded[c] for c in COLUMNS[2:]},
                    where=t.c.expires_at <= ins.excluded.created_at,
                ).returning(t.c.key)

            self.many = many(now)
            if pg:
                inserted = many(lock_now).cte("idem_ins")
                # the aggregate reads every inserted key before the outer SELECT restores
                # the caller's lock_timeout
                fresh = sa.select(sa.func.array_agg(inserted.c.key).label("fresh")).subquery(
                    "idem_fresh")
                self.many_join = sa.select(fresh.c.fresh, restore)

        # -- lease mode ------------------------------------------------------------------
        claimable_now = (t.c.expires_at <= now) | (
            (t.c.state == _const(_IN_PROGRESS)) & (t.c.lease_until <= now))
        lease_row = new_row(now, _IN_PROGRESS, token=tok, lease_until=now + lease)
        taken = {c: v for c, v in lease_row.items() if c not in ("namespace", "key")}
        self.claim_lease: Any = None
        if pg:
            # CLAIMABLE in one statement that writes only a new key or a claimable record:
            # a duplicate (a live lease, a completed record) is read, never locked, and
            # takes no transaction id. The UPDATE takes over only the version it read
            # (same token and state), so ``taken_over`` describes the record replaced;
            # a concurrent claim that changed it first leaves no row here (look again).
            assert upsert is not None and now_cte is not None
            cur = sa.select(*cols).where(where_key).cte("idem_cur")
            ins = insert_row(upsert(t), lease_row, ~sa.exists(sa.select(1).select_from(cur)))
            ins = ins.on_conflict_do_nothing(index_elements=[t.c.namespace, t.c.key])
            ins = ins.returning(t.c.lease_until).cte("idem_ins")
            upd = (
                sa.update(t)
                .where(where_key & t.c.token.is_not_distinct_from(cur.c.token)
                       & (t.c.state == cur.c.state) & claimable_now)
                .values(taken)
                .returning(t.c.lease_until, (
                    (cur.c.state == _const(_IN_PROGRESS)) & (cur.c.expires_at > now)
                    & cur.c.token.is_distinct_from(tok)).label("taken_over"))
                .cte("idem_upd")
            )
            self.claim_lease = sa.select(
                now_cte.c.t,
                sa.select(ins.c.lease_until).scalar_subquery(),
                sa.select(upd.c.lease_until).scalar_subquery(),
                sa.select(upd.c.taken_over).scalar_subquery(),
                *cur.c,
            ).select_from(now_cte.outerjoin(cur, sa.true()))
        # SQLite and generic SQL (one writer at a time, local clock): read first; write
        # only a new key (CLAIMABLE: absent) ...
        new_lease = insert_row(upsert(t) if upsert is not None else sa.insert(t), lease_row)
        self.insert_lease = (new_lease.on_conflict_do_nothing().returning(t.c.key)
                             if upsert is not None else new_lease)
        # ... or take over the claimable record read, only if it is still that version
        self.takeover = (
            sa.update(t)
            .where(where_key & t.c.token.is_not_distinct_from(_P("seen_tok", type_=sa.String))
                   & (t.c.state == _P("seen_st", type_=sa.String)) & claimable_now)
            .values(taken)
        )
        owned = where_key & (t.c.token == tok)
        # FENCED: only while the token owns the key; STORE TIME: completed and expiring on
        # the statement's now
        self.complete = sa.update(t).where(owned).values(
            state=_P("st", type_=sa.String), result=res, lease_until=sa.null(),
            completed_at=sa.func.coalesce(t.c.completed_at, now), expires_at=now + ttl,
        )
        in_progress = owned & (t.c.state == _const(_IN_PROGRESS))
        # FENCED: only an in-progress record the token owns
        self.release = sa.delete(t).where(in_progress)
        # FENCED; STORE TIME: the new deadline is the statement's now + lease
        renew = sa.update(t).where(in_progress).values(lease_until=now + lease)
        self.renew = renew.returning(t.c.lease_until) if pg else renew


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
    ``lock_timeout``, also in a caller's own transaction, for the claim alone; SQLite's
    busy timeout for engines made from a URL), after which it raises `AlreadyInProgress`.
    ``fast_path=False`` turns off the fast paths (PostgreSQL: prepared statements sent
    straight to libpq, for connection poolers such as PgBouncer in transaction mode, which
    do not keep prepared statements between transactions; SQLite: the optimistic path's
    statements on the ``sqlite3`` connection). ``clock`` is for tests only: without it,
    time is the database's on PostgreSQL and the local clock on SQLite (rule STORE TIME).
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
        self._lock_ms = None if lock_timeout is None else str(max(1, int(lock_timeout * 1000)))
        self.metadata = _sql_schema.new_metadata(schema)
        self.table = _sql_schema.records_table(self.metadata, table)
        # Kafka consumers' positions (idempotent.integrations.kafka): same schema, so
        # create_schema()/drop_schema() and the migrations cover it
        self.positions = _sql_schema.positions_table(self.metadata)
        # messages staged for after COMMIT (idempotent.outbox)
        self.outbox = _sql_schema.outbox_table(self.metadata)
        self.dialect = self.engine.dialect.name
        self._fast_path = fast_path  # also read by the async PostgreSQL path, built lazily
        self._st = _Statements(self.table, self.dialect)
        self._db_time = self._st.pg  # STORE TIME: the database's clock (else the local one)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite is in-process: a bare transaction takes ~50 µs, so SQLAlchemy's ~25 µs per
        # statement is most of what the store adds; the optimistic path's two statements go
        # to the sqlite3 connection directly: the same Core statements, compiled (qmark)
        self._fast_sqlite = (
            fast_path
            and self.dialect == "sqlite"
            and self.engine.dialect.driver == "pysqlite"
            and self.async_engine is None
        )
        if self._fast_sqlite:
            self._sqlite_read = _qmark(self._st.read, self.engine.dialect)
            self._sqlite_done = _qmark(self._st.insert_done, self.engine.dialect)
        self._fast_pg = (
            fast_path
            and self.dialect == "postgresql"
            and self.engine.dialect.driver == "psycopg"
            and self.async_engine is None
        )
        if self._fast_pg:
            st = self._st
            self._pg = PgFastPath(read=st.read, claim=st.claim_tx, done=st.insert_done,
                                  store_result=st.store_result,
                                  delete_expired=st.delete_expired, lock_timeout=lock_timeout)

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
                    f"async engines need extra packages: pip install 'idempotent-py[async]' ({exc})"
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

    # -- time ------------------------------------------------------------------------------
    def _now(self) -> float:
        """STORE TIME: the database's clock on PostgreSQL (one round trip), the local
        clock elsewhere."""
        if not self._db_time:
            return time.time()
        with self._autocommit.connect() as conn:
            return float(conn.execute(self._st.clock).scalar_one())

    def _stmt_now(self, now: float | None = None) -> float | None:
        """The ``:now`` bound to a statement: the injected test clock's time; otherwise
        None on PostgreSQL (the statement reads the database's clock), the local clock
        elsewhere (rule STORE TIME)."""
        if now is not None:
            return now
        clock = self.clock
        if clock is not None:
            return clock()
        return None if self._db_time else time.time()

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
        """Rule CLAIMABLE (see `Store._claim`); a duplicate writes nothing."""
        params = {"ns": namespace, "k": key, "fp": fingerprint, "tok": token,
                  "now": self._stmt_now(now), "lease": lease, "ttl": ttl}
        with self._autocommit.connect() as conn:
            if self._st.claim_lease is not None:
                return self._claim_in_one(conn, params, token)
            return self._claim_in_steps(conn, params, token)

    def _claim_in_one(self, conn: Connection, params: dict[str, Any], token: str
                      ) -> Outcome | None:
        """PostgreSQL: one statement (`_Statements.claim_lease`), the database's now."""
        row = conn.execute(self._st.claim_lease, params).one()
        now, inserted, updated, taken_over = row[0], row[1], row[2], row[3]
        if inserted is not None:
            return Claimed(token, inserted)
        if updated is not None:
            return Claimed(token, updated, bool(taken_over))
        if row[5] is None:  # absent when read, inserted by a concurrent claim: look again
            return None
        record = _to_record(row[4:])
        if claimable(record, now):  # a concurrent claim changed it first: look again
            return None
        return outcome_of(record, token, now)

    def _claim_in_steps(self, conn: Connection, params: dict[str, Any], token: str
                        ) -> Outcome | None:
        """SQLite and generic SQL: read, then write only a new key or a claimable
        record (one writer at a time; the write re-checks what was read)."""
        now = params["now"]
        record = self._select(conn, params["ns"], params["k"])
        if record is None:
            if self._insert(conn, self._st.insert_lease, params):
                return Claimed(token, now + params["lease"])
            return None  # inserted by a concurrent claim meanwhile: look again
        if not claimable(record, now):
            return outcome_of(record, token, now)
        seen = {**params, "seen_tok": record.token, "seen_st": record.state.value}
        if conn.execute(self._st.takeover, seen).rowcount != 1:
            return None  # changed by a concurrent claim meanwhile: look again
        return Claimed(token, now + params["lease"],
                       is_takeover(record, now) and record.token != token)

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
        """Rule FENCED; STORE TIME (`_Statements.complete`)."""
        params = {
            "ns": namespace, "k": key, "tok": token, "st": state.value,
            "res": result, "now": self._stmt_now(now), "ttl": ttl,
        }
        with self._autocommit.connect() as conn:
            return conn.execute(self._st.complete, params).rowcount == 1

    def _release(self, namespace: str, key: str, token: str) -> bool:
        """Rule FENCED (`_Statements.release`)."""
        with self._autocommit.connect() as conn:
            params = {"ns": namespace, "k": key, "tok": token}
            return conn.execute(self._st.release, params).rowcount == 1

    # -- wait= (rule WAKE): PostgreSQL LISTEN/NOTIFY ------------------------------------------
    def _channel(self, namespace: str, key: str) -> str | None:
        """The NOTIFY channel of a key (an identifier under 63 bytes), None where this
        store has no signal (not PostgreSQL with psycopg)."""
        if self.dialect != "postgresql" or self.engine.dialect.driver != "psycopg":
            return None
        digest = hashlib.sha1(
            f"{self.table.name}\x00{namespace}\x00{key}".encode("utf-8", "surrogatepass"))
        return "idem_" + digest.hexdigest()

    def signal_change(self, namespace: str, key: str) -> None:
        """Rule WAKE on PostgreSQL: ``pg_notify`` the key's channel (one autocommit
        round trip), after a complete or a release of a handler that has ``wait=``:
        so only those pay for it (a NOTIFY serializes the commits that send one)."""
        channel = self._channel(namespace, key)
        if channel is None:
            return
        with self._autocommit.connect() as conn:
            conn.execute(sa.select(sa.func.pg_notify(channel, "")))

    def wait_change(self, namespace: str, key: str, timeout: float) -> bool | None:
        """Rule WAKE on PostgreSQL: ``LISTEN`` on the key's channel, read the record once
        (a change before the LISTEN is not missed), then wait up to ``timeout`` for a
        notification (`signal_change`). The connection is discarded afterwards, so no
        pooled connection keeps listening. None (poll) on other databases."""
        channel = self._channel(namespace, key)
        if channel is None:
            return None
        conn = self._autocommit.connect()
        try:
            conn.exec_driver_sql(f"LISTEN {channel}")
            record = self._get(namespace, key)
            if record is None or record.state is not State.IN_PROGRESS:
                return True
            raw: Any = conn.connection.driver_connection
            if self.async_engine is None:
                return any(True for _ in raw.notifies(timeout=timeout, stop_after=1))
            from sqlalchemy.util import await_only

            return bool(await_only(_first_notify(raw, timeout)))
        finally:
            conn.invalidate()
            conn.close()

    def _renew(
        self, namespace: str, key: str, token: str, now: float | None, lease: float
    ) -> float | None:
        """Rule FENCED; STORE TIME: the deadline comes back from PostgreSQL."""
        params: dict[str, Any] = {"ns": namespace, "k": key, "tok": token,
                                  "now": self._stmt_now(now), "lease": lease}
        with self._autocommit.connect() as conn:
            if self._db_time:
                until = conn.execute(self._st.renew, params).scalar()
                return None if until is None else float(until)
            if conn.execute(self._st.renew, params).rowcount != 1:
                return None
            return float(params["now"]) + lease

    def _get(self, namespace: str, key: str) -> Record | None:
        with self._autocommit.connect() as conn:
            return self._select(conn, namespace, key)

    def _select(self, conn: Connection, namespace: str, key: str) -> Record | None:
        row = conn.execute(self._st.select, {"ns": namespace, "k": key}).first()
        return None if row is None else _to_record(row)

    def _read(self, conn: Connection, params: dict[str, Any]) -> tuple[Record | None, bool]:
        """The record and whether it expired, on the store's clock (STORE TIME)."""
        row = conn.execute(self._st.read, params).first()
        return (None, False) if row is None else (_to_record(row), bool(row[10]))

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
        """Rule PURGEABLE, one autocommit DELETE per batch; ``now`` is the store's (the
        database's clock on PostgreSQL, read by `Store.purge`). PostgreSQL: the batch is
        picked with ``FOR UPDATE SKIP LOCKED``, so rows a worker (or another purge) holds
        are skipped, and a row a worker took over meanwhile is checked again once locked;
        SQLite runs one writer at a time, so each statement sees the rows as they are."""
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
        """Counts per namespace and state; ``expired``: past ``expires_at`` at the store's
        ``now`` (STORE TIME, read by `Store.stats`)."""
        t = self.table
        expired = sa.func.sum(sa.case((t.c.expires_at <= _P("now"), 1), else_=0))
        counts = (
            sa.select(t.c.namespace, t.c.state, sa.func.count(), expired)
            .group_by(t.c.namespace, t.c.state)
            .order_by(t.c.namespace, t.c.state)
        )
        oldest = (
            sa.select(*[t.c[c] for c in COLUMNS])
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
        record from ``tx.commit``. Whether a record expired is decided on the store's
        clock (rule STORE TIME); ``ttl`` may be infinite.
        """
        conn = self.engine.connect()
        try:
            conn.begin()
            params = {"ns": namespace, "k": key, "fp": fingerprint, "now": self._stmt_now(),
                      "ttl": ttl}
            fast = self._pg if self._fast_pg else self._async_fast()
            if fast is not None:
                existing, expired = fast.begin(conn, params, optimistic)
            elif optimistic and self._fast_sqlite:
                sql, args = self._sqlite_read
                row = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                    sql, args(params)).fetchone()
                existing, expired = (None, False) if row is None else (
                    _to_record(row), bool(row[10]))
            elif optimistic:
                existing, expired = self._read(conn, params)
            else:
                self._set_lock_timeout(conn)
                existing, expired = self._claim_in(conn, params), False
            tx = Transaction(self, conn, namespace, key, None if expired else existing,
                             owner=True, params=params, optimistic=optimistic,
                             replaces_expired=expired, fast=fast)
            yield tx
        finally:
            conn.close()  # rolls back whatever was not committed

    def _async_fast(self) -> PgFastPath | None:
        """The PostgreSQL fast path for an async psycopg engine, built on first use: the
        sync fast path's round trips (``BEGIN; claim`` and ``store the result; COMMIT``,
        one each), its statements inlined rather than prepared (so poolers that drop
        prepared statements are safe too), sent without blocking the event loop."""
        try:
            return self.__dict__["_pg_async"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        fast = None
        if (self._fast_path and self.async_engine is not None
                and self.dialect == "postgresql" and self.engine.dialect.driver == "psycopg"):
            st = self._st
            fast = PgFastPath(read=st.read, claim=st.claim_tx, done=st.insert_done,
                              store_result=st.store_result, delete_expired=st.delete_expired,
                              lock_timeout=self.lock_timeout, asynchronous=True)
        self.__dict__["_pg_async"] = fast
        return fast

    def _set_lock_timeout(self, conn: Connection) -> None:
        """Bound the wait for a concurrent delivery's key (PostgreSQL; SQLite engines made
        from a URL have it as their busy timeout)."""
        if self.dialect == "postgresql" and self._lock_ms is not None:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {self._lock_ms}")

    def join(
        self, session: Session | Connection, namespace: str, key: str,
        fingerprint: str | None, ttl: float = DEFAULT_TTL,
    ) -> Transaction:
        """Claim ``key`` inside the caller's own transaction; never commits.

        On PostgreSQL the claim waits at most ``lock_timeout`` for a concurrent
        transaction holding the key (then `AlreadyInProgress`; the caller's transaction
        is then aborted, as after any failed statement); the caller's own lock_timeout
        is back in force once the claim returns."""
        conn = session.connection() if isinstance(session, Session) else session
        params = {"ns": namespace, "k": key, "fp": fingerprint, "now": self._stmt_now(),
                  "ttl": ttl}
        existing = self._claim_in(conn, params, joined=True)
        return Transaction(self, conn, namespace, key, existing, owner=False, session=session,
                           params=params)

    def _claim_in(self, conn: Connection, params: dict[str, Any], *, joined: bool = False
                  ) -> Record | None:
        """The transactional claim (rule CLAIMABLE, `_Statements.claim_tx`); the record
        of an earlier delivery, or None when the key is now ours."""
        claim: Any = self._st.claim_tx
        read: Any = self._st.read
        if joined and self._st.claim_join is not None and self._lock_ms is not None:
            claim, read = self._st.claim_join, self._st.read_join
            params = {**params, "lt": self._lock_ms}
        try:
            if self._insert(conn, claim, params):
                return None
            row = conn.execute(read, params).first()
        except sa.exc.DBAPIError as exc:
            raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        if row is None:
            raise sa.exc.InvalidRequestError(
                "idempotency record vanished between claim and read (purged?)"
            )
        return _to_record(row)

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
        `IdempotencyKeyConflict`; a key or namespace no store can hold exactly (a NUL, a
        lone surrogate) raises `InvalidIdempotencyKey` before anything is written. A
        concurrent transaction holding the same key makes this wait until it ends, on
        PostgreSQL at most ``lock_timeout`` (then `AlreadyInProgress`). With an async
        session or connection, await the result.
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
        check_text("namespace", namespace)
        check_text("key", key)
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

        Same transaction rules as `record` (on PostgreSQL the statement waits at most
        ``lock_timeout`` for keys concurrent transactions hold). Keys repeated inside the
        batch count once.
        """
        sync, is_async = _sync_handle(session)
        if is_async:
            from sqlalchemy.util import greenlet_spawn

            return greenlet_spawn(self._record_many, sync, namespace, keys, ttl)
        return self._record_many(sync, namespace, keys, ttl)

    def _record_many(
        self, session: Session | Connection, namespace: str, keys: Iterable[str], ttl: float
    ) -> set[str]:
        check_text("namespace", namespace)
        stored = {}
        for k in keys:  # every key checked before anything is written
            check_text("key", k)
            stored[fit(k)] = k
        if not stored:
            return set()
        conn = session.connection() if isinstance(session, Session) else session
        now = self._stmt_now()
        st = self._st
        if st.many is None:  # generic SQL: one claim per key
            new = set()
            for k, original in stored.items():
                params = {"ns": namespace, "k": k, "fp": None, "now": now, "ttl": ttl}
                if self._insert(conn, st.claim_tx, params):
                    new.add(original)
            return new
        batch: Any = list(stored)
        params = {"ns": namespace, "keys": json.dumps(batch) if self.dialect == "sqlite"
                  else batch, "now": now, "ttl": ttl}
        try:
            if st.many_join is not None and self._lock_ms is not None:
                fresh = conn.execute(st.many_join, {**params, "lt": self._lock_ms}
                                     ).one()[0] or []
            else:
                fresh = conn.execute(st.many, params).scalars().all()
        except sa.exc.DBAPIError as exc:
            raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        return {stored[k] for k in fresh}


#: Where `idempotent.outbox` keeps what was staged on a connection or session.
_OUTBOX_STAGED = "idempotent.outbox.staged"


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
        fast: PgFastPath | None = None,
    ) -> None:
        self.store = store
        self._fast = fast
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
        fast = self._fast
        root = conn.get_transaction()
        if self._owner and fast is not None:
            lost = fast.finish(conn, params, self._optimistic, self._replaces_expired)
            if lost is None:
                self._after_commit(root)
            return lost
        if self._optimistic:
            store._set_lock_timeout(conn)
            try:  # no savepoint: on failure the whole transaction goes anyway
                if self._replaces_expired:
                    conn.execute(store._st.delete_expired, params)
                if self._owner and store._fast_sqlite:
                    sql, args = store._sqlite_done
                    conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                        sql, args(params))
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
            assert root is not None
            root.commit()
            self._after_commit(root)
        return None

    def _after_commit(self, root: Any) -> None:
        """Messages the handler staged in the outbox on this transaction are published now
        that it committed (idempotent.outbox; a dict lookup when there are none)."""
        session = self._session
        if _OUTBOX_STAGED in self.connection.info or (
                session is not None and _OUTBOX_STAGED in session.info):
            from ..outbox import after_commit

            after_commit(self.connection, session, root)


async def _first_notify(raw: Any, timeout: float) -> bool:
    """Whether an asyncio psycopg connection got a notification within ``timeout``."""
    async for _ in raw.notifies(timeout=timeout, stop_after=1):
        return True
    return False


def _qmark(stmt: Any, dialect: sa.Dialect) -> tuple[str, Callable[[dict[str, Any]], Any]]:
    """``stmt`` compiled for the sqlite3 driver: its SQL, and a function picking its
    arguments out of the params in ``?`` order (a tuple)."""
    compiled = stmt.compile(dialect=dialect)
    names = compiled.positiontup
    assert names is not None and len(names) > 1
    return str(compiled), operator.itemgetter(*names)


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
