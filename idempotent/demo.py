"""``idempotent demo``: a payment stream delivered at least once, applied exactly once.

Every payment is delivered 1-3 times in shuffled order, and a share (``crash_rate``) of
the handler runs crash after the handler's INSERT and before COMMIT (the handler raises
`SimulatedCrash`, so the decorator rolls the whole transaction back, as a process dying
before COMMIT would; a duplicate runs no handler, so it has nothing to crash in); a
crashed delivery is put back into the stream at a random later position, as a broker
redelivers an unacknowledged message. At the end the ledger must hold exactly one row
per payment and the exact total, and no crash may have left its key behind.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import sqlalchemy as sa

from ._decorator import idempotent
from .exceptions import IdempotencyError
from .stores.sql import SqlStore

__all__ = ["DemoReport", "SimulatedCrash", "main", "run_demo"]

# Demo-specific table names: `--db`/`--url` start from clean tables, and dropping a
# table called "ledger" or the default records table could destroy a user's real data.
LEDGER_TABLE = "idempotent_demo_ledger"
RECORDS_TABLE = "idempotent_demo_records"
NAMESPACE = "idempotent.demo.apply_payment"
ACCOUNTS = 100


class SimulatedCrash(Exception):
    """Raised by the demo handler after its INSERT: the process 'dies' before COMMIT."""


def ledger_table(metadata: sa.MetaData) -> sa.Table:
    """The handler's side effect. No unique constraint on ``payment_id`` on purpose: the
    database must not be what stops a double payment, the idempotency key must."""
    return sa.Table(
        LEDGER_TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("payment_id", sa.String(32), nullable=False),
        sa.Column("account", sa.String(32), nullable=False),
        sa.Column("cents", sa.BigInteger, nullable=False),
    )


@dataclass
class DemoReport:
    """What a demo run did and what the ledger holds afterwards."""

    deliveries: int = 0
    applied: int = 0
    duplicates: int = 0
    crashes: int = 0
    crashes_recovered: int = 0
    crashes_left_record: int = 0
    unique_payments: int = 0
    ledger_rows: int = 0
    ledger_distinct: int = 0
    expected_cents: int = 0
    applied_cents: int = 0
    elapsed: float = 0.0
    database: str = ""

    def problems(self) -> list[str]:
        """Every way the run broke exactly-once; empty when it held."""
        out = []
        lost = self.unique_payments - self.ledger_distinct
        doubled = self.ledger_rows - self.ledger_distinct
        if lost:
            out.append(f"{lost:,} payment(s) missing from the ledger")
        if doubled:
            out.append(f"{doubled:,} extra ledger row(s): a payment was applied more than once")
        if self.ledger_rows != self.unique_payments:
            out.append(
                f"ledger rows ({self.ledger_rows:,}) != unique payments "
                f"({self.unique_payments:,})"
            )
        if self.applied_cents != self.expected_cents:
            out.append(
                f"amount applied ({_money(self.applied_cents)}) != amount expected "
                f"({_money(self.expected_cents)})"
            )
        if self.crashes_left_record:
            out.append(f"{self.crashes_left_record:,} crash(es) left a record behind")
        if self.crashes_recovered != self.crashes:
            out.append(f"{self.crashes - self.crashes_recovered:,} crash(es) never recovered")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()

    def table(self) -> str:
        """The summary as an aligned plain-text table."""
        rate = self.deliveries / self.elapsed if self.elapsed > 0 else 0.0
        rows = [
            ("deliveries", f"{self.deliveries:,}"),
            ("  applied (handler committed)", f"{self.applied:,}"),
            ("  duplicates skipped", f"{self.duplicates:,}"),
            ("  crashes (rolled back)", f"{self.crashes:,}"),
            ("crashes recovered", f"{self.crashes_recovered:,}"),
            ("crashes that left a record", f"{self.crashes_left_record:,}"),
            ("ledger rows", f"{self.ledger_rows:,}"),
            ("unique payments", f"{self.unique_payments:,}"),
            ("amount expected", _money(self.expected_cents)),
            ("amount applied", _money(self.applied_cents)),
            ("elapsed seconds", f"{self.elapsed:.2f}"),
            ("deliveries/s", f"{rate:,.0f}"),
        ]
        width = max(len(label) for label, _ in rows)
        vwidth = max(len(value) for _, value in rows)
        rule = "-" * (width + 2 + vwidth)
        body = [f"{label:<{width}}  {value:>{vwidth}}" for label, value in rows]
        return "\n".join([f"database: {self.database}", rule, *body, rule])


def _money(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}{whole:,}.{frac:02d}"


class _Progress:
    """Progress over a stream whose length grows (redeliveries): a tqdm bar when tqdm is
    installed and stderr is a terminal, else a text line every ~10% (readable in logs)."""

    def __init__(self, total: int, stream: TextIO, mode: str) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.bar: Any = None
        self.next_mark = 0.1
        self.mode = mode
        if mode == "auto":
            self.mode = "bar" if _isatty(stream) and _has_tqdm() else "text"
        if self.mode == "bar":
            # imported by name: tqdm is an optional extra without type stubs
            tqdm = importlib.import_module("tqdm").tqdm
            self.bar = tqdm(total=total, unit=" deliveries", file=stream, mininterval=0.2,
                            dynamic_ncols=True, leave=False)

    def grow(self) -> None:
        self.total += 1
        if self.bar is not None:
            self.bar.total = self.total

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.mode == "text" and self.done >= self.next_mark * self.total:
            pct = 100 * self.done // self.total
            print(f"demo: {self.done:,}/{self.total:,} deliveries ({pct}%)",
                  file=self.stream, flush=True)
            self.next_mark = (pct // 10 + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_tqdm() -> bool:
    try:
        importlib.import_module("tqdm")
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _database(db: str | None, url: str | None) -> Iterator[tuple[str | sa.URL, str]]:
    """The SQLAlchemy URL to use and how to name it; a fresh temporary SQLite file
    (removed afterwards) unless told otherwise."""
    if url is not None:
        yield url, sa.make_url(url).render_as_string(hide_password=True)
        return
    if db is not None:
        path = Path(db).resolve()
        yield sqlite_file_url(path), f"SQLite file {path}"
        return
    tmp = tempfile.mkdtemp(prefix="idempotent-demo-")
    try:
        yield sqlite_file_url(Path(tmp, "demo.db")), "SQLite, temporary file (embedded, WAL)"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sqlite_file_url(path: Path) -> sa.URL:
    """The SQLite URL of exactly the file ``path``: built, not written out as text, so
    that ``?``, ``#`` and ``%41`` in a file name stay part of the name instead of being
    read as a URL's query, fragment or escapes."""
    return sa.URL.create("sqlite", database=str(path))


