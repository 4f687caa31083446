"""The operations commands: ``db``, ``inspect``, ``purge`` and ``stats``.

Each ``run_*`` takes the parsed arguments and returns an exit status; `guarded` turns
every expected failure (a bad URL, an unreachable database, a missing table, an unknown
namespace) into one line on stderr and a non-zero status, never a traceback.

Exit status: 0 done; 1 nothing found (no such key or namespace) or the store failed
(unreachable, no table); 2 bad input (URL, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._record import Record, State, StoreStats
from .stores.base import Store

#: The environment variable that stands in for ``--url``.
URL_ENV = "IDEMPOTENT_URL"
#: How long the commands wait to connect to PostgreSQL before giving up.
CONNECT_TIMEOUT = 5

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


class CommandError(Exception):
    """A failure the command reports in one line, with its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w`` → seconds (argparse type)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: a number with an optional unit s, m, h, d or w")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def human(seconds: float) -> str:
    """``604800`` → ``7d``: the largest unit that divides it."""
    for unit in "dhm":
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def iso(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, milliseconds: ``2026-11-25T03:50:01.123Z``."""
    if t is None:
        return None
    if t == float("inf"):  # ttl=inf: remembered for ever
        return "never"
    stamp = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# -- opening stores and engines, failing in one line ---------------------------------------
def url_of(args: argparse.Namespace) -> str:
    url: str | None = args.url or os.environ.get(URL_ENV)
    if not url:
        raise CommandError(f"no store given: pass --url URL or set {URL_ENV}", 2)
    return url


#: The commands are synchronous: an application's async driver is swapped for its sync twin.
_SYNC_DRIVERS = {"aiosqlite": "pysqlite", "asyncpg": "psycopg", "psycopg_async": "psycopg",
                 "aiomysql": "pymysql", "asyncmy": "pymysql"}


def _sql_url(url: str) -> Any:
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise CommandError(
            "bad store URL: expected a SQLAlchemy URL such as sqlite:///idem.db or "
            "postgresql+psycopg://user@host/db, or redis://host:port", 2) from None
    sync = _SYNC_DRIVERS.get(parsed.get_driver_name())
    if sync is not None:
        parsed = parsed.set(drivername=f"{parsed.get_backend_name()}+{sync}")
    return parsed


def _engine_options(parsed: Any) -> dict[str, Any]:
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return {}


def _existing_sqlite(parsed: Any) -> None:
    """Reading a SQLite file that does not exist would create an empty one: refuse."""
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if not Path(parsed.database).exists():
        raise CommandError(f"no SQLite database at {parsed.database}")


def open_store(args: argparse.Namespace) -> Store:
    """The store of ``--url``, as the library opens it, except that a SQLite file keeps
    its journal mode; SQL URLs are checked first, and take ``--table``/``--schema`` for a
    records table not of the default name."""
    from .stores import open_store as open_any
    from .stores.sql import SqlStore

    url = url_of(args)
    sql = {k: v for k, v in (("table", args.table), ("schema", args.schema)) if v is not None}
    if url.partition("://")[0].lower() in ("redis", "rediss", "unix"):
        if sql:
            raise CommandError("--table and --schema are for SQL stores", 2)
        return open_any(url)
    parsed = _sql_url(url)
    _existing_sqlite(parsed)
    return SqlStore(_plain_engine(parsed), **sql)


def _plain_engine(parsed: Any) -> Any:
    """An engine without the store's connect hooks. A `SqlStore` made from a SQLite URL
    switches the file to WAL journal mode, which persists in the file; the commands are
    run against an application's database and must not change how it journals (the
    store works in either mode), so they open the engine themselves."""
    import sqlalchemy as sa

    options = _engine_options(parsed)
    if parsed.get_backend_name() == "sqlite":  # the store's busy timeout
        options["connect_args"] = {"timeout": 5.0}
    return sa.create_engine(parsed, poolclass=sa.NullPool, **options)


def sql_engine(url: str) -> Any:
    """An engine for the ``db`` commands (SQL only: Redis keeps no schema)."""
    if url.partition("://")[0].lower() in ("redis", "rediss", "unix"):
        raise CommandError("db commands are for SQL databases; a Redis store needs no schema",
                           2)
    return _plain_engine(_sql_url(url))


def _describe(exc: BaseException, store: Store | None) -> CommandError:
    """The one-line error for an exception a command raised."""
    import sqlalchemy as sa

    from .exceptions import IdempotencyError
    from .retry import is_transient

    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, sa.exc.NoSuchModuleError):
        return CommandError(f"bad store URL: {one_line(exc)}", 2)
    if isinstance(exc, sa.exc.ArgumentError):
        return CommandError(f"bad store URL: {one_line(exc)}", 2)
    if isinstance(exc, ImportError):
        return CommandError(f"a driver is missing: {one_line(exc)} (pip install "
                            "'idempotent-py[postgres]' or 'idempotent-py[redis]')", 2)
    if isinstance(exc, sa.exc.DBAPIError):
        table = _missing_table(store)
        if table is not None:
            return CommandError(f"the database has no table {table}: run `idempotent db "
                                "upgrade --url URL` first (or, for a table of another name, "
                                "SqlStore.create_schema())")
        detail = one_line(exc.orig if exc.orig is not None else exc)
        if is_transient(exc):
            return CommandError(f"cannot reach the database: {detail}")
        return CommandError(f"database error: {detail}")
    if isinstance(exc, (IdempotencyError, ValueError)) or _alembic_usage_error(exc):
        return CommandError(one_line(exc), 2)
    if is_transient(exc) or isinstance(exc, OSError):
        return CommandError(f"cannot reach the store: {one_line(exc)}")
    return CommandError(f"{type(exc).__name__}: {one_line(exc)} "
                        "(IDEMPOTENT_TRACEBACK=1 shows the traceback)")


def _alembic_usage_error(exc: BaseException) -> bool:
    """Alembic's own CommandError: an unknown revision and the like."""
    return type(exc).__name__ == "CommandError" and type(exc).__module__.startswith("alembic")


