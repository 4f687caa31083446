"""``store.record_many`` batches vs the same batches without dedup, on PostgreSQL.

One connection, sequential batches of 100 fresh messages. Each batch is one transaction:

* ``no dedup``: ``with engine.begin() as c: c.execute(ledger.insert(), rows)`` (baseline)
* ``record_many``: the same, plus ``new = store.record_many(c, ns, keys)`` first, and only
  the rows of ``new`` inserted (all 100 here: the keys are fresh)

Both are run twice, with two ways of inserting the ledger rows, so that a slow ledger
insert does not hide (or inflate) the cost of dedup; each dedup variant is compared to
the no-dedup variant that inserts the ledger the same way:

* ``executemany``: ``conn.execute(ledger.insert(), rows)`` (SQLAlchemy Core executemany)
* ``unnest``: one text statement ``INSERT INTO ledger … SELECT * FROM unnest(:ids, …)``

An extra row, ``record_many, 20% dup (unnest)``, sends batches in which 20 of the 100 keys
were seen before: the ledger gets 80 rows, and every one of the 100 messages counts as
processed exactly once.

Figures are messages per second (100 per batch), medians over interleaved rounds.

Run: ``.venv/bin/python benchmarks/bench_record_many.py [--quick] [--json]``
"""

from __future__ import annotations

import argparse
import itertools
import uuid
from typing import Any

import _common as C  # sets up sys.path first
import sqlalchemy as sa

from idempotent import SqlStore

BATCH = 100
TARGET_RATE = 25_000.0
TARGET_RATIO = 0.5
NS = "bench.record_many"