def make_stream(payments: int, rng: random.Random) -> tuple[list[dict[str, Any]], int]:
    """Payments delivered 1-3 times each, shuffled; and the sum of the unique amounts."""
    stream: list[dict[str, Any]] = []
    total = 0
    for n in range(1, payments + 1):
        cents = rng.randint(100, 500_000)
        payment: dict[str, Any] = {
            "payment_id": f"pay-{n:07d}",
            "account": f"acct-{rng.randrange(ACCOUNTS):03d}",
            "cents": cents,
        }
        total += cents
        stream.extend([payment] * rng.randint(1, 3))
    rng.shuffle(stream)
    return stream, total


def run_demo(
    *,
    payments: int = 10_000,
    seed: int = 7,
    crash_rate: float = 0.05,
    db: str | None = None,
    url: str | None = None,
    progress: str = "auto",
    sabotage: bool = False,
    err: TextIO | None = None,
) -> DemoReport:
    """Run the demo and return its report (printing only progress, to ``err``).

    ``progress`` is ``"auto"``, ``"bar"``, ``"text"`` or ``"none"``. ``sabotage`` commits
    one duplicate ledger row behind the decorator's back, to show the check catches it.
    """
    if payments < 1:
        raise ValueError("payments must be at least 1")
    if not 0.0 <= crash_rate < 1.0:
        raise ValueError("crash_rate must be in [0, 1)")
    err = sys.stderr if err is None else err
    rng = random.Random(seed)
    stream, expected = make_stream(payments, rng)
    report = DemoReport(unique_payments=payments, expected_cents=expected)

    with _database(db, url) as (db_url, label):
        report.database = label
        store = SqlStore(db_url, table=RECORDS_TABLE)
        ledger = ledger_table(sa.MetaData())
        try:
            # clean tables every run, so a --db/--url left from a previous run cannot
            # skew the counts
            with store.engine.begin() as conn:
                ledger.drop(conn, checkfirst=True)
                ledger.create(conn)
            store.drop_schema()
            store.create_schema()
            _deliver(store, ledger, stream, rng, crash_rate, report, _Progress(
                len(stream), err, progress))
            if sabotage:
                # a code path that skipped the decorator and applied a redelivery again
                with store.engine.begin() as conn:
                    conn.execute(sa.insert(ledger), stream[0])
            with store.engine.connect() as conn:
                row = conn.execute(sa.select(
                    sa.func.count(),
                    sa.func.count(sa.distinct(ledger.c.payment_id)),
                    sa.func.coalesce(sa.func.sum(ledger.c.cents), 0),
                )).one()
            report.ledger_rows, report.ledger_distinct = int(row[0]), int(row[1])
            report.applied_cents = int(row[2])
        finally:
            store.engine.dispose()  # close the SQLite file before its directory goes
    return report


