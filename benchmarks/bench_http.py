"""HTTP ``Idempotency-Key``: a POST endpoint that inserts one row, on uvicorn (one
worker), driven by wrk on the same machine, with and without the middleware, same run.

The script starts its own private PostgreSQL (fsync on) and redis-server on 127.0.0.1
(``tests/_servers.py``), then one uvicorn process per variant, each serving this file's
``app`` (chosen by ``BENCH_VARIANT``), all the same Starlette endpoint: parse the JSON body,
insert one ledger row on PostgreSQL (psycopg async, a pool of 20), answer 201 with JSON.

* ``bare``: no middleware; the endpoint's insert commits in its own transaction (baseline)
* ``ours, lease, Redis``: `idempotent.integrations.asgi.IdempotencyMiddleware` on
  ``RedisStore(url, use_asyncio=True)``, lease mode (claim, heartbeat, complete)
* ``ours, transactional, PostgreSQL``: the same middleware on ``SqlStore(async engine)``,
  ``transactional=True``: the endpoint's insert, the key and the response in one
  transaction
* ``idemkit, Redis``: idemkit 1.0.2's ASGI ``IdempotencyMiddleware`` on its
  ``RedisBackend`` over the same redis-server (key required, 30 s lease, no scope: the
  same work as ours without ``identity=``)

Every request has a new ``Idempotency-Key`` (first-time keys: the path that claims,
runs, stores). Rounds are interleaved (each variant ``--seconds`` of wrk per round, 2 s by
default over 15 rounds, the order rotated); requests/s and the ratio against ``bare`` are
medians over rounds (the ratio of each round's pair, seconds apart); p50/p99 latency from
wrk, medians over rounds.
Requests that were not 2xx are counted and reported (they would void a figure).

Then, in this process, each middleware alone (ours in lease mode, idemkit, and none) in
front of a trivial ASGI app on the same redis-server: sequential first-time requests,
interleaved rounds, wall and CPU µs per request: what the layer itself adds, without the
server, the endpoint and the load generator that dominate the end-to-end figures.

Run: ``.venv/bin/python benchmarks/bench_http.py [--quick] [--rounds R] [--seconds S]
[--connections C] [--json]``
"""

from __future__ import annotations

import os

if os.environ.get("BENCH_VARIANT"):  # imported by uvicorn: the app of one variant
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    VARIANT = os.environ["BENCH_VARIANT"]
    engine = create_async_engine(os.environ["BENCH_PG"], pool_size=20, max_overflow=0)
    LEDGER = sa.table("ledger", sa.column("key"), sa.column("account"), sa.column("cents"))

    async def pay(request: Request) -> Response:
        body = await request.json()
        stmt = sa.insert(LEDGER).values(key=request.headers.get("idempotency-key", ""),
                                        account=body["account"], cents=body["cents"])
        if VARIANT == "tx":
            from idempotent.integrations.asgi import session_of

            await session_of(request.scope).execute(stmt)
        else:
            async with engine.begin() as conn:
                await conn.execute(stmt)
        return JSONResponse({"status": "paid", "cents": body["cents"]}, status_code=201)

    inner = Starlette(routes=[Route("/pay", pay, methods=["POST"])])
    app: object
    if VARIANT == "bare":
        app = inner
    elif VARIANT == "lease":
        from idempotent.integrations.asgi import IdempotencyMiddleware

        from idempotent import RedisStore

        app = IdempotencyMiddleware(inner, RedisStore(os.environ["BENCH_REDIS"],
                                                      use_asyncio=True), lease=30)
    elif VARIANT == "tx":
        from idempotent.integrations.asgi import IdempotencyMiddleware

        from idempotent import SqlStore

        app = IdempotencyMiddleware(inner, SqlStore(engine), transactional=True)
    elif VARIANT == "idemkit":
        from idemkit import HttpConfig
        from idemkit import IdempotencyMiddleware as IdemkitMiddleware
        from idemkit.backends.redis import RedisBackend

        app = IdemkitMiddleware(
            inner, backend=RedisBackend.from_url(os.environ["BENCH_REDIS"]),
            config=HttpConfig(require_key_for_mutations=True, lease_ttl_seconds=30,
                              scope_mode="single_tenant"))
    else:
        raise SystemExit(f"unknown BENCH_VARIANT {VARIANT!r}")

