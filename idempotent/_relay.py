"""The ``idempotent relay`` command of the outbox (`idempotent.outbox`)."""


from __future__ import annotations

import argparse
import importlib
import signal
import threading
from collections.abc import Iterable
from typing import Any

from ._ops import CommandError, _emit, guarded, open_store
from .stores.base import Store

DESCRIPTION = (
    "Publish what producers staged in the outbox and could not publish themselves (they "
    "died after COMMIT, or the broker was down), and re-publish what no consumer has "
    "confirmed. Run one or more, for as long as producers run; on PostgreSQL each picks "
    "its entries with FOR UPDATE SKIP LOCKED. Stops on SIGTERM or SIGINT after the pass "
    "it is in."
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "relay", help="publish staged outbox messages (a long-running worker)",
        description=DESCRIPTION)
    p.add_argument("--url", help="the database of the outbox, a SQLAlchemy URL "
                   "(default: $IDEMPOTENT_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--celery-broker", metavar="URL",
                     help="publish Celery tasks to this broker (redis://, amqp://)")
    who.add_argument("--publishers", metavar="MODULE:NAME",
                     help="a Publisher, an iterable of them, or a callable returning either")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="pause between passes when there is no work (default: %(default)s)")
    p.add_argument("--batch", type=int, default=100, metavar="N",
                   help="entries per pass and transaction (default: %(default)s)")
    p.add_argument("--confirm-after", type=float, default=60.0, metavar="SECONDS",
                   help="seconds from a publish to the first re-check of its confirmation "
                   "(default: %(default)s)")
    p.add_argument("--max-publishes", type=int, default=10, metavar="N",
                   help="relay publishes of one entry before it is reported unconfirmed "
                   "(default: %(default)s)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(run=run_relay, table=None, schema=None)


def _publishers(args: argparse.Namespace) -> list[Any]:
    if args.celery_broker:
        try:
            from celery import Celery
        except ImportError:
            raise CommandError("--celery-broker needs Celery: pip install "
                               "'idempotent-py[celery]'", 2) from None
        from idempotent.integrations.celery_outbox import CeleryPublisher

        return [CeleryPublisher(Celery("idempotent-relay", broker=args.celery_broker,
                                       set_as_current=False))]
    module_name, _, attr = args.publishers.partition(":")
    if not module_name or not attr:
        raise CommandError(f"--publishers {args.publishers!r}: expected MODULE:NAME", 2)
    try:
        found: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CommandError(f"--publishers {args.publishers!r}: {exc}", 2) from None
    try:
        if callable(found) and not hasattr(found, "publish"):
            found = found()
        publishers = [found] if hasattr(found, "publish") else list(found)
    except Exception as exc:
        raise CommandError(f"--publishers {args.publishers!r}: {type(exc).__name__}: "
                           f"{exc}", 2) from None
    if not publishers or not all(hasattr(p, "publish") and hasattr(p, "name")
                                 for p in publishers):
        raise CommandError(f"--publishers {args.publishers!r} gave no publishers (objects "
                           "with .name and .publish(entry))", 2)
    return publishers


@guarded
def run_relay(args: argparse.Namespace, opened: list[Store]) -> int:
    from .outbox import Outbox
    from .stores.sql import SqlStore

    store = open_store(args)
    opened.append(store)
    if not isinstance(store, SqlStore):
        raise CommandError("the outbox lives in a SQL database: give a SQLAlchemy URL", 2)
    publishers: Iterable[Any] = _publishers(args)
    outbox = Outbox(store, publishers, confirm_after=args.confirm_after,
                    max_publishes=args.max_publishes)
    if args.once:
        report = outbox.relay_once(batch=args.batch)
    else:
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            report = outbox.run_relay(interval=args.interval, batch=args.batch, stop=stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    outbox.close()
    stats = outbox.stats().counts
    doc = {"published": report.published, "republished": report.republished,
           "confirmed": report.confirmed, "unconfirmed": report.unconfirmed,
           "failed": report.failed, "entries": stats}
    states = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())) or "none"
    _emit(args, doc, f"published {report.published:,}, re-published {report.republished:,}, "
          f"confirmed {report.confirmed:,}, gave up on {report.unconfirmed:,}, publish "
          f"failures {report.failed:,}; outbox entries now: {states}")
    return 0
