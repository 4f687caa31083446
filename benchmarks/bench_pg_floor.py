"""What the database itself charges for each transactional design, with no Python around it.

A diagnostic for choosing between designs, not a test of the library: every variant is
plain SQL sent through libpq (``psycopg``'s ``pgconn.exec_``), one connection, fsync on;
no SQLAlchemy, no decorator. Each does one ledger INSERT (prepared) per transaction:

* ``bare``: ``BEGIN`` | ledger INSERT | ``COMMIT`` (3 round trips; what psycopg sends for
  a bare ``engine.begin()`` transaction) — the baseline
* ``pessimistic (lib SQL)``: what ``SqlStore``'s PostgreSQL fast path sends for a first
  delivery: ``BEGIN; SET LOCAL lock_timeout; EXECUTE claim`` | ledger INSERT |
  ``UPDATE … SET result; COMMIT`` (3 round trips, two writes of the record)
* ``… no SET LOCAL``, ``… no result UPDATE``: the same without one of its parts
* ``optimistic (lib SQL)``: what the fast path sends for ``transaction(optimistic=True)``:
  ``BEGIN; EXECUTE read`` | ledger INSERT | ``SET LOCAL lock_timeout; EXECUTE done;
  COMMIT`` (the record written once, with its result, after the handler)
* ``optimistic (1 write)``: ``BEGIN`` | ledger INSERT | ``EXECUTE done; COMMIT`` (no read
  first: a concurrent duplicate fails at the unique key and its transaction rolls back)
* ``optimistic, BEGIN pipelined``: ``BEGIN; ledger INSERT`` | ``EXECUTE done; COMMIT``
  (2 round trips: the floor of any design that writes a record)

The records table and every statement on it are the library's: a ``SqlStore`` on the
benchmark's database (``create_schema()``) gives its fast path's ``PREPARE`` text (the
``_Statements`` Core statements compiled for PostgreSQL), and the queries are built with
its compiled statements and literal quoting, with the parameters ``SqlStore.transaction``
binds (``now`` NULL: the database's clock; the default ttl). The queries of each
transaction are built before the clock starts; a claim that finds a record, or a count of
records that differs from the transactions run, stops the benchmark.

Run: ``.venv/bin/python benchmarks/bench_pg_floor.py [--quick] [--json]``
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from typing import Any

import _common as C  # sets up sys.path first
import sqlalchemy as sa

from idempotent import SqlStore
from idempotent.stores._pg_fast import literal_quoter
from idempotent.stores.base import DEFAULT_TTL


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[0], rounds=15, n=300, quick_n=100)
    import psycopg

    with C.postgres() as pg:
        engine = sa.create_engine(pg.url)
        store = SqlStore(engine)
        store.create_schema()
        assert store._fast_pg, "the benchmark wants the store's psycopg fast path"
        version = C.pg_version(engine)
        t = store.table.name
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE floor_ledger (id serial PRIMARY KEY, msg_id varchar(64) "
                          "NOT NULL, account varchar(32) NOT NULL, cents bigint NOT NULL)")
        conn = psycopg.connect(pg.dsn)
        pq = conn.pgconn

        def ex(q: str | bytes) -> Any:
            r = pq.exec_(q if isinstance(q, bytes) else q.encode())
            if r.status not in (1, 2):  # COMMAND_OK, TUPLES_OK
                raise RuntimeError(r.error_message.decode())
            return r

        # The library's own statements, as its fast path sends them (`PgFastPath` over
        # `sql._Statements`: the same Core statements compiled for PostgreSQL, PREPAREd
        # under its names, literals quoted by libpq): nothing here restates its SQL.
        fast = store._pg
        ex(fast.prepare)  # PREPARE read, claim and done
        ex("PREPARE led (text) AS INSERT INTO floor_ledger (msg_id, account, cents) "
           "VALUES ($1, 'acct-0042', 1234) RETURNING id")
        lit = literal_quoter(psycopg.pq.Escaping(pq).escape_literal, conn.info.encoding)
        res = b'{"status":"applied","id":"pg-0123456789"}'

        def params(k: str) -> dict[str, Any]:
            # what `SqlStore.transaction` binds: now None (the database's clock, STORE
            # TIME), the default ttl, the decorator's fingerprint (sha256 hex)
            return {"ns": "bench", "k": k, "fp": "ab" * 32, "now": store._stmt_now(),
                    "ttl": DEFAULT_TTL, "res": res}

        def execute(name: bytes, stmt: Any, p: dict[str, Any]) -> bytes:
            return b"".join((name, b",".join(stmt.args(lit, p)), b")"))

        def led(k: str) -> bytes:
            return f"EXECUTE led('{k}')".encode()

        # Each design: the queries (one per round trip) of one transaction for key k,
        # built before the clock starts; a check of the reply where the library checks one.
        def bare(k: str) -> list[bytes]:
            return [b"BEGIN", led(k), b"COMMIT"]

        def pessimistic(lock: bool = True, result: bool = True) -> Callable[[str], list[bytes]]:
            # PgFastPath.begin (pessimistic) | the handler | PgFastPath.finish
            def queries(k: str) -> list[bytes]:
                p = params(k)
                return [b"BEGIN; " + (fast.set_lock if lock else b"")
                        + execute(fast.execute_claim, fast.claim, p),
                        led(k),
                        fast.store_result.inline(fast.store_result.args(lit, p)) + b"; COMMIT"
                        if result else b"COMMIT"]
            return queries

        def optimistic_lib(k: str) -> list[bytes]:
            # PgFastPath.begin (optimistic: a read) | the handler | finish (the insert)
            p = params(k)
            return [b"BEGIN; " + execute(fast.execute_read, fast.read, p), led(k),
                    fast.set_lock + execute(fast.execute_done, fast.done, p) + b"; COMMIT"]

        def optimistic(pipelined_begin: bool) -> Callable[[str], list[bytes]]:
            # the floor: no read first, no SET LOCAL; the record is the library's insert
            def queries(k: str) -> list[bytes]:
                insert = execute(fast.execute_done, fast.done, params(k)) + b"; COMMIT"
                if pipelined_begin:
                    return [b"BEGIN; " + led(k), insert]
                return [b"BEGIN", led(k), insert]
            return queries

        designs: dict[str, Callable[[str], list[bytes]]] = {
            "bare": bare,
            "pessimistic (lib SQL)": pessimistic(),
            "pessimistic, no SET LOCAL": pessimistic(lock=False),
            "pessimistic, no result UPDATE": pessimistic(result=False),
            "optimistic (lib SQL)": optimistic_lib,
            "optimistic (1 write)": optimistic(False),
            "optimistic, BEGIN pipelined": optimistic(True),
        }
        # the first round trip of a pessimistic claim answers the key when it was claimed
        claims = {k for k in designs if k.startswith("pessimistic")}
        written: dict[str, int] = dict.fromkeys(designs, 0)
        counter = itertools.count()
        prefix = uuid.uuid4().hex[:8]

        def variant(name: str) -> C.Variant:
            make, claim = designs[name], name in claims

            def run(n: int) -> tuple[float, float]:
                txs = [make(f"{prefix}-{next(counter)}") for _ in range(n)]
                claimed: list[int] = []

                def loop() -> None:
                    for first, *rest in txs:
                        r = ex(first)
                        if claim:
                            claimed.append(r.ntuples)
                        for q in rest:
                            ex(q)

                t = C.timed(loop)
                if claim and sum(claimed) != n:
                    raise AssertionError(f"{name}: {n - sum(claimed)} claims found a record")
                written[name] += n
                return t
            return run

        results = C.interleave({k: variant(k) for k in designs}, rounds=args.rounds,
                               n=args.n, baseline="bare", args=args)
        # every design but bare wrote one record per transaction, all but one with a result
        rows = ex(f"SELECT count(*), count(result) FROM {t} WHERE namespace = 'bench'")
        got = (int(rows.get_value(0, 0)), int(rows.get_value(0, 1)))
        want = (sum(v for k, v in written.items() if k != "bare"),
                sum(v for k, v in written.items()
                    if k not in ("bare", "pessimistic, no result UPDATE")))
        if got != want:
            raise AssertionError(f"records (all, with a result): {got}, expected {want}")
        conn.close()
        engine.dispose()

    headers, rows = C.result_rows(results, rate_label="tx/s")
    text = "\n".join([
        f"bench_pg_floor ({C.git_describe()}): PostgreSQL {version}, raw libpq, fsync on, one "
        f"connection; {args.n} tx per variant per round, {args.rounds} interleaved rounds, "
        "medians",
        C.table(headers, rows),
    ])
    C.report(args, {"benchmark": "pg_floor", "server_version": version, "rounds": args.rounds,
                    "n": args.n, "results": [r.as_dict() for r in results.values()]}, text)


if __name__ == "__main__":
    main()