def _missing_table(store: Store | None) -> str | None:
    """The name of the store's records table if the database lacks it."""
    engine = getattr(store, "engine", None)
    table = getattr(store, "table", None)
    if engine is None or table is None:
        return None
    import sqlalchemy as sa

    try:
        present = sa.inspect(engine).has_table(table.name, schema=table.schema)
    except sa.exc.SQLAlchemyError:
        return None
    return None if present else str(table.fullname)


def guarded(run: Callable[[argparse.Namespace, list[Store]], int]) -> Callable[..., int]:
    """Run a command; report failures in one line on stderr; dispose what it opened."""

    def command(args: argparse.Namespace) -> int:
        opened: list[Store] = []
        try:
            return run(args, opened)
        except BrokenPipeError:  # `idempotent stats --json | head`: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        except Exception as exc:
            if os.environ.get("IDEMPOTENT_TRACEBACK"):
                raise
            error = _describe(exc, opened[0] if opened else None)
            print(f"idempotent {args.command}: error: {error}", file=sys.stderr)
            return error.status
        finally:
            for store in opened:
                engine = getattr(store, "engine", None)
                if engine is not None:
                    engine.dispose()

    return command


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def namespace_of(text: str | None) -> str | None:
    """``--namespace``/``NAMESPACE`` as the store holds it: a name over the column is
    hashed, as the decorator does (`idempotent.keys.fit`)."""
    from ._keys import fit

    return None if text is None else fit(text)


def _known_namespace(store: Store, namespace: str) -> None:
    if not store.stats(namespace).counts:
        raise CommandError(f"unknown namespace {namespace!r}: the store holds no records of it")


# -- db ------------------------------------------------------------------------------------
def _revs(revs: tuple[str, ...]) -> str:
    return ", ".join(revs) if revs else "(none)"


