"""The PostgreSQL fast path of `SqlStore`: psycopg 3, sync engines.

Statements go straight to libpq (``pgconn.exec_``) so that ``BEGIN`` and ``COMMIT`` travel
with the store's own statements; see `PgFastPath`.

No SQL is written here. The statements are the store's Core statements (built once, in
``sql._Statements``) compiled for PostgreSQL with numbered placeholders (`Compiled`): the
ones prepared once per connection are ``PREPARE name (<the binds' types>) AS <that SQL>``
and run as ``EXECUTE name(<literals>)``; the others are that SQL with the literals put in
the placeholders' places. Literals are quoted by libpq (``escape_literal``), bytes are
hex-encoded and floats written by Python (``'Infinity'`` for an infinite ttl): nothing is
spliced in raw.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from .._record import Record, State
from ..exceptions import AlreadyInProgress
from ._sql_schema import COLUMNS

#: The dialect the fast path compiles for: PostgreSQL with ``$1, $2, …`` placeholders.
DIALECT: sa.Dialect = postgresql.dialect(  # type: ignore[no-untyped-call]
    paramstyle="numeric_dollar")
_PLACEHOLDER = re.compile(r"\$(\d+)")
_INF = float("inf")

Literal = Callable[[Any], bytes]


class Compiled:
    """A Core statement compiled for PostgreSQL with numbered placeholders.

    ``sql`` is its text, ``names`` its bind parameters in placeholder order (``$1`` is
    ``names[0]``; a name used twice is one placeholder), ``types`` their PostgreSQL types
    (for ``PREPARE``). `inline` gives the statement with literal arguments in place.
    """

    def __init__(self, stmt: Any, dialect: sa.Dialect = DIALECT) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql: str = str(compiled).strip()
        names = compiled.positiontup
        assert names is not None, "compiled without positional placeholders"
        self.names = tuple(names)
        # the params in placeholder order, as a tuple (itemgetter of one name is no tuple)
        self._pick: Callable[[Mapping[str, Any]], Any] = (
            operator.itemgetter(*self.names) if len(self.names) > 1
            else lambda params: tuple(params[n] for n in self.names))
        types = dialect.type_compiler_instance
        self.types = tuple(types.process(compiled.binds[n].type) for n in self.names)
        parts = _PLACEHOLDER.split(self.sql)
        self._texts = [p.encode() for p in parts[0::2]]
        self._slots = [int(i) - 1 for i in parts[1::2]]

    def args(self, lit: Literal, params: Mapping[str, Any]) -> list[bytes]:
        """The literals of ``params``, in placeholder order."""
        return list(map(lit, self._pick(params)))

    def inline(self, args: list[bytes]) -> bytes:
        """The statement with ``args`` (from `args`) in place of its placeholders."""
        texts = self._texts
        out = [texts[0]]
        for slot, text in zip(self._slots, texts[1:], strict=True):
            out.append(args[slot])
            out.append(text)
        return b"".join(out)


def literal_quoter(escape: Callable[[bytes], bytes], encoding: str) -> Literal:
    """A function rendering one Python value as a PostgreSQL literal: text quoted by
    libpq's ``escape``, bytes hex-encoded, floats (and ±infinity) by value, None as NULL."""

    def lit(value: Any) -> bytes:
        if value is None:
            return b"NULL"
        if isinstance(value, str):
            return escape(value.encode(encoding))
        if isinstance(value, (bytes, bytearray, memoryview)):
            return b"decode('" + bytes(value).hex().encode() + b"', 'hex')"
        number = float(value)
        if number != number:
            raise ValueError("NaN is not a time or a duration")
        if number in (_INF, -_INF):  # repr() gives inf, which SQL reads as a column name
            return b"'Infinity'::float8" if number > 0 else b"'-Infinity'::float8"
        return repr(number).encode()

    return lit


