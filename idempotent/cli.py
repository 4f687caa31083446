"""The ``idempotent`` command line.

Each subcommand is one ``_add_<name>`` function that declares its arguments and sets
``run`` to a function ``(args) -> exit code``. The demo's module is imported only when it
runs; the operations commands (``db``, ``inspect``, ``purge``, ``stats``) live in
`idempotent._ops`, which imports SQLAlchemy and Alembic only inside the commands;
``relay`` (the outbox's) in `idempotent._relay`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def _crash_rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


#: The largest ``purge --batch``: one transaction of a million deletes is already long;
#: beyond it a database's integer bind overflows (SQLite: OverflowError).
MAX_BATCH = 1_000_000


def _batch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number (1 to {MAX_BATCH:,})") from None
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_BATCH:,}, not {text}")
    return value


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="apply a payment stream delivered at least once, exactly once",
        description=(
            "Deliver a stream of payments at least once (each 1-3 times, shuffled, some "
            "deliveries crashing before COMMIT and redelivered) through an @idempotent "
            "handler that writes a ledger row, then check that the ledger holds each "
            "payment exactly once. Exit status: 0 it does, 1 it does not, 2 bad "
            "arguments or an unreachable database."
        ),
    )
    p.add_argument("--payments", type=_positive, default=10_000, metavar="N",
                   help="unique payments in the stream (default: %(default)s)")
    p.add_argument("--seed", type=int, default=7,
                   help="random seed for amounts, duplicates, order and crashes "
                   "(default: %(default)s)")
    p.add_argument("--crash-rate", type=_crash_rate, default=0.05, metavar="P",
                   help="share of handler runs that crash after the INSERT, before COMMIT "
                   "(a duplicate runs nothing, so cannot crash) (default: %(default)s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--db", metavar="PATH",
                       help="SQLite file to use, its demo tables recreated "
                       "(default: a temporary file, removed afterwards)")
    where.add_argument("--url", help="any SQLAlchemy URL instead of SQLite, e.g. "
                       "postgresql+psycopg://user@host/db (demo tables recreated)")
    p.add_argument("--progress", choices=("auto", "bar", "text", "none"), default="auto",
                   help="progress display on stderr: a tqdm bar on a terminal when tqdm is "
                   "installed, else a line every 10%% (default: %(default)s)")
    p.add_argument("--sabotage", action="store_true",
                   help="commit one duplicate ledger row behind the decorator's back, "
                   "to see the check fail")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(payments=args.payments, seed=args.seed, crash_rate=args.crash_rate,
                     db=args.db, url=args.url, progress=args.progress, sabotage=args.sabotage)


def _store_options(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--json``, shared by the operations commands."""
    p.add_argument("--url", help="the store: a SQLAlchemy URL (sqlite:///idem.db, "
                   "postgresql+psycopg://user@host/db) or redis://host:port "
                   "(default: $IDEMPOTENT_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_db(sub: Any) -> None:
    from . import _ops

    p = sub.add_parser(
        "db", help="create or migrate the records table (Alembic)",
        description="Run idempotent's own Alembic history against a SQL database. It "
        "records itself in its own version table, idempotent_alembic_version, so it never "
        "meets your application's Alembic history. upgrade adopts a records table made by "
        "SqlStore.create_schema() when it matches the model (it stamps the revision "
        "instead of creating the table).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("upgrade", help="migrate to REVISION (default: the newest)")
    up.add_argument("revision", nargs="?", default="heads", metavar="REVISION")
    down = actions.add_parser("downgrade",
                              help="migrate down to REVISION (base drops the table)")
    down.add_argument("revision", metavar="REVISION")
    current = actions.add_parser("current", help="show the revision the database is at")
    stamp = actions.add_parser(
        "stamp", help="record REVISION (default: the newest) without running anything",
        description="Record REVISION in idempotent_alembic_version without running its "
        "migration: for a records table that already exists (made by "
        "SqlStore.create_schema(), or by hand) and that you have checked is that "
        "revision's. base forgets every revision and drops nothing.")
    stamp.add_argument("revision", nargs="?", default="heads", metavar="REVISION")
    for action in (up, down, current, stamp):
        _store_options(action)
        action.set_defaults(sql=False, run=_ops.run_db)
    for action in (up, down):
        action.add_argument("--sql", action="store_true",
                            help="print the SQL instead of running it (downgrade: give "
                            "REVISION as FROM:TO)")


def _ops_parser(sub: Any, name: str, run: str, help_: str, description: str) -> Any:
    """A subcommand run by ``idempotent._ops.<run>``, with ``--url`` and ``--json``."""
    from . import _ops

    p = sub.add_parser(name, help=help_, description=description)
    _store_options(p)
    p.add_argument("--table", help="SQL stores: the records table, when SqlStore was given "
                   "table= (default: idempotency_records)")
    p.add_argument("--schema", help="SQL stores: the table's schema, when SqlStore was given "
                   "schema=")
    p.set_defaults(run=getattr(_ops, run))
    return p


def _add_inspect(sub: Any) -> None:
    p = _ops_parser(
        sub, "inspect", "run_inspect", "show one key's record",
        "Show the record of KEY in NAMESPACE: state, timestamps (UTC), lease owner and "
        "deadline, payload fingerprint, result size (never the result itself). Exit "
        "status 1 when there is no such record.")
    p.add_argument("namespace", metavar="NAMESPACE")
    p.add_argument("key", metavar="KEY", help="the key as the handler saw it (long keys are "
                   "hashed the same way the decorator does)")
    p.add_argument("--scope", help="the scope (tenant, client) the key was recorded under")


def _add_purge(sub: Any) -> None:
    from . import _ops

    p = _ops_parser(
        sub, "purge", "run_purge", "delete expired records, in batches",
        "Delete expired records in batches, each its own short transaction. Safe while "
        "workers run and while another purge runs; never deletes an in-progress record "
        "whose lease is live.")
    p.add_argument("--older-than", type=_ops.duration, metavar="AGE",
                   help="also delete records created more than AGE ago, e.g. 7d, 12h, 30m, "
                   "90 (seconds)")
    p.add_argument("--namespace", metavar="NS", help="only this namespace")
    p.add_argument("--batch", type=_batch, default=1000, metavar="N",
                   help=f"records per transaction, 1 to {MAX_BATCH:,} "
                   "(default: %(default)s)")


def _add_stats(sub: Any) -> None:
    p = _ops_parser(
        sub, "stats", "run_stats", "count records per namespace and state",
        "Count records per namespace and state (and how many of them have expired), and "
        "show the oldest in-progress record.")
    p.add_argument("--namespace", metavar="NS", help="only this namespace")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="idempotent",
        description="Effectively-exactly-once message handlers: tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_db(sub)
    _add_inspect(sub)
    _add_purge(sub)
    _add_stats(sub)
    from . import _relay

    _relay.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idempotent`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