def _deliver(
    store: SqlStore, ledger: sa.Table, stream: list[dict[str, Any]], rng: random.Random,
    crash_rate: float, report: DemoReport, progress: _Progress,
) -> None:
    """Push every delivery through the decorated handler, re-queueing crashed ones."""
    insert = sa.insert(ledger)
    ran = False  # set by the body: if it stays False, the decorator replayed a duplicate

    def apply_payment(payment: dict[str, Any], *, connection: sa.Connection) -> None:
        nonlocal ran
        ran = True
        connection.execute(insert, payment)
        if rng.random() < crash_rate:
            raise SimulatedCrash(payment["payment_id"])
        # no result to store: a duplicate is told apart by `ran`, and returning one
        # would cost an UPDATE per payment

    # the decorator passes `connection` itself; its type (the handler's own) says
    # callers must, so say what callers really call
    handle = cast(Callable[[dict[str, Any]], None],
                  idempotent(store, key="payment_id", namespace=NAMESPACE)(apply_payment))

    pending_crashes: dict[str, int] = {}
    ledger_rows = sa.select(sa.func.count()).select_from(ledger).where(
        ledger.c.payment_id == sa.bindparam("pid"))
    started = time.perf_counter()
    try:
        i = 0
        while i < len(stream):
            payment = stream[i]
            i += 1
            ran = False
            pid = payment["payment_id"]
            try:
                handle(payment)
            except SimulatedCrash:
                report.crashes += 1
                pending_crashes[pid] = pending_crashes.get(pid, 0) + 1
                # the decorator rolled back: neither the key nor the ledger row may exist
                with store.engine.connect() as conn:
                    leftover = conn.execute(ledger_rows, {"pid": pid}).scalar_one()
                if leftover or store.get(NAMESPACE, pid) is not None:
                    report.crashes_left_record += 1
                # the broker redelivers the unacknowledged message later
                stream.insert(rng.randint(i, len(stream)), payment)
                progress.grow()
            else:
                if ran:
                    report.applied += 1
                    report.crashes_recovered += pending_crashes.pop(pid, 0)
                else:
                    report.duplicates += 1
            report.deliveries += 1
            progress.step()
    finally:
        report.elapsed = time.perf_counter() - started
        progress.close()


def main(*, out: TextIO | None = None, err: TextIO | None = None, **options: Any) -> int:
    """Run the demo (``options`` are `run_demo`'s), print its table and verdict; 0 when
    every payment applied once."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    sabotage = bool(options.get("sabotage"))
    try:
        report = run_demo(err=err, **options)
    except (sa.exc.SQLAlchemyError, IdempotencyError, ImportError) as exc:
        # an unreachable database or a missing driver is a usage problem, not a bug:
        # one line, no traceback
        print(f"idempotent demo: error: {type(exc).__name__}: {exc}", file=err)
        return 2
    print(report.table(), file=out)
    problems = report.problems()
    if not problems:
        print("OK: every payment applied exactly once; no crash left anything behind.",
              file=out)
        return 0
    print("FAILED: exactly-once broken" + (" (--sabotage)" if sabotage else "") + ":",
          file=err)
    for problem in problems:
        print(f"  - {problem}", file=err)
    return 1