class PgFastPath:
    """The psycopg fast path: a transaction in the round trips of a bare one.

    psycopg would send BEGIN on its own before the claim, and the result UPDATE and the
    COMMIT would be two more round trips; on loopback each costs about a tenth of a small
    transaction. So ``BEGIN; claim`` (or ``BEGIN; read``) and ``store the result; COMMIT``
    each go to libpq as one simple query. The claim, the read and the optimistic insert
    are prepared once per connection (SQL ``PREPARE``), so the server does not plan them
    again for every message. psycopg reads the transaction status from libpq, so it sends
    no BEGIN of its own for the handler's statements, and its COMMIT afterwards is a no-op.

    Statements (the store's Core statements, see ``sql._Statements``): ``read`` (the
    record and whether it expired, rule STORE TIME), ``claim`` (the transactional claim,
    rules CLAIMABLE and STORE TIME), ``done`` (the optimistic insert with the result,
    STORE TIME), ``store_result`` and ``delete_expired`` (CLAIMABLE: only an expired
    record).
    """

    def __init__(
        self, *, read: Any, claim: Any, done: Any, store_result: Any, delete_expired: Any,
        lock_timeout: float | None, asynchronous: bool = False,
    ) -> None:
        # asynchronous (an async engine's psycopg AsyncConnection): the same statements,
        # inlined instead of prepared, sent through libpq's non-blocking calls and
        # awaited on the event loop (a claim waiting on a row lock must not block it)
        self.prepared = not asynchronous
        self._run: Callable[[Connection, bytes], Any] = _exec_async if asynchronous else _exec
        self.read, self.claim, self.done = Compiled(read), Compiled(claim), Compiled(done)
        self.store_result, self.delete_expired = Compiled(store_result), Compiled(
            delete_expired)
        prepared = (("read", self.read), ("claim", self.claim), ("done", self.done))
        # the names carry a digest of the SQL: one name is one text, on every connection
        digest = hashlib.sha1(
            "\n".join(c.sql for _, c in prepared).encode()).hexdigest()[:12]
        names = {what: f"idem_{what}_{digest}" for what, _ in prepared}
        self.prepared_flag = f"idempotent_prepared_{digest}"
        self.prepare = "".join(
            f"PREPARE {names[what]} ({', '.join(c.types)}) AS {c.sql}; "
            for what, c in prepared
        ).encode()
        self.execute_read, self.execute_claim, self.execute_done = (
            f"EXECUTE {names[what]}(".encode() for what in ("read", "claim", "done"))
        # The optimistic insert runs after the handler: if psycopg dropped our prepared
        # statements meanwhile (DEALLOCATE ALL, on a rollback of its own or after DDL), the
        # transaction is lost and the attempt is retried; from then on this store inserts
        # with the same statement, not prepared, so a handler that triggers that cannot
        # fail again. (store_result and delete_expired are never prepared, for the same
        # reason: a transaction that lost its prepared statement would be lost with it;
        # the claim, first in line, can recover.)
        self.done_prepared = self.prepared
        ms = None if lock_timeout is None else max(1, int(lock_timeout * 1000))
        # A concurrent delivery of the same key waits at most lock_timeout: pessimistic, it
        # is set with the claim and holds for the whole transaction (the handler's own lock
        # waits included); optimistic, it is set just before the record's insert, so it
        # bounds the wait on the key and nothing of the handler's.
        self.set_lock = b"" if ms is None else f"SET LOCAL lock_timeout = {ms}; ".encode()
        self.lock_timeout = lock_timeout

    def _literals(self, conn: Connection) -> tuple[Literal, bytes]:
        """The literal quoting of this connection, and whether (b"" or the PREPARE
        statements) the connection still needs our statements prepared."""
        info = conn.connection.info
        lit = info.get(self.prepared_flag)
        if lit is not None:
            return lit, b""
        from psycopg import pq

        raw: Any = conn.connection.driver_connection
        lit = info[self.prepared_flag] = literal_quoter(
            pq.Escaping(raw.pgconn).escape_literal, raw.info.encoding)
        return lit, self.prepare if self.prepared else b""

    def begin(
        self, conn: Connection, params: dict[str, Any], optimistic: bool
    ) -> tuple[Record | None, bool]:
        """BEGIN and claim (pessimistic) or read (optimistic) the key: one round trip.
        Returns the record of an earlier delivery (or None) and whether it expired."""
        raw: Any = conn.connection.driver_connection
        lit, prepare = self._literals(conn)
        begin = b"BEGIN"
        if raw.isolation_level is not None:  # the engine's isolation level, as psycopg would
            begin += b" ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " ").encode()
        begin += b"; "
        if not self.prepared:
            stmt = (self.read.inline(self.read.args(lit, params)) if optimistic
                    else self.set_lock + self.claim.inline(self.claim.args(lit, params)))
        elif optimistic:
            stmt = b"".join((self.execute_read, b",".join(self.read.args(lit, params)), b")"))
        else:
            stmt = b"".join((self.set_lock, self.execute_claim,
                             b",".join(self.claim.args(lit, params)), b")"))
        run = self._run
        try:
            try:  # PREPARE after BEGIN: an isolation level must come first; rollbacks keep it
                res = run(conn, begin + prepare + stmt)
            except Exception as exc:
                state = getattr(exc, "sqlstate", None)
                if state == "42P05" and self.prepared:  # prepared already (an earlier store)
                    res = run(conn, b"ROLLBACK; " + begin + stmt)
                elif state == "26000" and self.prepared:
                    # psycopg ran DEALLOCATE ALL (it does on its own rollbacks and after
                    # DDL): nothing ran in this transaction yet; prepare again and claim
                    res = run(conn, b"ROLLBACK; " + begin + self.prepare + stmt)
                else:
                    raise
        except Exception as exc:
            raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        if optimistic:
            if not res.ntuples:
                return None, False
            record, expired = _record_from_text(res)
            if not expired:  # a duplicate: end the transaction here,
                run(conn, b"ROLLBACK")  # through libpq (psycopg would DEALLOCATE ALL)
            return record, expired
        if res.ntuples:
            return None, False
        # a duplicate: end the transaction and read the committed record in one round
        # trip, through libpq, so psycopg does not see a ROLLBACK (it would DEALLOCATE ALL).
        # The claim decided it was live (CLAIMABLE); a read a moment later does not overrule.
        return self._read_after_rollback(conn, lit, params)[0], False

    def _read_after_rollback(
        self, conn: Connection, lit: Literal, params: dict[str, Any]
    ) -> tuple[Record, bool]:
        args = self.read.args(lit, params)
        read = (b"".join((self.execute_read, b",".join(args), b")")) if self.prepared
                else self.read.inline(args))
        res = self._run(conn, b"ROLLBACK; " + read)
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
        lit: Literal = conn.connection.info[self.prepared_flag]
        if optimistic:
            args = self.done.args(lit, params)
            if self.done_prepared:
                insert = b"".join((self.execute_done, b",".join(args), b")"))
            else:
                insert = self.done.inline(args)
            parts = [self.set_lock]
            if replaces_expired:
                parts += [self.delete_expired.inline(self.delete_expired.args(lit, params)),
                          b"; "]
            query = b"".join((*parts, insert, b"; COMMIT"))
        elif params["res"] is None:
            query = b"COMMIT"
        else:
            query = self.store_result.inline(self.store_result.args(lit, params)) + b"; COMMIT"
        try:
            res = self._run(conn, query)
        except Exception as exc:
            state = getattr(exc, "sqlstate", None)
            if optimistic and state == "23505":  # unique_violation: a concurrent delivery won
                return self._read_after_rollback(conn, lit, params)[0]
            if state == "26000":  # see done_prepared; the retry policy runs the attempt again
                self.done_prepared = False
                conn.connection.info.pop(self.prepared_flag, None)
            raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        if res.command_status != b"COMMIT":  # COMMIT of a failed transaction says ROLLBACK
            raise sa.exc.InvalidRequestError(
                f"{params['ns']}: the transaction for key {params['k']!r} was rolled back "
                f"at commit ({res.command_status.decode()}); nothing was recorded"
            )
        return None


