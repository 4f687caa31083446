"""Ours against idemkit 1.0.2 on the same redis-server and the same PostgreSQL, same run.

The script starts its own private servers on 127.0.0.1 (``tests/_servers.py``: free
ports, the bind checked, stopped by PID): a redis-server (no persistence), then a
PostgreSQL (fsync on). On each it measures, interleaved in rounds (medians, per-round
ratios), the function surface of both libraries, sync and async, with first-time and
duplicate keys:

* Redis: ours ``@idempotent(RedisStore(url), key="id", lease=30)`` on a ``def`` handler
  and ``RedisStore(url, use_asyncio=True)`` on an ``async def`` one; theirs
  ``idemkit.idempotent_sync`` / ``idemkit.idempotent`` over ``RedisBackend.from_url``.
* PostgreSQL: ours in lease mode on ``SqlStore("postgresql+psycopg://…")`` (sync) and
  ``SqlStore("postgresql+psycopg_async://…")`` (async); theirs over
  ``PostgresBackend.from_url`` (asyncpg, its only PostgreSQL driver; its sync surface
  runs the same asyncpg code on its background event loop).

Both get the same payload (``{"id", "account", "cents"}``), the same trivial handler
(counts its runs, returns ``{"status": "ok", "id": ...}``), a 30 s lease and a 1 h
retention. What each side computes per call:

* ours: the key is ``msg["id"]`` as given (with the namespace, in the record's name);
  the fingerprint is SHA-256 of the canonical JSON of the arguments (its default);
  the result is stored as JSON.
* theirs: the key is ``key_fields=["msg.id"]``: SHA-256 of the canonical JSON of
  ``{"msg.id": id}``, then SHA-256 of the length-prefixed (tool name, version, that
  hash, scope) (``compose_key``); the payload check is ``validation_fingerprint``,
  given SHA-256 of the canonical JSON of ``msg`` (json.dumps, sorted keys), i.e. the
  same check as ours. Without it idemkit's method surface checks no payload at all
  (a constant fingerprint), so leaving it out would compare unequal work. Its result
  codec is JSON (default), ``use_local_cache`` is off (default: a duplicate goes to
  the store), no ``scope`` (single tenant, like ours without ``scope=``).

Both run their lease heartbeat (theirs: a task per call next to the handler's task;
the sync surface also hops to its background loop and runs the handler on a worker
thread, ``asyncio.to_thread``).

Then, outside the timed rounds, **what each call sends**: new instances of every
variant talk to the server through an in-process TCP relay that counts round trips
(a turn = client bytes after server bytes on a connection) and, for PostgreSQL, the
frontend messages (``Q`` simple query, ``P`` parse, ``E`` execute); Redis commands by
name come from ``INFO commandstats`` (commands run inside Lua scripts included), the
PostgreSQL WAL written per call from ``pg_current_wal_lsn()``.

``--baseline REV`` adds our package at git revision ``REV`` (``git archive``, imported
as ``idempotent_baseline``) as ``baseline: ours, ...`` variants, interleaved with the
others, against the same servers, compared with idemkit like ours.

Run: ``.venv/bin/python benchmarks/bench_vs_idemkit.py [--quick] [--json] [--rounds R]
[--n N] [--baseline REV] [--stores redis,postgres]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import os
import select
import socket
import statistics
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _common as C  # sets up sys.path first

INSTALL_HINT = ".venv/bin/pip install -e '.[bench]'"
MEASURED_VERSION = "1.0.2"

try:
    import asyncpg
    import greenlet  # noqa: F401  (SQLAlchemy's async bridge, for ours)
    import idemkit
    import redis
    import redis.asyncio
    from idemkit.backends.postgres import PostgresBackend, init_pg
    from idemkit.backends.redis import RedisBackend
    from idemkit.core.sync_bridge import run_sync
except ImportError as exc:  # pragma: no cover - depends on the environment
    print(f"bench_vs_idemkit needs idemkit {MEASURED_VERSION} with its postgres and redis "
          f"extras ({exc}). Install them with:\n  {INSTALL_HINT}", file=sys.stderr)
    sys.exit(2)

from _servers import RedisServer  # noqa: E402

LEASE = 30
TTL = 3600
TARGET_RATIO = 1.3
TARGET_CPU = 1.5
COUNT_N = 200  # calls per variant in the round-trip count
KINDS = ("first-time", "duplicate")
MODES = ("sync", "async")

RUNS = [0]  # handler runs, to check that first-time calls ran it and duplicates did not


def handler(msg: dict[str, Any]) -> dict[str, Any]:
    RUNS[0] += 1
    return {"status": "ok", "id": msg["id"]}


async def ahandler(msg: dict[str, Any]) -> dict[str, Any]:
    RUNS[0] += 1
    return {"status": "ok", "id": msg["id"]}


def canonical_payload(arguments: Any) -> bytes:
    """idemkit's ``validation_fingerprint``: canonical JSON of the payload (it hashes
    these bytes with SHA-256), the check ours does by default."""
    return json.dumps(arguments["msg"], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def theirs_config() -> Any:
    return idemkit.MethodConfig(key_fields=["msg.id"], validation_fingerprint=canonical_payload,
                                lease_ttl_seconds=LEASE, expires_after_seconds=TTL)


# -- the decorated functions of both libraries -------------------------------------------------
@dataclass
class Side:
    """One decorated function and how to call and close it."""

    fn: Callable[..., Any]
    is_async: bool
    close: Callable[[], None]


@dataclass
class Urls:
    redis: str = ""
    sa_pg: str = ""  # SQLAlchemy, psycopg 3
    asyncpg: str = ""


class Libraries:
    """Builds every variant's decorated function for a store, given its URLs (the
    servers' own, or the counting relay's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, baseline: Any = None) -> None:
        self.loop = loop
        self.baseline = baseline
        self.ours_lib = importlib.import_module("idempotent")

    def _ours_redis_cls(self, lib: Any) -> Any:
        return importlib.import_module(f"{lib.__name__}.stores.redis").RedisStore

    def ours(self, store: str, mode: str, urls: Urls, which: str = "ours") -> Side:
        lib = self.baseline if which == "baseline" else self.ours_lib
        ns = f"bench.vs.{which}.{mode}"
        if store == "redis":
            cls = self._ours_redis_cls(lib)
            st = cls(urls.redis) if mode == "sync" else cls(urls.redis, use_asyncio=True)
            close = (st.close if mode == "sync"
                     else lambda: self.loop.run_until_complete(st.aclose()))
        else:
            if mode == "sync":
                st = lib.SqlStore(urls.sa_pg)
                close = st.engine.dispose
            else:
                st = lib.SqlStore(urls.sa_pg.replace("+psycopg:", "+psycopg_async:"))
                close = lambda: self.loop.run_until_complete(st.async_engine.dispose())  # noqa: E731
        fn = lib.idempotent(st, key="id", namespace=ns, lease=LEASE, ttl=TTL)(
            handler if mode == "sync" else ahandler)
        return Side(fn, mode == "async", close)

    def theirs(self, store: str, mode: str, urls: Urls) -> Side:
        backend = (RedisBackend.from_url(urls.redis) if store == "redis"
                   else PostgresBackend.from_url(urls.asyncpg))
        if mode == "sync":
            fn = idemkit.idempotent_sync(backend=backend, config=theirs_config())(handler)
            return Side(fn, False, lambda: run_sync(backend.aclose()))
        fn = idemkit.idempotent(backend=backend, config=theirs_config())(ahandler)
        return Side(fn, True, lambda: self.loop.run_until_complete(backend.aclose()))

    def side(self, who: str, store: str, mode: str, urls: Urls) -> Side:
        if who == "idemkit":
            return self.theirs(store, mode, urls)
        return self.ours(store, mode, urls, "baseline" if who == "baseline: ours" else "ours")


