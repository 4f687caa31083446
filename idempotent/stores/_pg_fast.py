"""The PostgreSQL fast path of `SqlStore`: psycopg 3, sync engines.

Statements go straight to libpq (``pgconn.exec_``) so that ``BEGIN`` and ``COMMIT`` travel
with the store's own statements; see `PgFastPath`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .._record import Record, State
from ..exceptions import AlreadyInProgress
from ._sql_schema import COLUMNS


class PgFastPath:
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
            f"PREPARE {read} (text, text) AS SELECT {', '.join(COLUMNS)} FROM {t} "
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
        # A concurrent delivery of the same key waits at most lock_timeout: pessimistic, it
        # is set with the claim and holds for the whole transaction (the handler's own lock
        # waits included); optimistic, it is set just before the record's insert, so it
        # bounds the wait on the key and nothing of the handler's.
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
            claim = b"".join((self.execute_read, ns, b",", key, b")"))
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
            raise_if_lock_timeout(exc, params, self.lock_timeout)
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
                parts = [self.set_lock, self.execute_done, ns, b",", key, b",", fp, b",",
                         hexed, b",", now, b",", exp, b"); COMMIT"]
            else:
                parts = [self.set_lock, self.insert_done, ns, b",", key, b",'completed',", fp,
                         b",", hexed, b",", now, b",", now, b",", exp, b"); COMMIT"]
            if replaces_expired:
                parts[1:1] = [self.delete_expired, ns, b" AND key = ", key,
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
            raise_if_lock_timeout(exc, params, self.lock_timeout)
            raise
        if res.command_status != b"COMMIT":  # COMMIT of a failed transaction says ROLLBACK
            raise sa.exc.InvalidRequestError(
                f"{params['ns']}: the transaction for key {params['k']!r} was rolled back "
                f"at commit ({res.command_status.decode()}); nothing was recorded"
            )
        return None


def raise_if_lock_timeout(
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
    v = [res.get_value(0, i) for i in range(len(COLUMNS))]

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


