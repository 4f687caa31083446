"""Transactional mode vs the bare transaction it wraps.

One connection, sequential calls. The side effect is one SQLAlchemy Core INSERT into a
ledger table; the baseline is the same INSERT in a bare ``engine.begin()`` transaction
on the same engine, same table, same payload. Variants, interleaved in rounds:

* ``bare Core``: ``with engine.begin() as c: c.execute(ledger.insert(), row)`` (baseline)
* ``store.transaction new``: the store's primitive (pessimistic) without the decorator
  (``with store.transaction(ns, key, fp) as tx: tx.connection.execute(…); tx.commit(res)``):
  the same SQL as the decorated handler, without the decorator's own Python
* ``idem conn new``: ``@idempotent(store, key="id")`` handler taking ``connection``,
  fresh keys, optimistic (the default: read the key with BEGIN, INSERT, write the record
  with its result and COMMIT)
* ``idem conn new, pessimistic``: the same with ``optimistic=False`` (claim the key with
  BEGIN, INSERT, UPDATE the result and COMMIT)
* ``idem conn dup``: the same handler replaying keys it has already processed (the
  stored result is returned, the transaction rolled back, the handler not run)
* ``idem conn 10% dup``: the same handler on a stream in which every 10th message is a
  redelivery of one already processed, the others fresh (on PostgreSQL this exercises
  what a duplicate's ROLLBACK does to the connection: psycopg answers it with
  DEALLOCATE ALL once it has prepared statements of its own)
* ``idem session new``: the same handler taking ``session`` (ORM Session), fresh keys
* ``bare Session``: ``with Session(engine) as s, s.begin(): s.execute(ledger.insert(), row)``
  (what the ORM costs without dedup; the session handler is also compared to it)

Default decorator settings: default retry policy, fingerprint of the whole payload on,
the small dict the handler returns stored as JSON.
First on a private PostgreSQL (fsync on, psycopg 3), then on a SQLite file (WAL,
synchronous=NORMAL: the pragmas ``SqlStore("sqlite:///…")`` sets; the bare variant runs
on the same engine, so it gets them too).

Run: ``.venv/bin/python benchmarks/bench_transactional.py [--quick] [--json]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import uuid
from typing import Any

import _common as C  # sets up sys.path first
import sqlalchemy as sa
from sqlalchemy.orm import Session

from idempotent import SqlStore, idempotent

TARGET_PG_NEW = 0.80
VARIANT_NAMES = ("bare Core", "store.transaction new", "idem conn new",
                 "idem conn new, pessimistic", "idem conn dup",
                 "idem conn 10% dup", "idem session new", "bare Session")
DUP_EVERY = 10  # "idem conn 10% dup": every 10th message replays a key already processed


def ledger_table(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "bench_ledger", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("msg_id", sa.String(64), nullable=False),
        sa.Column("account", sa.String(32), nullable=False),
        sa.Column("cents", sa.BigInteger, nullable=False),
    )


class Bench:
    """The variants for one engine (PostgreSQL or SQLite)."""

    def __init__(self, engine: sa.Engine, store: SqlStore, tag: str) -> None:
        self.engine = engine
        self.store = store
        md = sa.MetaData()
        self.ledger = ledger = ledger_table(md)
        md.drop_all(engine)
        md.create_all(engine)
        store.create_schema()
        self.prefix = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.counter = itertools.count()
        self.seen: list[dict[str, Any]] = []  # messages the connection handler processed
        self.dup_pos = 0
        self.expected_rows = 0
        ins = ledger.insert()

        @idempotent(store, key="id", namespace=f"bench.{tag}.conn")
        def apply_conn(msg: dict[str, Any], *, connection: Any) -> dict[str, Any]:
            connection.execute(ins, {"msg_id": msg["id"], "account": msg["account"],
                                     "cents": msg["cents"]})
            return {"status": "applied", "id": msg["id"]}

        @idempotent(store, key="id", namespace=f"bench.{tag}.session")
        def apply_session(msg: dict[str, Any], *, session: Session) -> dict[str, Any]:
            session.execute(ins, {"msg_id": msg["id"], "account": msg["account"],
                                  "cents": msg["cents"]})
            return {"status": "applied", "id": msg["id"]}

        @idempotent(store, key="id", namespace=f"bench.{tag}.pessimistic", optimistic=False)
        def apply_pessimistic(msg: dict[str, Any], *, connection: Any) -> dict[str, Any]:
            connection.execute(ins, {"msg_id": msg["id"], "account": msg["account"],
                                     "cents": msg["cents"]})
            return {"status": "applied", "id": msg["id"]}

        self.apply_conn = apply_conn
        self.apply_session = apply_session
        self.apply_pessimistic = apply_pessimistic

    def messages(self, n: int) -> list[dict[str, Any]]:
        return [{"id": f"{self.prefix}-{next(self.counter)}", "account": "acct-0042",
                 "cents": 1234} for _ in range(n)]

    # -- variants ----------------------------------------------------------------------
    def bare_core(self, n: int) -> tuple[float, float]:
        msgs, engine, ins = self.messages(n), self.engine, self.ledger.insert()

        def loop() -> None:
            for m in msgs:
                with engine.begin() as c:
                    c.execute(ins, {"msg_id": m["id"], "account": m["account"],
                                    "cents": m["cents"]})

        self.expected_rows += n
        return C.timed(loop)

    def bare_session(self, n: int) -> tuple[float, float]:
        msgs, engine, ins = self.messages(n), self.engine, self.ledger.insert()

        def loop() -> None:
            for m in msgs:
                with Session(engine) as s, s.begin():
                    s.execute(ins, {"msg_id": m["id"], "account": m["account"],
                                    "cents": m["cents"]})

        self.expected_rows += n
        return C.timed(loop)

    def store_tx_new(self, n: int) -> tuple[float, float]:
        """The store's primitive without the decorator: same SQL, none of the decorator's
        Python (key extraction, fingerprint, retry policy, JSON, context variable)."""
        msgs, store, ins = self.messages(n), self.store, self.ledger.insert()
        fp = "0" * 64
        ns = f"bench.{self.prefix}.store"
        results = [f'{{"status":"applied","id":"{m["id"]}"}}'.encode() for m in msgs]

        def loop() -> None:
            for m, res in zip(msgs, results, strict=True):
                with store.transaction(ns, m["id"], fp) as tx:
                    tx.connection.execute(ins, {"msg_id": m["id"], "account": m["account"],
                                                "cents": m["cents"]})
                    tx.commit(res)

        self.expected_rows += n
        return C.timed(loop)

    def idem_conn_new(self, n: int) -> tuple[float, float]:
        msgs, fn = self.messages(n), self.apply_conn

        def loop() -> None:
            for m in msgs:
                fn(m)

        t = C.timed(loop)
        self.seen.extend(msgs)
        self.expected_rows += n
        return t

    def idem_conn_dup(self, n: int) -> tuple[float, float]:
        if not self.seen:
            self.idem_conn_new(max(n, 1))
        seen, fn = self.seen, self.apply_conn
        msgs = [dict(seen[(self.dup_pos + i) % len(seen)]) for i in range(n)]
        self.dup_pos += n
        out: list[Any] = []

        def loop() -> None:
            for m in msgs:
                out.append(fn(m))

        t = C.timed(loop)
        bad = [r for m, r in zip(msgs, out, strict=True)
               if r != {"status": "applied", "id": m["id"]}]
        if bad:
            raise AssertionError(f"a duplicate did not get the stored result: {bad[0]!r}")
        return t

    def idem_conn_mixed(self, n: int) -> tuple[float, float]:
        """A stream in which every DUP_EVERY-th message is a redelivery of a processed one."""
        if not self.seen:
            self.idem_conn_new(max(n, 1))
        fresh = self.messages(n - n // DUP_EVERY)
        seen, fn = self.seen, self.apply_conn
        msgs: list[dict[str, Any]] = []
        it = iter(fresh)
        for i in range(n):
            if i % DUP_EVERY == DUP_EVERY - 1:
                msgs.append(dict(seen[self.dup_pos % len(seen)]))
                self.dup_pos += 1
            else:
                msgs.append(next(it))

        def loop() -> None:
            for m in msgs:
                fn(m)

        t = C.timed(loop)
        self.seen.extend(fresh)
        self.expected_rows += len(fresh)
        return t

    def idem_pessimistic_new(self, n: int) -> tuple[float, float]:
        msgs, fn = self.messages(n), self.apply_pessimistic

        def loop() -> None:
            for m in msgs:
                fn(m)

        self.expected_rows += n
        return C.timed(loop)

    def idem_session_new(self, n: int) -> tuple[float, float]:
        msgs, fn = self.messages(n), self.apply_session

        def loop() -> None:
            for m in msgs:
                fn(m)

        self.expected_rows += n
        return C.timed(loop)

    def variants(self, only: list[str] | None = None) -> dict[str, C.Variant]:
        all_ = {
            "bare Core": self.bare_core,
            "store.transaction new": self.store_tx_new,
            "idem conn new": self.idem_conn_new,
            "idem conn new, pessimistic": self.idem_pessimistic_new,
            "idem conn dup": self.idem_conn_dup,
            "idem conn 10% dup": self.idem_conn_mixed,
            "idem session new": self.idem_session_new,
            "bare Session": self.bare_session,
        }
        if only is None:
            return all_
        return {k: v for k, v in all_.items() if k == "bare Core" or k in only}

    def check(self) -> int:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(sa.func.count()).select_from(self.ledger)).scalar_one()
        if rows != self.expected_rows:
            raise AssertionError(f"ledger has {rows} rows, expected {self.expected_rows}")
        return rows


def run_engine(bench: Bench, args: argparse.Namespace, n: int, label: str) -> dict[str, C.Result]:
    only = None
    if args.variants:
        only = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = set(only) - set(VARIANT_NAMES)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; names: {VARIANT_NAMES}")
    return C.interleave(
        bench.variants(only), rounds=args.rounds, n=n, baseline="bare Core", args=args,
        label=label,
    )


def extra_ratio(results: dict[str, C.Result], variant: str, base: str) -> float | None:
    if variant not in results or base not in results:
        return None
    return statistics.median(
        b / v for b, v in zip(results[base].seconds, results[variant].seconds, strict=True))


def profile(bench: Bench, n: int) -> str:
    """cProfile of the decorated first-time path: where client time goes, per call."""
    msgs = bench.messages(n)
    fn = bench.apply_conn

    def loop() -> None:
        for m in msgs:
            fn(m)

    text, _ = C.profile_calls(loop, n, top=15, title="idem conn new keys: ")
    bench.expected_rows += n
    return text


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def section(title: str, results: dict[str, C.Result], extra: list[str]) -> str:
    headers, rows = C.result_rows(results, rate_label="tx/s")
    return "\n".join([title, C.table(headers, rows), *extra])


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--sqlite-n", type=int, default=None,
                        help="transactions per variant per round on SQLite (default 4 x --n)")
        ap.add_argument("--no-sqlite", action="store_true")
        ap.add_argument("--no-postgres", action="store_true")
        ap.add_argument("--profile", action="store_true",
                        help="also print a cProfile of the PostgreSQL first-time path")
        ap.add_argument("--variants", default=None,
                        help="comma-separated subset of variants to run (default: all); "
                             f"names: {', '.join(VARIANT_NAMES)}".replace('%', '%%'))
        ap.add_argument("--no-psycopg-prepare", action="store_true",
                        help="diagnostic: create the PostgreSQL engine (used by every variant) "
                             "with psycopg prepare_threshold=None; psycopg then prepares "
                             "nothing and never sends DEALLOCATE ALL after a ROLLBACK")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=500, quick_n=100, extra=extra)
    sqlite_n = args.sqlite_n or args.n * 4
    doc: dict[str, Any] = {"benchmark": "transactional", "rounds": args.rounds, "sections": {}}
    text: list[str] = [f"bench_transactional ({C.git_describe()}): {args.rounds} interleaved "
                       "rounds, medians; ratio = throughput / baseline throughput (median of "
                       "per-round ratios)"]
    targets: list[dict[str, Any]] = []

    if not args.no_postgres:
        with C.postgres() as pg:
            connect_args = {"prepare_threshold": None} if args.no_psycopg_prepare else {}
            engine = sa.create_engine(pg.url, pool_size=1, max_overflow=0,
                                      connect_args=connect_args)
            store = SqlStore(engine)
            bench = Bench(engine, store, "pg")
            version = C.pg_version(engine)
            C.log(args, f"PostgreSQL {version} at {pg.host}:{pg.port}, {args.n} tx/variant/round")
            res = run_engine(bench, args, args.n, "pg ")
            rows = bench.check()
            s_vs_s = extra_ratio(res, "idem session new", "bare Session")
            new = res.get("idem conn new")
            line, tgt = C.target_line("PostgreSQL first-time keys vs bare",
                                      new.ratio if new else None, TARGET_PG_NEW)
            targets.append(tgt)
            prep = ("psycopg prepare_threshold=None" if args.no_psycopg_prepare
                    else "psycopg default prepare_threshold=5")
            text.append(section(
                f"\nPostgreSQL {version} (fsync on, loopback TCP, psycopg, one connection, "
                f"{prep}), {args.n} tx per variant per round",
                res,
                [f"idem session new vs bare Session: {fmt(s_vs_s)}",
                 f"ledger rows checked: {rows} (= every first-time and bare transaction once)",
                 line]))
            doc["sections"]["postgresql"] = {
                "server_version": version, "n": args.n,
                "psycopg_prepare_threshold": None if args.no_psycopg_prepare else "default",
                "results": [r.as_dict() for r in res.values()],
                "session_new_vs_bare_session": s_vs_s,
            }
            if args.profile:
                text.append("\ncProfile, idem conn new keys (PostgreSQL):\n"
                            + profile(bench, args.n))
            engine.dispose()

    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp:
            store = SqlStore(f"sqlite:///{tmp}/bench.db")
            engine = store.engine
            bench = Bench(engine, store, "sqlite")
            with engine.connect() as c:
                mode = c.exec_driver_sql("PRAGMA journal_mode").scalar()
                sync = c.exec_driver_sql("PRAGMA synchronous").scalar()
            C.log(args, f"SQLite file, journal_mode={mode}, synchronous={sync}, "
                        f"{sqlite_n} tx/variant/round")
            res = run_engine(bench, args, sqlite_n, "sqlite ")
            rows = bench.check()
            s_vs_s = extra_ratio(res, "idem session new", "bare Session")
            text.append(section(
                f"\nSQLite {C.environment()['sqlite']} file (journal_mode={mode}, "
                f"synchronous={sync}), {sqlite_n} tx per variant per round",
                res,
                [f"idem session new vs bare Session: {fmt(s_vs_s)}",
                 f"ledger rows checked: {rows}"]))
            doc["sections"]["sqlite"] = {
                "journal_mode": mode, "synchronous": sync, "n": sqlite_n,
                "results": [r.as_dict() for r in res.values()],
                "session_new_vs_bare_session": s_vs_s,
            }
            engine.dispose()

    doc["targets"] = targets
    C.report(args, doc, "\n".join(text))


if __name__ == "__main__":
    main()