class Bench:
    def __init__(self, engine: sa.Engine, store: SqlStore, batch: int) -> None:
        self.engine, self.store, self.batch = engine, store, batch
        md = sa.MetaData()
        self.ledger = sa.Table(
            "bench_ledger_batch", md,
            sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
            sa.Column("msg_id", sa.String(64), nullable=False),
            sa.Column("account", sa.String(32), nullable=False),
            sa.Column("cents", sa.BigInteger, nullable=False),
        )
        md.drop_all(engine)
        md.create_all(engine)
        store.create_schema()
        self.unnest = sa.text(
            "INSERT INTO bench_ledger_batch (msg_id, account, cents) "
            "SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:accounts AS text[]), "
            "CAST(:cents AS bigint[]))"
        )
        self.prefix = uuid.uuid4().hex[:8]
        self.counter = itertools.count()
        self.seen: list[dict[str, Any]] = []
        self.expected_rows = 0

    def batches(self, n: int, dup_share: float = 0.0) -> list[list[dict[str, Any]]]:
        out = []
        n_dup = int(self.batch * dup_share)
        for _ in range(n):
            fresh = [{"msg_id": f"{self.prefix}-{next(self.counter)}",
                      "account": f"acct-{i % 97:04d}", "cents": 100 + i}
                     for i in range(self.batch - n_dup)]
            dups = [self.seen[(len(out) * n_dup + j) % len(self.seen)] for j in range(n_dup)]
            out.append(dups + fresh)
        return out

    def _insert_many(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute(self.ledger.insert(), rows)

    def _insert_unnest(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute(self.unnest, {"ids": [r["msg_id"] for r in rows],
                                   "accounts": [r["account"] for r in rows],
                                   "cents": [r["cents"] for r in rows]})

    def variant(self, *, dedup: bool, unnest: bool, dup_share: float = 0.0) -> C.Variant:
        insert = self._insert_unnest if unnest else self._insert_many

        def run(n: int) -> tuple[float, float]:
            if dup_share and not self.seen:
                self.variant(dedup=True, unnest=True)(max(1, n))
            batches = self.batches(n, dup_share)
            engine, store = self.engine, self.store
            inserted = 0

            def loop() -> None:
                nonlocal inserted
                for rows in batches:
                    with engine.begin() as c:
                        if dedup:
                            new = store.record_many(c, NS, [r["msg_id"] for r in rows])
                            rows = [r for r in rows if r["msg_id"] in new]
                        insert(c, rows)
                        inserted += len(rows)

            t = C.timed(loop)
            expected = n * self.batch if not dup_share else n * (self.batch - int(
                self.batch * dup_share))
            if inserted != expected:
                raise AssertionError(f"inserted {inserted} ledger rows, expected {expected}")
            self.expected_rows += inserted
            if dedup:
                self.seen.extend(r for b in batches for r in b)
            return t

        return run

    def check(self) -> int:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(sa.func.count()).select_from(self.ledger)).scalar_one()
            distinct = c.execute(sa.select(sa.func.count(sa.distinct(self.ledger.c.msg_id))))\
                .scalar_one()
        if rows != self.expected_rows:
            raise AssertionError(f"ledger has {rows} rows, expected {self.expected_rows}")
        return distinct


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--batch", type=int, default=BATCH, help="messages per batch (100)")
        ap.add_argument("--no-dup-mix", action="store_true",
                        help="skip the batches with 20%% already-seen keys")
        ap.add_argument("--expires-index", choices=("btree", "brin", "none"), default="btree",
                        help="diagnostic: replace the records table's btree index on "
                             "expires_at (the library's schema) by a BRIN index or by none, "
                             "in the private benchmark database only, to show what it costs")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=100, quick_n=20, extra=extra)
    with C.postgres() as pg:
        engine = sa.create_engine(pg.url, pool_size=1, max_overflow=0)
        store = SqlStore(engine)
        bench = Bench(engine, store, args.batch)
        if args.expires_index != "btree":
            with engine.begin() as c:
                for ix in store.table.indexes:
                    if [col.name for col in ix.columns] == ["expires_at"]:
                        c.execute(sa.schema.DropIndex(ix))
                if args.expires_index == "brin":
                    c.exec_driver_sql(f"CREATE INDEX bench_expires_brin ON "
                                      f"{store.table.fullname} USING brin (expires_at)")
        version = C.pg_version(engine)
        C.log(args, f"PostgreSQL {version} at {pg.host}:{pg.port}, {args.n} batches of "
                    f"{args.batch}/variant/round")
        variants = {
            "no dedup (executemany)": bench.variant(dedup=False, unnest=False),
            "record_many (executemany)": bench.variant(dedup=True, unnest=False),
            "no dedup (unnest)": bench.variant(dedup=False, unnest=True),
            "record_many (unnest)": bench.variant(dedup=True, unnest=True),
        }
        baseline = {
            "no dedup (executemany)": "no dedup (executemany)",
            "record_many (executemany)": "no dedup (executemany)",
            "no dedup (unnest)": "no dedup (unnest)",
            "record_many (unnest)": "no dedup (unnest)",
        }
        if not args.no_dup_mix:
            variants["record_many, 20% dup (unnest)"] = bench.variant(
                dedup=True, unnest=True, dup_share=0.2)
            baseline["record_many, 20% dup (unnest)"] = "no dedup (unnest)"
        res = C.interleave(variants, rounds=args.rounds, n=args.n, baseline=baseline,
                           unit_per_op=args.batch, args=args)
        distinct = bench.check()
        engine.dispose()

    headers, rows = C.result_rows(res, rate_label="msg/s")
    headers[1] = "µs/batch"
    headers[2] = "client CPU µs/batch"
    targets = []
    lines = []
    for name in ("record_many (executemany)", "record_many (unnest)"):
        r = res[name]
        line, t = C.target_line(f"{name} msg/s", r.per_s, TARGET_RATE, fmt="{:,.0f}")
        lines.append(line)
        targets.append(t)
        line, t = C.target_line(f"{name} ratio vs no dedup", r.ratio, TARGET_RATIO)
        lines.append(line)
        targets.append(t)
    text = "\n".join([
        f"bench_record_many ({C.git_describe()}): PostgreSQL {version} (fsync on, loopback, "
        "psycopg, one "
        f"connection; records table expires_at index: {args.expires_index}"
        f"{'' if args.expires_index == 'btree' else ' (diagnostic, not the library schema)'}"
        f"); batches of {args.batch} in one transaction; {args.n} batches per "
        f"variant per round, {args.rounds} interleaved rounds, medians; ratio = msg/s / "
        "msg/s of the no-dedup variant with the same ledger insert",
        C.table(headers, rows),
        f"ledger checked: {distinct} distinct messages, each inserted once",
        *lines,
    ])
    doc = {
        "benchmark": "record_many", "server_version": version, "batch": args.batch,
        "expires_index": args.expires_index,
        "rounds": args.rounds, "batches_per_round": args.n,
        "results": [r.as_dict() for r in res.values()], "targets": targets,
    }
    C.report(args, doc, text)


if __name__ == "__main__":
    main()
