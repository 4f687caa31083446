"""Does each fast path still pay? ``SqlStore(fast_path=True)`` against ``fast_path=False``.

Both stores share one engine (one connection, ``pool_size=1``), one table and the same
payloads; no decorator (``store.transaction`` directly, as the flow calls it), so the
figures are the store's own SQL and round trips. Variants, interleaved in rounds, each
once with the fast path and once without:

* ``bare Core``: ``with engine.begin() as c: c.execute(ledger.insert(), row)`` (baseline)
* ``tx new, optimistic``: read the key, the ledger INSERT, insert the record with its
  result and COMMIT (fast: BEGIN+read in one round trip, insert+COMMIT in one)
* ``tx new, pessimistic``: claim the key, the ledger INSERT, store the result and COMMIT
* ``tx dup, optimistic`` / ``tx dup, pessimistic``: a key already processed (the record
  is read back, nothing written, the transaction ended)

Then, on PostgreSQL, lease-mode claims by statement strategy (autocommit, one statement
or two; no fast path is involved): the library's one-statement CTE (`_Statements.
claim_lease`: a duplicate writes nothing), the old ``INSERT … ON CONFLICT DO UPDATE …
WHERE claimable`` followed by a SELECT when it wrote nothing (it locks the duplicate's row
and takes a transaction id), and select-then-write (a SELECT, then an insert only for a new
key: two statements for a new key, one for a duplicate).

Run: ``.venv/bin/python benchmarks/bench_fast_path.py [--quick] [--json] [--no-sqlite]
[--no-postgres] [--no-lease]``
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

from idempotent import Claimed, Completed, SqlStore
from idempotent.stores._sql_schema import COLUMNS


def ledger_table(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "fast_ledger", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("msg_id", sa.String(64), nullable=False),
        sa.Column("cents", sa.BigInteger, nullable=False),
    )


class Bench:
    def __init__(self, engine: sa.Engine, tag: str) -> None:
        self.engine = engine
        self.stores = {"fast": SqlStore(engine), "plain": SqlStore(engine, fast_path=False)}
        fast = self.stores["fast"]
        if not (fast._fast_pg or fast._fast_sqlite):
            raise SystemExit(f"{tag}: this engine has no fast path")
        fast.create_schema()
        md = sa.MetaData()
        self.ledger = ledger_table(md)
        md.drop_all(engine)
        md.create_all(engine)
        self.prefix = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.counter = itertools.count()
        self.done: dict[tuple[str, bool], list[str]] = {}  # (path, optimistic): keys done
        self.expected_rows = 0

    def keys(self, n: int) -> list[str]:
        return [f"{self.prefix}-{next(self.counter)}" for _ in range(n)]

    def bare(self, n: int) -> tuple[float, float]:
        keys, engine, ins = self.keys(n), self.engine, self.ledger.insert()

        def loop() -> None:
            for k in keys:
                with engine.begin() as c:
                    c.execute(ins, {"msg_id": k, "cents": 1})

        self.expected_rows += n
        return C.timed(loop)

    def tx_new(self, path: str, optimistic: bool) -> C.Variant:
        store, ins = self.stores[path], self.ledger.insert()

        def run(n: int) -> tuple[float, float]:
            keys = self.keys(n)
            results = [f'{{"applied":"{k}"}}'.encode() for k in keys]

            def loop() -> None:
                for k, res in zip(keys, results, strict=True):
                    with store.transaction("bench", k, "0" * 64,
                                           optimistic=optimistic) as tx:
                        tx.connection.execute(ins, {"msg_id": k, "cents": 1})
                        tx.commit(res)

            t = C.timed(loop)
            self.done.setdefault((path, optimistic), []).extend(keys)
            self.expected_rows += n
            return t

        return run

    def tx_dup(self, path: str, optimistic: bool) -> C.Variant:
        store = self.stores[path]

        def run(n: int) -> tuple[float, float]:
            done = self.done.get((path, optimistic)) or []
            if len(done) < n:
                self.tx_new(path, optimistic)(n)
                done = self.done[(path, optimistic)]
            keys = done[:n]
            seen: list[Any] = []

            def loop() -> None:
                for k in keys:
                    with store.transaction("bench", k, "0" * 64,
                                           optimistic=optimistic) as tx:
                        seen.append(tx.existing)

            t = C.timed(loop)
            if any(r is None for r in seen):
                raise AssertionError("a duplicate was not found")
            return t

        return run

    def variants(self) -> dict[str, C.Variant]:
        out: dict[str, C.Variant] = {"bare Core": self.bare}
        for what, make in (("new", self.tx_new), ("dup", self.tx_dup)):
            for optimistic in (True, False):
                mode = "optimistic" if optimistic else "pessimistic"
                for path in ("fast", "plain"):
                    out[f"tx {what}, {mode}, {path}"] = make(path, optimistic)
        return out

    def check(self) -> int:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(sa.func.count()).select_from(self.ledger)).scalar_one()
        if rows != self.expected_rows:
            raise AssertionError(f"ledger has {rows} rows, expected {self.expected_rows}")
        return int(rows)


def pair_ratios(res: dict[str, C.Result]) -> list[str]:
    """fast / plain throughput, median of the per-round ratios, for every pair."""
    lines = []
    for name in res:
        if not name.endswith(", fast"):
            continue
        plain = name[: -len("fast")] + "plain"
        ratios = [p / f for f, p in zip(res[name].seconds, res[plain].seconds, strict=True)]
        lines.append(f"{name[: -len(', fast')]}: fast/plain throughput "
                     f"{statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-"
                     f"{max(ratios):.2f})")
    return lines


class LeaseBench:
    """Lease-mode claim strategies on PostgreSQL (autocommit statements)."""

    def __init__(self, engine: sa.Engine, tag: str) -> None:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        self.store = store = SqlStore(engine)
        self.prefix = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.counter = itertools.count()
        self.auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        t = store.table
        P = sa.bindparam
        values = {
            "namespace": P("ns"), "key": P("k"), "state": "in_progress", "fingerprint": None,
            "result": None, "token": P("tok"), "lease_until": P("lu"), "created_at": P("now"),
            "completed_at": None, "expires_at": P("exp"),
        }
        ins = pg_insert(t).values(values)
        # the statement the store ran before issue 9 (then a SELECT when it wrote nothing)
        self.old_upsert = ins.on_conflict_do_update(
            index_elements=[t.c.namespace, t.c.key],
            set_={c: ins.excluded[c] for c in COLUMNS[2:]},
            where=(t.c.expires_at <= P("now"))
            | ((t.c.state == "in_progress") & (t.c.lease_until <= P("now"))),
        ).returning(t.c.key)
        self.insert_nothing = pg_insert(t).values(values).on_conflict_do_nothing(
        ).returning(t.c.key)
        self.select = store._st.select
        self.completed: list[str] = []

    def keys(self, n: int) -> list[str]:
        return [f"{self.prefix}-{next(self.counter)}" for _ in range(n)]

    def _params(self, k: str) -> dict[str, Any]:
        import time

        now = time.time()
        return {"ns": "lease", "k": k, "tok": "t" * 32, "lu": now + 30, "now": now,
                "exp": now + 3600}

    def dup_keys(self, n: int) -> list[str]:
        while len(self.completed) < n:
            for k in self.keys(n):
                got = self.store.claim("lease", k, fingerprint=None)
                assert isinstance(got, Claimed)
                self.store.complete("lease", k, got.token, b"1")
                self.completed.append(k)
        return self.completed[:n]

    def lib_new(self, n: int) -> tuple[float, float]:
        keys, store = self.keys(n), self.store
        return C.timed(lambda: [store.claim("lease", k, fingerprint=None) for k in keys])

    def lib_dup(self, n: int) -> tuple[float, float]:
        keys, store = self.dup_keys(n), self.store

        def loop() -> None:
            for k in keys:
                assert isinstance(store.claim("lease", k, fingerprint=None), Completed)

        return C.timed(loop)

    def old_new(self, n: int) -> tuple[float, float]:
        keys = self.keys(n)

        def loop() -> None:
            for k in keys:
                with self.auto.connect() as c:
                    if c.execute(self.old_upsert, self._params(k)).first() is None:
                        c.execute(self.select, {"ns": "lease", "k": k}).first()

        return C.timed(loop)

    def old_dup(self, n: int) -> tuple[float, float]:
        keys = self.dup_keys(n)

        def loop() -> None:
            for k in keys:
                with self.auto.connect() as c:
                    if c.execute(self.old_upsert, self._params(k)).first() is None:
                        c.execute(self.select, {"ns": "lease", "k": k}).first()

        return C.timed(loop)

    def select_then_write_new(self, n: int) -> tuple[float, float]:
        keys = self.keys(n)

        def loop() -> None:
            for k in keys:
                with self.auto.connect() as c:
                    if c.execute(self.select, {"ns": "lease", "k": k}).first() is None:
                        c.execute(self.insert_nothing, self._params(k)).first()

        return C.timed(loop)

    def select_then_write_dup(self, n: int) -> tuple[float, float]:
        keys = self.dup_keys(n)

        def loop() -> None:
            for k in keys:
                with self.auto.connect() as c:
                    c.execute(self.select, {"ns": "lease", "k": k}).first()

        return C.timed(loop)

    def variants(self) -> dict[str, C.Variant]:
        return {
            "claim dup, lib (one CTE statement)": self.lib_dup,
            "claim dup, old upsert + SELECT": self.old_dup,
            "claim dup, select-then-write": self.select_then_write_dup,
            "claim new, lib (one CTE statement)": self.lib_new,
            "claim new, old upsert": self.old_new,
            "claim new, select-then-write": self.select_then_write_new,
        }


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--sqlite-n", type=int, default=None,
                        help="operations per variant per round on SQLite (default 4 x --n)")
        ap.add_argument("--no-sqlite", action="store_true")
        ap.add_argument("--no-postgres", action="store_true")
        ap.add_argument("--no-lease", action="store_true",
                        help="skip the PostgreSQL lease-claim strategies")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=300, quick_n=60, extra=extra)
    sqlite_n = args.sqlite_n or args.n * 4
    doc: dict[str, Any] = {"benchmark": "fast_path", "rounds": args.rounds, "sections": {}}
    text = [f"bench_fast_path ({C.git_describe()}): {args.rounds} interleaved rounds, "
            "medians; ratio = throughput / baseline throughput (median of per-round ratios)"]

    def section(title: str, res: dict[str, C.Result], extra_lines: list[str]) -> str:
        headers, rows = C.result_rows(res, rate_label="ops/s")
        return "\n".join([title, C.table(headers, rows), *extra_lines])

    if not args.no_postgres:
        with C.postgres() as pg:
            engine = sa.create_engine(pg.url, pool_size=1, max_overflow=0)
            bench = Bench(engine, "pg")
            version = C.pg_version(engine)
            C.log(args, f"PostgreSQL {version}, {args.n} tx/variant/round")
            res = C.interleave(bench.variants(), rounds=args.rounds, n=args.n,
                               baseline="bare Core", args=args, label="pg ")
            rows = bench.check()
            pairs = pair_ratios(res)
            text.append(section(
                f"\nPostgreSQL {version} (fsync on, loopback TCP, psycopg, one connection), "
                f"{args.n} tx per variant per round", res,
                [*pairs, f"ledger rows checked: {rows}"]))
            doc["sections"]["postgresql"] = {
                "server_version": version, "n": args.n, "fast_vs_plain": pairs,
                "results": [r.as_dict() for r in res.values()]}
            if not args.no_lease:
                lease = LeaseBench(engine, "lease")
                C.log(args, "PostgreSQL lease claims by strategy")
                lres = C.interleave(
                    lease.variants(), rounds=args.rounds, n=args.n, args=args, label="lease ",
                    baseline={k: ("claim dup, lib (one CTE statement)" if "dup" in k
                                  else "claim new, lib (one CTE statement)")
                              for k in lease.variants()})
                text.append(section(
                    f"\nPostgreSQL lease claims (autocommit), {args.n} claims per variant per "
                    "round; ratio against the library's statement", lres, []))
                doc["sections"]["postgresql_lease"] = {
                    "n": args.n, "results": [r.as_dict() for r in lres.values()]}
            engine.dispose()

    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            engine = SqlStore(url).engine  # WAL, synchronous=NORMAL, as a store from a URL
            bench = Bench(engine, "sqlite")
            with engine.connect() as c:
                mode = c.exec_driver_sql("PRAGMA journal_mode").scalar()
            C.log(args, f"SQLite file, journal_mode={mode}, {sqlite_n} tx/variant/round")
            res = C.interleave(bench.variants(), rounds=args.rounds, n=sqlite_n,
                               baseline="bare Core", args=args, label="sqlite ")
            rows = bench.check()
            pairs = pair_ratios(res)
            text.append(section(
                f"\nSQLite {C.environment()['sqlite']} file (journal_mode={mode}), "
                f"{sqlite_n} tx per variant per round (the SQLite fast path covers the "
                "optimistic read and insert only)", res,
                [*pairs, f"ledger rows checked: {rows}"]))
            doc["sections"]["sqlite"] = {"n": sqlite_n, "fast_vs_plain": pairs,
                                         "results": [r.as_dict() for r in res.values()]}
            engine.dispose()

    C.report(args, doc, "\n".join(text))


if __name__ == "__main__":
    main()