@guarded
def run_db(args: argparse.Namespace, opened: list[Store]) -> int:
    from . import _migrate

    url = url_of(args)
    if args.sql:  # offline: print the DDL, touch nothing
        if args.action == "current":
            raise CommandError("--sql is for upgrade and downgrade", 2)
        _migrate.sql(url, args.revision, down=args.action == "downgrade")
        return 0
    engine = sql_engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    heads = _migrate.heads()
    try:
        if args.action == "current":
            now = _migrate.current(engine)
            state = "at head" if now == heads else f"head is {_revs(heads)}"
            _emit(args, {"url": shown, "current": list(now), "head": list(heads)},
                  f"{shown}: {_revs(now)} ({state})")
            return 0
        run = {"upgrade": _migrate.upgrade, "downgrade": _migrate.downgrade,
               "stamp": _migrate.stamp}[args.action]
        done = run(engine, args.revision)
    except _migrate.AdoptionError as exc:
        raise CommandError(str(exc)) from None
    finally:
        engine.dispose()
    verb = {"upgrade": "upgraded", "downgrade": "downgraded", "stamp": "stamped"}[args.action]
    if done.adopted:
        text = (f"{shown}: adopted the existing table {_migrate.records_table_name()} "
                f"(it matches the model; it was not touched): stamped "
                f"{_migrate.FIRST_REVISION}, then upgraded to {_revs(done.after)} (the "
                f"tables a create_schema() of an older version lacked are created, those "
                f"it made are kept)")
    elif done.before == done.after:
        text = f"{shown}: already at {_revs(done.after)}; nothing to do"
    else:
        text = f"{shown}: {verb} {_revs(done.before)} -> {_revs(done.after)}"
    _emit(args, {"url": shown, "before": list(done.before), "after": list(done.after),
                 "head": list(heads), "adopted": done.adopted}, text)
    return 0


# -- inspect -------------------------------------------------------------------------------
def record_doc(record: Record, now: float) -> dict[str, Any]:
    live = (record.state is State.IN_PROGRESS and record.lease_until is not None
            and record.lease_until > now)
    return {
        "namespace": record.namespace,
        "key": record.key,
        "state": record.state.value,
        "expired": record.expires_at <= now,
        "created_at": iso(record.created_at),
        "completed_at": iso(record.completed_at),
        "expires_at": iso(record.expires_at),
        "lease": None if record.state is not State.IN_PROGRESS else {
            "owner_token": record.token,
            "until": iso(record.lease_until),
            "live": live,
        },
        "fingerprint": record.fingerprint,
        "result_bytes": None if record.result is None else len(record.result),
    }


def _record_text(doc: dict[str, Any], now: float, record: Record) -> str:
    state = doc["state"] + (" (expired: awaiting purge; a redelivery runs again)"
                            if doc["expired"] else "")
    rows = [
        ("namespace", doc["namespace"]), ("key", doc["key"]), ("state", state),
        ("created_at", doc["created_at"]), ("completed_at", doc["completed_at"] or "-"),
        ("expires_at", doc["expires_at"]),
    ]
    lease = doc["lease"]
    if lease is not None:
        left = (record.lease_until or 0.0) - now
        status = f"live, {left:.1f} s left" if lease["live"] else "ran out: may be taken over"
        rows += [("lease owner", lease["owner_token"] or "-"),
                 ("lease until", f"{lease['until']} ({status})")]
    size = doc["result_bytes"]
    rows += [("fingerprint", doc["fingerprint"] or "-"),
             ("result", "none" if size is None else f"{size} bytes")]
    return "\n".join(f"{name:<13} {value}" for name, value in rows)


@guarded
def run_inspect(args: argparse.Namespace, opened: list[Store]) -> int:
    from ._keys import fit, scoped

    store = open_store(args)
    opened.append(store)
    namespace, key = fit(args.namespace), scoped(args.key, args.scope)
    record = store.get(namespace, key)
    if record is None:
        _known_namespace(store, namespace)
        raise CommandError(f"no record of key {args.key!r} in namespace {namespace!r}")
    now = store.now()
    doc = record_doc(record, now)
    _emit(args, doc, _record_text(doc, now, record))
    return 0