# -- timing --------------------------------------------------------------------------------------
class Runner:
    def __init__(self, loop: asyncio.AbstractEventLoop, n_dups: int) -> None:
        self.loop = loop
        self.counter = itertools.count()
        self.n_dups = n_dups

    def messages(self, n: int) -> list[dict[str, Any]]:
        return [{"id": f"m-{next(self.counter)}", "account": "acct-0042", "cents": 1234}
                for _ in range(n)]

    def call_all(self, side: Side, msgs: list[dict[str, Any]]) -> list[Any]:
        """Call ``side`` once per message, untimed."""
        out: list[Any] = []
        self._loop_of(side, msgs, out)()
        return out

    def _loop_of(self, side: Side, msgs: list[dict[str, Any]], out: list[Any]
                 ) -> Callable[[], object]:
        fn = side.fn
        if side.is_async:
            async def go() -> None:
                for m in msgs:
                    out.append(await fn(m))

            return lambda: self.loop.run_until_complete(go())

        def loop() -> None:
            for m in msgs:
                out.append(fn(m))

        return loop

    def variant(self, side: Side, kind: str) -> C.Variant:
        dups = self.messages(self.n_dups) if kind == "duplicate" else []
        if dups:
            self.call_all(side, dups)  # complete them once: later calls are duplicates

        def run(n: int) -> tuple[float, float]:
            msgs = ([dups[i % len(dups)] for i in range(n)] if dups else self.messages(n))
            out: list[Any] = []
            runs0 = RUNS[0]
            t = C.timed(self._loop_of(side, msgs, out))
            ran = RUNS[0] - runs0
            if ran != (n if kind == "first-time" else 0):
                raise AssertionError(f"{kind}: the handler ran {ran} times for {n} calls")
            bad = [o for o, m in zip(out, msgs, strict=True)
                   if o != {"status": "ok", "id": m["id"]}]
            if bad:
                raise AssertionError(f"{kind}: unexpected results, e.g. {bad[0]!r}")
            return t

        return run