def raise_if_lock_timeout(
    exc: BaseException, params: Mapping[str, Any], lock_timeout: float | None
) -> None:
    """A claim that waited lock_timeout for a concurrent delivery: `AlreadyInProgress`."""
    orig = getattr(exc, "orig", exc)  # SQLAlchemy wraps, the libpq path does not
    if getattr(orig, "sqlstate", None) == "55P03":
        key = params.get("k")
        raise AlreadyInProgress(
            f"{params['ns']}: key {key!r} is held by a concurrent "
            f"transaction (waited {lock_timeout}s)",
            namespace=params["ns"],
            key=key,
            retry_after=lock_timeout or 1.0,
        ) from exc


def _record_from_text(res: Any) -> tuple[Record, bool]:
    """The record in the first row of a libpq result in text format (the columns of
    `COLUMNS`, then whether it expired)."""
    v = [res.get_value(0, i) for i in range(len(COLUMNS) + 1)]

    def num(b: bytes | None) -> float | None:
        return None if b is None else float(b)

    result = v[4]
    if result is not None:  # bytea, hex output format: \x...
        result = bytes.fromhex(result[2:].decode())
    record = Record(
        namespace=v[0].decode(), key=v[1].decode(), state=State(v[2].decode()),
        fingerprint=None if v[3] is None else v[3].decode(), result=result,
        token=None if v[5] is None else v[5].decode(), lease_until=num(v[6]),
        created_at=float(v[7]), completed_at=num(v[8]), expires_at=float(v[9]),
    )
    return record, v[10] == b"t"