else:
    import argparse
    import asyncio
    import itertools
    import json
    import shutil
    import statistics
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path
    from typing import Any

    import _common as C  # sets up sys.path first
    from _servers import RedisServer
    from _uvicorn import HttpServer

    HERE = Path(__file__).resolve().parent
    VARIANTS = {"bare": "bare", "ours, lease, Redis": "lease",
                "ours, transactional, PostgreSQL": "tx",
                "idemkit, Redis": "idemkit"}
    TARGETS = {"ours, lease, Redis": ("vs bare", 0.8),
               "ours, transactional, PostgreSQL": ("vs bare", 0.8)}
    WRK_SCRIPT = r"""
local counter = 0
local prefix = ""
function init(args) prefix = args[1] .. "-" .. tostring(math.random(1, 1e9)) .. "-" end
request = function()
  counter = counter + 1
  return wrk.format("POST", "/pay", {["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter}, '{"account":"acct-1","cents":100}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status + e.connect + e.read + e.write + e.timeout))
end
"""

    def wrk(url: str, script: Path, tag: str, seconds: float, connections: int
            ) -> dict[str, float]:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url + "/pay",
             "--", tag], check=True, capture_output=True, text=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        n, dur_us, p50, p99, errors = (int(x) for x in line.split()[1:])
        return {"rps": n / (dur_us / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
                "errors": errors, "requests": n}

    def main() -> None:
        ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        ap.add_argument("--quick", action="store_true")
        ap.add_argument("--json", action="store_true")
        ap.add_argument("--rounds", type=int, default=None)
        ap.add_argument("--seconds", type=float, default=None)
        ap.add_argument("--connections", type=int, default=16)
        args = ap.parse_args()
        # short slices, many rounds: on a shared machine the load changes within seconds,
        # and a round's ratios compare runs at most three slices apart
        rounds = args.rounds or (2 if args.quick else 15)
        seconds = args.seconds or (3 if args.quick else 2)
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is needed (apt install wrk)")
        tmp = Path(tempfile.mkdtemp(prefix="bench_http_"))
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        servers: dict[str, HttpServer] = {}
        with C.postgres() as pg, RedisServer() as redis_server:
            import psycopg

            from idempotent import SqlStore

            store = SqlStore(pg.url)
            store.create_schema()
            store.engine.dispose()
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, key text NOT NULL,"
                             " account text NOT NULL, cents int NOT NULL)")
                version = conn.execute("SHOW server_version").fetchone()
            async_url = pg.url.replace("postgresql+psycopg://", "postgresql+psycopg_async://")
            try:
                for name, variant in VARIANTS.items():
                    servers[name] = HttpServer("bench_http:app", {
                        "BENCH_VARIANT": variant, "BENCH_PG": async_url,
                        "BENCH_REDIS": redis_server.url_for(0)}, cwd=HERE).start()
                    wrk(servers[name].url, script, f"warm{variant}", 1, args.connections)
                runs: dict[str, list[dict[str, float]]] = {n: [] for n in VARIANTS}
                names = list(VARIANTS)
                for r in range(rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        runs[name].append(wrk(servers[name].url, script,
                                              f"r{r}{VARIANTS[name]}", seconds,
                                              args.connections))
                    C.log(args, f"  round {r + 1}/{rounds}: " + ", ".join(
                        f"{n} {runs[n][-1]['rps']:,.0f}/s" for n in names))
            finally:
                for server in servers.values():
                    server.stop()
                shutil.rmtree(tmp, ignore_errors=True)
            alone = asyncio.run(middleware_alone(redis_server.url_for(1), 3 if args.quick else 7,
                                                 300 if args.quick else 2000))
        report(args, runs, rounds, seconds, str(version[0] if version else "?"), alone)

    async def middleware_alone(url: str, rounds: int, n: int) -> dict[str, dict[str, float]]:
        """Each middleware alone, in this process: ``n`` sequential first-time requests
        through it to a trivial ASGI app, on the same redis-server; interleaved rounds.
        Wall and CPU µs per request, medians; what the layer itself costs."""
        from idemkit import HttpConfig
        from idemkit import IdempotencyMiddleware as IdemkitMiddleware
        from idemkit.backends.redis import RedisBackend
        from idempotent.integrations.asgi import IdempotencyMiddleware

        from idempotent import RedisStore

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 201,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"status":"paid"}'})

        ours_store = RedisStore(url, use_asyncio=True)
        backend = RedisBackend.from_url(url)
        apps = {"none": inner, "ours, lease, Redis": IdempotencyMiddleware(inner, ours_store),
                "idemkit, Redis": IdemkitMiddleware(inner, backend=backend, config=HttpConfig(
                    require_key_for_mutations=True, lease_ttl_seconds=30,
                    scope_mode="single_tenant"))}
        counter = itertools.count()
        body = b'{"account":"acct-1","cents":100}'

        async def drive(app: Any, count: int) -> tuple[float, float]:
            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: Any) -> None:
                pass

            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                scope = {"type": "http", "method": "POST", "path": "/pay", "query_string": b"",
                         "headers": [(b"idempotency-key", f"k{next(counter)}".encode()),
                                     (b"content-type", b"application/json")]}
                await app(scope, receive, send)
            return ((time.perf_counter() - wall) / count * 1e6,
                    (time.process_time() - cpu) / count * 1e6)

        out: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
        try:
            for app in apps.values():
                await drive(app, 100)
            names = list(apps)
            for r in range(rounds):
                for name in names[r % 3:] + names[:r % 3]:
                    out[name].append(await drive(apps[name], n))
        finally:
            await ours_store.aclose()
            await backend.aclose()
        return {name: {"wall_us": statistics.median(w for w, _ in v),
                       "cpu_us": statistics.median(c for _, c in v)} for name, v in out.items()}

    def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]],
               rounds: int, seconds: float, pg_version: str,
               alone: dict[str, dict[str, float]]) -> None:
        def med(name: str, field: str) -> float:
            return statistics.median(r[field] for r in runs[name])

        def ratio(name: str, base: str) -> list[float]:
            return [a["rps"] / b["rps"] for a, b in zip(runs[name], runs[base], strict=True)]

        rows = []
        for name in runs:
            vs_bare = ratio(name, "bare")
            rows.append({"name": name, "rps": med(name, "rps"), "p50_ms": med(name, "p50_ms"),
                         "p99_ms": med(name, "p99_ms"),
                         "errors": sum(r["errors"] for r in runs[name]),
                         "ratio_vs_bare": statistics.median(vs_bare),
                         "ratio_range": [min(vs_bare), max(vs_bare)], "rounds": runs[name]})
        vs_idemkit = statistics.median(ratio("ours, lease, Redis", "idemkit, Redis"))
        if args.json:
            print(json.dumps({"benchmark": "bench_http", "commit": C.git_describe(),
                              "postgres": pg_version, "rounds": rounds, "seconds": seconds,
                              "connections": args.connections, "variants": rows,
                              "ours_lease_vs_idemkit": vs_idemkit,
                              "middleware_alone": alone}, indent=2))
            return
        print(f"bench_http ({C.git_describe()}): uvicorn 1 worker, wrk -t1 "
              f"-c{args.connections}, {rounds} interleaved rounds of {seconds:g} s, "
              f"PostgreSQL {pg_version}, medians")
        print(f"{'variant':44} {'requests/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'vs bare':>8} {'range':>12} {'non-2xx':>7}")
        for row in rows:
            lo, hi = row["ratio_range"]
            print(f"{row['name']:44} {row['rps']:>10,.0f} {row['p50_ms']:>7.2f} "
                  f"{row['p99_ms']:>7.2f} {row['ratio_vs_bare']:>8.2f} "
                  f"{lo:>5.2f}-{hi:<5.2f} {row['errors']:>7}")
        for name, (what, target) in TARGETS.items():
            got = next(r["ratio_vs_bare"] for r in rows if r["name"] == name)
            print(f"target {name} {what} >= {target}: measured {got:.2f} -> "
                  f"{'MET' if got >= target else 'MISSED'}")
        print(f"target ours, lease, Redis vs idemkit, Redis >= 1.2: measured {vs_idemkit:.2f}"
              f" -> {'MET' if vs_idemkit >= 1.2 else 'MISSED'}")
        print("\nthe middleware alone, in-process, sequential first-time requests to a trivial "
              "app on the same redis-server (medians):")
        print(f"{'middleware':24} {'wall µs/req':>11} {'CPU µs/req':>10}")
        for name, m in alone.items():
            print(f"{name:24} {m['wall_us']:>11.0f} {m['cpu_us']:>10.0f}")
        ours, theirs, none = (alone["ours, lease, Redis"], alone["idemkit, Redis"],
                              alone["none"])
        added = {k: (ours[k] - none[k], theirs[k] - none[k]) for k in ("wall_us", "cpu_us")}
        print(f"added per request, ours vs idemkit: wall {added['wall_us'][0]:.0f} vs "
              f"{added['wall_us'][1]:.0f} µs, CPU {added['cpu_us'][0]:.0f} vs "
              f"{added['cpu_us'][1]:.0f} µs")

    if __name__ == "__main__":
        sys.exit(main())
