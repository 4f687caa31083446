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
* ``optimistic (1 write)``: ``BEGIN`` | ledger INSERT | ``INSERT record with result; COMMIT``
  (the record written once, after the handler; a concurrent duplicate fails at the
  unique key and its transaction rolls back)
* ``optimistic, BEGIN pipelined``: ``BEGIN; ledger INSERT`` | ``INSERT record; COMMIT``
  (2 round trips: the floor of any design that writes a record)

The records table is the library's (``SqlStore.create_schema()``).

Run: ``.venv/bin/python benchmarks/bench_pg_floor.py [--quick] [--json]``
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

import _common as C  # sets up sys.path first
import sqlalchemy as sa

from idempotent import SqlStore


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[0], rounds=15, n=300, quick_n=100)
    import psycopg

    with C.postgres() as pg:
        engine = sa.create_engine(pg.url)
        store = SqlStore(engine)
        store.create_schema()
        version = C.pg_version(engine)
        t = store.table.name
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE floor_ledger (id serial PRIMARY KEY, msg_id varchar(64) "
                          "NOT NULL, account varchar(32) NOT NULL, cents bigint NOT NULL)")
        conn = psycopg.connect(pg.dsn)
        pq = conn.pgconn

        def ex(q: str) -> Any:
            r = pq.exec_(q.encode())
            if r.status not in (1, 2):  # COMMAND_OK, TUPLES_OK
                raise RuntimeError(r.error_message.decode())
            return r

        ex(f"PREPARE claim (text,text,text,float8,float8) AS INSERT INTO {t} AS r "
           "(namespace,key,state,fingerprint,created_at,completed_at,expires_at) "
           "VALUES ($1,$2,'completed',$3,$4,$4,$5) ON CONFLICT (namespace,key) DO UPDATE SET "
           "state='completed', fingerprint=EXCLUDED.fingerprint, result=NULL, token=NULL, "
           "lease_until=NULL, created_at=EXCLUDED.created_at, "
           "completed_at=EXCLUDED.completed_at, expires_at=EXCLUDED.expires_at "
           "WHERE r.expires_at <= $4 RETURNING 1")
        ex(f"PREPARE once (text,text,text,float8,float8,bytea) AS INSERT INTO {t} "
           "(namespace,key,state,fingerprint,created_at,completed_at,expires_at,result) "
           "VALUES ($1,$2,'completed',$3,$4,$4,$5,$6)")
        ex("PREPARE led (text) AS INSERT INTO floor_ledger (msg_id, account, cents) "
           "VALUES ($1, 'acct-0042', 1234) RETURNING id")
        fp = "'" + "ab" * 32 + "'"
        res = "decode('" + b'{"status":"applied","id":"pg-0123456789"}'.hex() + "','hex')"

        def bare(k: str) -> None:
            ex("BEGIN")
            ex(f"EXECUTE led('{k}')")
            ex("COMMIT")

        def pessimistic(lock: bool = True, result: bool = True) -> Callable[[str], None]:
            def run(k: str) -> None:
                now = time.time()
                ex(f"BEGIN; {'SET LOCAL lock_timeout = 5000; ' if lock else ''}"
                   f"EXECUTE claim('bench','{k}',{fp},{now},{now + 604800})")
                ex(f"EXECUTE led('{k}')")
                ex(f"UPDATE {t} SET result = {res} WHERE namespace = 'bench' AND key = '{k}'; "
                   "COMMIT" if result else "COMMIT")
            return run

        def optimistic(pipelined_begin: bool) -> Callable[[str], None]:
            def run(k: str) -> None:
                now = time.time()
                if pipelined_begin:
                    ex(f"BEGIN; EXECUTE led('{k}')")
                else:
                    ex("BEGIN")
                    ex(f"EXECUTE led('{k}')")
                ex(f"EXECUTE once('bench','{k}',{fp},{now},{now + 604800},{res}); COMMIT")
            return run

        designs: dict[str, Callable[[str], None]] = {
            "bare": bare,
            "pessimistic (lib SQL)": pessimistic(),
            "pessimistic, no SET LOCAL": pessimistic(lock=False),
            "pessimistic, no result UPDATE": pessimistic(result=False),
            "optimistic (1 write)": optimistic(False),
            "optimistic, BEGIN pipelined": optimistic(True),
        }
        counter = itertools.count()
        prefix = uuid.uuid4().hex[:8]

        def variant(fn: Callable[[str], None]) -> C.Variant:
            def run(n: int) -> tuple[float, float]:
                keys = [f"{prefix}-{next(counter)}" for _ in range(n)]

                def loop() -> None:
                    for k in keys:
                        fn(k)

                return C.timed(loop)
            return run

        results = C.interleave({k: variant(f) for k, f in designs.items()}, rounds=args.rounds,
                               n=args.n, baseline="bare", args=args)
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