def _exec(conn: Connection, query: bytes) -> Any:
    """Run ``query`` on the raw libpq connection; raise psycopg's error on failure."""
    raw: Any = conn.connection.driver_connection
    return _checked(conn, raw, raw.pgconn.exec_(query))


def _exec_async(conn: Connection, query: bytes) -> Any:
    """`_exec` for an asyncio psycopg connection: ``query`` sent with libpq's
    non-blocking calls and awaited on the event loop (inside the greenlet bridge, with
    ``await_only``); the last statement's result, as ``exec_`` gives."""
    from psycopg import pq
    from psycopg.generators import execute
    from sqlalchemy.util import await_only

    raw: Any = conn.connection.driver_connection
    try:
        raw.pgconn.send_query(query)
        results = await_only(raw.wait(execute(raw.pgconn)))
    except Exception:
        if raw.pgconn.status != pq.ConnStatus.OK:
            _lost(conn)
        raise
    return _checked(conn, raw, results[-1])


def _checked(conn: Connection, raw: Any, res: Any) -> Any:
    import psycopg
    from psycopg import pq

    if res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return res
    if raw.pgconn.status != pq.ConnStatus.OK:
        _lost(conn)
    raise psycopg.errors.error_from_result(res, encoding=raw.info.encoding)


def _lost(conn: Connection) -> NoReturn:
    """The connection died under a statement: invalidate it (and the pool), raise."""
    import psycopg

    lost = psycopg.OperationalError("the connection to PostgreSQL was lost")
    # As SQLAlchemy does on a disconnect: the server restarted (or dropped us), so
    # every connection pooled before now is suspect. Invalidating the pool makes
    # them reconnect on checkout; invalidating only this one would let each retry
    # draw another dead connection.
    invalidate_pool = getattr(conn.engine.pool, "_invalidate", None)
    if invalidate_pool is not None:
        invalidate_pool(conn.connection, lost)
    conn.invalidate()  # a dead connection must not go back to the pool
    raise lost
