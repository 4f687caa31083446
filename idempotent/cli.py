"""The ``idempotent`` command line.

Each subcommand is one ``_add_<name>`` function that declares its arguments and sets
``run`` to a function ``(args) -> exit code``; its module is imported only when it runs,
so ``idempotent --help`` stays quick.
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idempotent`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