def vname(who: str, mode: str, kind: str) -> str:
    return f"{who}, {mode}, {kind}"


def measure(store: str, libs: Libraries, runner: Runner, urls: Urls, whos: list[str],
            args: argparse.Namespace) -> tuple[dict[str, C.Result], list[Side]]:
    sides = {(who, mode): libs.side(who, store, mode, urls) for who in whos for mode in MODES}
    variants: dict[str, C.Variant] = {}
    against: dict[str, str] = {}
    for mode in MODES:
        for kind in KINDS:
            for who in whos:
                name = vname(who, mode, kind)
                variants[name] = runner.variant(sides[who, mode], kind)
                against[name] = vname("idemkit", mode, kind)
    res = C.interleave(variants, rounds=args.rounds, n=args.n, baseline=against, args=args,
                       label=f"{store}: ")
    return res, list(sides.values())


# -- counting what goes over the wire --------------------------------------------------------
class _PgFrontend:
    """Splits the client->server byte stream of one PostgreSQL connection into messages
    and counts them by type (after the untyped SSLRequest/StartupMessage)."""

    _NEGOTIATION = (80877103, 80877104)  # SSLRequest, GSSENCRequest

    def __init__(self) -> None:
        self.buf = b""
        self.startup = True

    def feed(self, data: bytes, counts: Counter[str]) -> None:
        self.buf += data
        while True:
            buf = self.buf
            if self.startup:
                if len(buf) < 8:
                    return
                n = int.from_bytes(buf[:4], "big")
                if len(buf) < n:
                    return
                code = int.from_bytes(buf[4:8], "big")
                self.buf = buf[n:]
                if code not in self._NEGOTIATION:
                    self.startup = False
                continue
            if len(buf) < 5:
                return
            n = int.from_bytes(buf[1:5], "big")
            if len(buf) < 1 + n:
                return
            counts[chr(buf[0])] += 1
            self.buf = buf[1 + n:]


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts round trips (a turn: client bytes after
    server bytes, per connection) and, with ``pg=True``, PostgreSQL frontend messages.
    Adds latency: used only for counting, never in the timed rounds."""

    def __init__(self, host: str, port: int, *, pg: bool = False) -> None:
        self.target = (host, port)
        self.pg = pg
        self.turns = 0
        self.messages: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, name="count-relay", daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.turns = 0
            self.messages.clear()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parser = _PgFrontend() if self.pg else None
        last = ""
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [])
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        with self.lock:
                            if last != "c":
                                self.turns += 1
                            if parser is not None:
                                parser.feed(data, self.messages)
                        last = "c"
                        upstream.sendall(data)
                    else:
                        last = "s"
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def count_calls(store: str, libs: Libraries, runner: Runner, relay: CountingRelay,
                urls: Urls, whos: list[str], probe: Callable[[], Any],
                reset_probe: Callable[[], object], probe_delta: Callable[[Any, Any, int], Any]
                ) -> dict[str, dict[str, Any]]:
    """Per call of every variant, through ``relay``: round trips, frontend messages, and
    what ``probe`` reads on the server (commandstats, WAL position)."""
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        for who in whos:
            side = libs.side(who, store, mode, urls)
            try:
                warm = runner.messages(20)
                runner.call_all(side, warm)  # connections, scripts, prepared statements
                runner.call_all(side, warm)
                fresh, dups = runner.messages(COUNT_N), runner.messages(COUNT_N)
                runner.call_all(side, dups)
                for kind, msgs in (("first-time", fresh), ("duplicate", dups)):
                    reset_probe()
                    before = probe()
                    relay.reset()
                    runner.call_all(side, msgs)
                    with relay.lock:
                        turns, msg_counts = relay.turns, dict(relay.messages)
                    after = probe()
                    out[vname(who, mode, kind)] = {
                        "round_trips": turns / COUNT_N,
                        "frontend_messages": {k: v / COUNT_N
                                              for k, v in sorted(msg_counts.items())},
                        "server": probe_delta(before, after, COUNT_N),
                    }
            finally:
                side.close()
    return out


def redis_counts(store_url: str, libs: Libraries, runner: Runner, whos: list[str]
                 ) -> dict[str, dict[str, Any]]:
    host_port = store_url.split("//")[1].split("/")[0]
    host, port = host_port.rsplit(":", 1)
    relay = CountingRelay(host, int(port))
    admin = redis.Redis.from_url(store_url)
    skip = {"cmdstat_info", "cmdstat_config|resetstat"}

    def probe() -> Any:
        return None

    def delta(_b: Any, _a: Any, n: int) -> dict[str, float]:
        stats = admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] / n for k, v in sorted(stats.items())
                if k not in skip}

    try:
        return count_calls("redis", libs, runner, relay,
                           Urls(redis=f"redis://127.0.0.1:{relay.port}/0"), whos, probe,
                           admin.config_resetstat, delta)
    finally:
        relay.close()
        admin.close()


def pg_counts(pg: Any, libs: Libraries, runner: Runner, whos: list[str]
              ) -> dict[str, dict[str, Any]]:
    import psycopg

    relay = CountingRelay(pg.host, pg.port, pg=True)
    admin = psycopg.connect(pg.dsn, autocommit=True)

    def probe() -> Any:
        return admin.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]

    def delta(b: Any, a: Any, n: int) -> dict[str, float]:
        diff = admin.execute("SELECT pg_wal_lsn_diff(%s, %s)", (a, b)).fetchone()[0]  # type: ignore[index]
        return {"wal_bytes": float(diff) / n}

    urls = Urls(sa_pg=f"postgresql+psycopg://{pg.user}@127.0.0.1:{relay.port}/{pg.dbname}",
                asyncpg=f"postgresql://{pg.user}@127.0.0.1:{relay.port}/{pg.dbname}")
    try:
        return count_calls("postgres", libs, runner, relay, urls, whos, probe,
                           lambda: None, delta)
    finally:
        relay.close()
        admin.close()


# -- report ----------------------------------------------------------------------------------------
def cpu_ratio(res: dict[str, C.Result], who: str, kind: str) -> tuple[float, float, float]:
    a, s = res[vname(who, "async", kind)], res[vname(who, "sync", kind)]
    per_round = [x / y for x, y in zip(a.cpu_seconds, s.cpu_seconds, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def target_lines(label: str, res: dict[str, C.Result], whos: list[str]
                 ) -> tuple[list[str], list[dict[str, Any]]]:
    lines: list[str] = []
    targets: list[dict[str, Any]] = []
    for who in [w for w in whos if w != "idemkit"]:
        short = "ours" if who == "ours" else "baseline"
        for mode in MODES:
            for kind in KINDS:
                r = res[vname(who, mode, kind)]
                assert r.ratio is not None and r.ratio_range is not None
                lo, hi = r.ratio_range
                met = r.ratio >= TARGET_RATIO
                what = f"{label}, {mode}, {kind}"
                prefix = "" if who == "ours" else "(baseline) "
                lines.append(
                    f"target {prefix}{what}: {short} vs idemkit >= {TARGET_RATIO:.1f}x calls/s: "
                    f"measured {r.ratio:.2f}x (rounds {lo:.2f}-{hi:.2f}) -> "
                    f"{'MET' if met else 'MISSED'}")
                targets.append({"what": f"{what}: {short}/idemkit calls/s", "target": TARGET_RATIO,
                                "comparison": ">=", "measured": r.ratio, "min": lo, "max": hi,
                                "met": met})
        for kind in KINDS:
            m, lo, hi = cpu_ratio(res, who, kind)
            met = m <= TARGET_CPU
            a = res[vname(who, "async", kind)].cpu_per_op_us
            s = res[vname(who, "sync", kind)].cpu_per_op_us
            prefix = "" if who == "ours" else "(baseline) "
            lines.append(
                f"target {prefix}{label}, {kind}: {short} async client CPU / {short} sync "
                f"client CPU <= {TARGET_CPU:.1f}: measured {m:.2f} (rounds {lo:.2f}-{hi:.2f}; "
                f"{a:.0f} / {s:.0f} µs/call) -> {'MET' if met else 'MISSED'}")
            targets.append({"what": f"{label}, {kind}: {short} async/sync client CPU",
                            "target": TARGET_CPU, "comparison": "<=", "measured": m,
                            "min": lo, "max": hi, "met": met})
    return lines, targets


def cpu_table(res: dict[str, C.Result], whos: list[str]) -> str:
    rows = []
    for who in whos:
        for kind in KINDS:
            m, lo, hi = cpu_ratio(res, who, kind)
            rows.append([f"{who}, {kind}", f"{res[vname(who, 'sync', kind)].cpu_per_op_us:.0f}",
                         f"{res[vname(who, 'async', kind)].cpu_per_op_us:.0f}",
                         f"{m:.2f}", f"{lo:.2f}-{hi:.2f}"])
    return C.table(["client CPU µs/call", "sync", "async", "async/sync", "range"], rows)


def baseline_table(res: dict[str, C.Result]) -> str:
    """Ours against the baseline revision: calls/s ratio per round, median and range."""
    rows = []
    for mode in MODES:
        for kind in KINDS:
            o, b = res[vname("ours", mode, kind)], res[vname("baseline: ours", mode, kind)]
            per_round = [bs / os_ for os_, bs in zip(o.seconds, b.seconds, strict=True)]
            rows.append([f"{mode}, {kind}", f"{statistics.median(per_round):.2f}",
                         f"{min(per_round):.2f}-{max(per_round):.2f}"])
    return C.table(["ours / baseline calls/s", "median", "range"], rows)


def counts_table(counts: dict[str, dict[str, Any]], store: str) -> str:
    rows = []
    for name, c in counts.items():
        msgs = " ".join(f"{k}={v:g}" for k, v in c["frontend_messages"].items()) or "-"
        if store == "redis":
            server = " ".join(f"{k}={v:g}" for k, v in c["server"].items()) or "-"
            rows.append([name, f"{c['round_trips']:g}", server])
        else:
            rows.append([name, f"{c['round_trips']:g}", msgs, f"{c['server']['wal_bytes']:,.0f}"])
    if store == "redis":
        return C.table(["variant", "round trips", "Redis commands (incl. inside scripts)"], rows)
    return C.table(["variant", "round trips", "frontend messages (Q/P/B/E/S…)", "WAL bytes"],
                   rows)


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--baseline", metavar="REV", default=None,
                        help="also run our package at git revision REV, interleaved")
        ap.add_argument("--stores", default="redis,postgres",
                        help="comma-separated subset of redis,postgres")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=1000, quick_rounds=2, quick_n=200,
                        extra=extra)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := set(stores) - {"redis", "postgres"}:
        raise SystemExit(f"--stores: unknown {sorted(unknown)}")
    if idemkit.__version__ != MEASURED_VERSION:
        C.log(args, f"warning: idemkit {idemkit.__version__} installed, this benchmark was "
                    f"written for {MEASURED_VERSION} ({INSTALL_HINT})")
    # idemkit warns at decoration that a tool without scope= is single-tenant: it is here
    warnings.filterwarnings("ignore", message=r"idemkit: tool .* has no scope")
    baseline = None
    if args.baseline:
        from bench_overhead import load_baseline

        baseline = load_baseline(args.baseline)
    whos = ["idemkit", "ours"] + (["baseline: ours"] if baseline is not None else [])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    libs = Libraries(loop, baseline)
    runner = Runner(loop, min(args.n, 1000))
    load_start = os.getloadavg()
    versions: dict[str, str] = {"idemkit": idemkit.__version__, "asyncpg": asyncpg.__version__,
                                "redis-py": redis.__version__}
    results: dict[str, dict[str, C.Result]] = {}
    counts: dict[str, dict[str, dict[str, Any]]] = {}

    if "redis" in stores:
        with RedisServer() as server:
            info = server.command("INFO", "server").decode()
            versions["redis-server"] = info.split("redis_version:")[1].split("\r")[0]
            C.log(args, f"redis-server {versions['redis-server']} on {server.url}")
            res, sides = measure("redis", libs, runner, Urls(redis=server.url), whos, args)
            for side in sides:
                side.close()
            results["redis"] = res
            C.log(args, "redis: counting round trips and commands")
            counts["redis"] = redis_counts(server.url, libs, runner, whos)

    if "postgres" in stores:
        with C.postgres() as pg:
            versions["postgresql"] = str(pg.execute("SHOW server_version")[0][0])
            C.log(args, f"PostgreSQL {versions['postgresql']} on {pg.host}:{pg.port}")
            urls = Urls(sa_pg=pg.url, asyncpg=f"postgresql://{pg.user}@{pg.host}:{pg.port}/"
                                               f"{pg.dbname}")
            schema = libs.ours_lib.SqlStore(pg.url)
            schema.create_schema()
            schema.engine.dispose()
            loop.run_until_complete(init_pg(urls.asyncpg))
            res, sides = measure("postgres", libs, runner, urls, whos, args)
            for side in sides:
                side.close()
            results["postgres"] = res
            C.log(args, "postgres: counting round trips and statements")
            counts["postgres"] = pg_counts(pg, libs, runner, whos)
    load_end = os.getloadavg()

    lines = [
        f"bench_vs_idemkit ({C.git_describe()}): ours vs idemkit {idemkit.__version__}, function "
        f"surface, lease {LEASE} s, ttl {TTL} s; {args.n:,} calls per variant per round, "
        f"{args.rounds} interleaved rounds, medians; ratio = ours calls/s / idemkit calls/s "
        "of the same round",
        "both fingerprint the payload with SHA-256 of its canonical JSON; idemkit also hashes "
        "its key twice (key_fields then compose_key); ours stores the key as given",
        "client CPU = process CPU time (every thread: idemkit's sync surface runs a "
        "background loop and a worker thread) per call; the servers' CPU is not in it",
        f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; python "
        f"{sys.version.split()[0]}; {os.cpu_count()} CPUs; load average (1/5/15 min) at "
        f"start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, at end "
        f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}",
        "",
    ]
    targets: list[dict[str, Any]] = []
    labels = {"redis": "Redis", "postgres": "PostgreSQL"}
    for store, res in results.items():
        lines.append(f"{labels[store]} ({'no persistence' if store == 'redis' else 'fsync on'}"
                     ", loopback, one client each, sequential calls):")
        h, rows = C.result_rows(res, rate_label="calls/s")
        lines += [C.table(h, rows), "", cpu_table(res, whos), ""]
        if "baseline: ours" in whos:
            lines += [baseline_table(res), ""]
        lines.append(f"{labels[store]}, per call ({COUNT_N} calls each, through a counting "
                     "relay, outside the timed rounds)" + (
                         ":" if store == "redis" else "; frontend messages: Q simple query, "
                         "P parse, B bind, D describe, E execute, S sync; WAL from "
                         "pg_current_wal_lsn():"))
        lines += [counts_table(counts[store], store), ""]
    for store, res in results.items():
        tl, t = target_lines(labels[store], res, whos)
        lines += tl
        targets += t
    doc = {
        "benchmark": "vs_idemkit", "rounds": args.rounds, "calls_per_round": args.n,
        "versions": versions, "loadavg_start": load_start, "loadavg_end": load_end,
        "results": {s: [r.as_dict() for r in res.values()] for s, res in results.items()},
        "per_call": counts, "targets": targets,
    }
    C.report(args, doc, "\n".join(lines))


if __name__ == "__main__":
    main()