# -- purge ---------------------------------------------------------------------------------
@guarded
def run_purge(args: argparse.Namespace, opened: list[Store]) -> int:
    store = open_store(args)
    opened.append(store)
    namespace = namespace_of(args.namespace)
    if namespace is not None:
        _known_namespace(store, namespace)
    started = time.perf_counter()
    deleted = store.purge(older_than=args.older_than, namespace=namespace, batch=args.batch)
    outbox_deleted = None
    if namespace is None and _outbox_counts(store) is not None:
        from .outbox import Outbox
        from .stores.sql import SqlStore

        assert isinstance(store, SqlStore)
        outbox_deleted = Outbox(store, []).purge(
            older_than=args.older_than if args.older_than is not None else OUTBOX_KEEP,
            batch=args.batch)
    seconds = time.perf_counter() - started
    what = "expired records" if args.older_than is None else (
        f"records expired or created over {human(args.older_than)} ago")
    where = "every namespace" if namespace is None else f"namespace {namespace!r}"
    outbox_text = "" if outbox_deleted is None else (
        f"; deleted {outbox_deleted:,} delivered outbox entries staged over "
        f"{human(args.older_than if args.older_than is not None else OUTBOX_KEEP)} ago "
        "(pending and unconfirmed ones are kept)")
    _emit(args, {"deleted": deleted, "older_than": args.older_than,
                 "namespace": namespace, "batch": args.batch,
                 "outbox_deleted": outbox_deleted, "seconds": round(seconds, 3)},
          f"deleted {deleted:,} {what if deleted != 1 else what.replace('records', 'record')} "
          f"in {where} ({seconds:.2f} s, batches of "
          f"{args.batch:,}); in-progress records with a live lease were kept{outbox_text}")
    return 0


#: How long `purge` keeps delivered outbox entries when no --older-than is given.
OUTBOX_KEEP = 7 * 86400.0


# -- stats ---------------------------------------------------------------------------------
def stats_doc(stats: StoreStats, now: float) -> dict[str, Any]:
    oldest = stats.oldest_in_progress
    return {
        "counts": [{"namespace": c.namespace, "state": c.state.value, "count": c.count,
                    "expired": c.expired} for c in stats.counts],
        "total": sum(c.count for c in stats.counts),
        "oldest_in_progress": None if oldest is None else {
            **record_doc(oldest, now), "age_seconds": round(now - oldest.created_at, 3)},
    }


def _stats_text(doc: dict[str, Any]) -> str:
    if not doc["counts"]:
        return "no records"
    width = max(9, *(len(c["namespace"]) for c in doc["counts"]))
    lines = [f"{'namespace':<{width}}  {'state':<11}  {'records':>9}  {'expired':>9}"]
    lines += [f"{c['namespace']:<{width}}  {c['state']:<11}  {c['count']:>9,}  "
              f"{c['expired']:>9,}" for c in doc["counts"]]
    lines.append(f"{'total':<{width}}  {'':<11}  {doc['total']:>9,}")
    oldest = doc["oldest_in_progress"]
    if oldest is None:
        lines.append("oldest in progress: none")
    else:
        lease = oldest["lease"] or {}
        status = "live" if lease.get("live") else "ran out"
        lines.append(
            f"oldest in progress: {oldest['namespace']} / {oldest['key']}, created "
            f"{oldest['created_at']} ({oldest['age_seconds']:,.0f} s ago), lease {status} "
            f"until {lease.get('until')}")
    return "\n".join(lines)


@guarded
def run_stats(args: argparse.Namespace, opened: list[Store]) -> int:
    store = open_store(args)
    opened.append(store)
    namespace = namespace_of(args.namespace)
    stats = store.stats(namespace)
    if namespace is not None and not stats.counts:
        raise CommandError(
            f"unknown namespace {namespace!r}: the store holds no records of it")
    doc = stats_doc(stats, store.now())
    text = _stats_text(doc)
    outbox = _outbox_counts(store) if namespace is None else None
    if outbox is not None:
        doc["outbox"] = outbox
    if outbox:  # (a database whose outbox is unused shows no outbox line)
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(outbox.items()))
        text += f"\noutbox: {states}"
        if outbox.get("unconfirmed"):
            text += (f" ({outbox['unconfirmed']:,} never confirmed by their consumer after "
                     "every re-publish: look at them)")
    _emit(args, doc, text)
    return 0


def _outbox_counts(store: Store) -> dict[str, int] | None:
    """Outbox entries per state, for a SQL store whose database has the outbox table."""
    import sqlalchemy as sa

    from .stores.sql import SqlStore

    if not isinstance(store, SqlStore):
        return None
    t = store.outbox
    with store.engine.connect() as conn:
        if not sa.inspect(conn).has_table(t.name, schema=t.schema):
            return None
        return {state: int(n) for state, n in conn.execute(
            sa.select(t.c.state, sa.func.count()).group_by(t.c.state))}
