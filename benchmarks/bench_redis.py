"""RedisStore against aws-lambda-powertools' Redis persistence layer, same Redis, same run.

The script starts its own redis-server on 127.0.0.1 (``tests/_servers.py``, no
persistence) and measures, interleaved in rounds (medians, per-round ratios):

* ``first-time key``: ``@idempotent(RedisStore(...), key="id", lease=30)`` against
  powertools' ``@idempotent_function(persistence_store=RedisCachePersistenceLayer(...))``,
  a new key on every call (ours: claim + complete; theirs: SET NX + SET).
* ``duplicate key``: the same handlers called with keys they already completed.
* ``batch``: ``RedisStore.claim_many`` of 100 keys against 100 sequential
  ``RedisStore.claim`` calls (messages per second).

Both decorators get the same payload ({"id", "account", "cents"}) and handler; ours
fingerprints the whole payload (its default, SHA-256 of canonical JSON), theirs hashes
the key only (MD5; payload validation off, as its Redis layer loses the validation hash
on completion). Both use redis-py with hiredis, one client each, ``ttl`` 1 hour.

Then, outside the timed rounds:

* **record layout**: server CPU per script call of the hash layout against a packed
  string twin of the claim and complete scripts;
* **commands per call**, from ``INFO commandstats`` after ``CONFIG RESETSTAT``: what
  the client sends (ours: EVALSHA) and, for ours, the commands the scripts run inside
  Redis, listed apart;
* **Python overhead per call**, with an in-process fake client for each library (no
  socket, no redis-py): a dict that answers exactly the calls each library makes (ours:
  ``execute_command("EVALSHA", ...)`` of the claim and complete scripts; theirs:
  ``set``/``get``/``delete``), each fake doing one dict look-up or store per command and
  replying in the types real redis-py would return. Overhead = decorated call minus the
  bare handler, per round, median. The same decorator on ``MemoryStore`` runs alongside:
  the part of the overhead that is the decorator's, not RedisStore's.

``--baseline REV`` adds the package of git revision ``REV`` (``git archive``, imported as
``idempotent_baseline``) as ``baseline: ours, ...`` variants, interleaved with the others
in the same process, against the same server and with the same fake clients: an A/B of
our own changes that the machine's load hits alike on both sides.

A ``RedisStore`` made from a URL (as here) runs its scripts on connections it keeps out of
redis-py's pool between calls (`idempotent.stores.redis._Connections`); powertools' layer,
given a client, goes through ``client.set``/``get``, i.e. redis-py's ``execute_command``
with a pool checkout per command, as it would in production.

Run: ``.venv/bin/python benchmarks/bench_redis.py [--quick] [--json] [--rounds R] [--n N]
[--baseline REV]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import _common as C  # sets up sys.path first
import redis
from _servers import RedisServer
from bench_overhead import load_baseline

from idempotent import MemoryStore, idempotent
from idempotent.stores import _redis_scripts as lua
from idempotent.stores.redis import RedisStore

TARGET_FIRST = 1.2
TARGET_DUP = 2.5
TARGET_OVERHEAD_US = 15.0
BATCH = 100


def ours_handler(msg: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "id": msg["id"]}


def theirs_handler(msg: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "id": msg["id"]}


def _stub_boto3() -> None:
    """Powertools' idempotency package imports its DynamoDB layer, hence boto3, on import;
    boto3 is not installed here and the Redis layer never uses it: empty stand-ins for the
    three names that module imports let the package load."""
    import sys
    import types

    try:
        import boto3  # noqa: F401
        return
    except ImportError:
        pass
    client_error = type("ClientError", (Exception,), {})
    names: dict[str, dict[str, Any]] = {
        "boto3": {}, "boto3.dynamodb": {}, "boto3.dynamodb.types": {"TypeDeserializer": object},
        "botocore": {}, "botocore.exceptions": {"ClientError": client_error},
    }
    for name, attrs in names.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules.setdefault(name, mod)


def powertools(client: Any) -> Callable[..., Any]:
    """Powertools' ``idempotent_function`` over its Redis layer with ``client``."""
    _stub_boto3()
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # renamed CachePersistenceLayer
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )

        layer = RedisCachePersistenceLayer(client=client)
    config = IdempotencyConfig(event_key_jmespath="id", expires_after_seconds=3600)
    return idempotent_function(  # type: ignore[no-any-return]
        data_keyword_argument="msg", persistence_store=layer, config=config)(theirs_handler)


def ours(store: RedisStore | MemoryStore, lib: Any = None) -> Callable[..., Any]:
    decorator = idempotent if lib is None else lib.idempotent
    return decorator(store, key="id", namespace="bench.redis", lease=30, ttl=3600)(
        ours_handler)


def redis_store_class(lib: Any) -> Any:
    """``RedisStore`` of the package ``lib`` (the baseline's, for ``--baseline``)."""
    return importlib.import_module(f"{lib.__name__}.stores.redis").RedisStore


# -- in-process fakes (the Python overhead) -----------------------------------------------------
class _Encoder:
    decode_responses = False


def _enc(value: Any) -> bytes:
    """An argument as Redis receives it (redis-py's encoder: repr of a float)."""
    if type(value) is bytes:
        return value
    return (repr(value) if type(value) is float else str(value)).encode()


def _time() -> tuple[float, bytes]:
    """Redis' ``TIME`` as the scripts read it (``<seconds>.<6-digit µs>``): number, text."""
    text = b"%d.%06d" % divmod(time.time_ns() // 1000, 1_000_000)
    return float(text), text


def _clock(arg: Any) -> tuple[float, bytes]:
    """The scripts' ``clock(ARGV[i])``: the caller's ``now``, or ``TIME`` for ``""``."""
    if arg == "":
        return _time()
    text = _enc(arg)
    return float(text), text


# A record is what the hash holds: [v, s, f, r, t, l, c, d, e] as bytes (None: no field),
# the order of the scripts' HMGET; a claim that reports it answers [code, *record].
_V = b"1"


def _claim_time(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]) -> list[Any]:
    """`_redis_scripts.CLAIM` since ad14c00 (STORE TIME): ARGV now ('' for TIME), token,
    lease, ttl, keep_ms[, fp]; answers [1|2, lease deadline] or [3|4, *record(, now)]."""
    now, snow = _clock(argv[0])
    token = argv[1].encode()
    rec = data.get(name)
    code = 1
    if rec is not None:
        if float(rec[8]) > now:  # not expired
            if rec[1] != b"i":
                return [3, *rec]
            if float(rec[5]) > now:  # a live lease
                if rec[4] == token:
                    return [1, rec[5]]
                return [4, *rec, snow]
            code = 2  # its lease ran out: a takeover
        del data[name]
    lease_until = b"%.17g" % (now + float(argv[2]))
    data[name] = [_V, b"i", argv[5].encode() if len(argv) > 5 else None, None, token,
                  lease_until, snow, None, b"%.17g" % (now + float(argv[3]))]
    return [code, lease_until]


def _complete_time(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]) -> int:
    """`COMPLETE` since ad14c00: ARGV token, state, now ('' for TIME), ttl, ttl_ms
    [, result]; 1 done, 0 not the token's."""
    rec = data.get(name)
    if rec is None or rec[4] != argv[0].encode():
        return 0
    now, snow = _clock(argv[2])
    rec[1], rec[8] = argv[1], b"%.17g" % (now + float(argv[3]))
    rec[7] = rec[7] or snow
    rec[3] = argv[5] if len(argv) > 5 else None
    rec[5] = None
    return 1


def _renew_time(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]) -> Any:
    """`RENEW` since ad14c00: ARGV token, now ('' for TIME), lease, lease_ms; the new
    lease deadline (text), or 0."""
    rec = data.get(name)
    if rec is None or rec[4] != argv[0].encode() or rec[1] != b"i":
        return 0
    rec[5] = b"%.17g" % (_clock(argv[1])[0] + float(argv[2]))
    return rec[5]


def _claim_deadline(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]
                    ) -> list[Any]:
    """`CLAIM` before ad14c00 (the caller's deadlines): ARGV now, token, lease_until,
    expires_at, lease_ms[, fp]; answers [1|2] or [3|4, *record]."""
    snow = _enc(argv[0])
    now = float(snow)
    token = argv[1].encode()
    rec = data.get(name)
    code = 1
    if rec is not None:
        live = float(rec[8]) > now
        if live and rec[1] != b"i":
            return [3, *rec]
        if live:
            if rec[4] == token:
                return [1]
            if float(rec[5]) > now:
                return [4, *rec]
        del data[name]
        if rec[1] == b"i":
            code = 2
    data[name] = [_V, b"i", argv[5].encode() if len(argv) > 5 else None, None, token,
                  _enc(argv[2]), snow, None, _enc(argv[3])]
    return [code]


def _complete_deadline(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]
                       ) -> int:
    """`COMPLETE` before ad14c00: ARGV token, state, now, expires_at, ttl_ms[, result]."""
    rec = data.get(name)
    if rec is None or rec[4] != argv[0].encode():
        return 0
    rec[1], rec[8] = argv[1], _enc(argv[3])
    rec[7] = rec[7] or _enc(argv[2])
    rec[3] = argv[5] if len(argv) > 5 else None
    rec[5] = None
    return 1


def _renew_deadline(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]) -> int:
    """`RENEW` before ad14c00: ARGV token, lease_until, lease_ms; 1 or 0."""
    rec = data.get(name)
    if rec is None or rec[4] != argv[0].encode() or rec[1] != b"i":
        return 0
    rec[5] = _enc(argv[1])
    return 1


def _release(data: dict[bytes, list[Any]], name: bytes, argv: tuple[Any, ...]) -> int:
    """`RELEASE` (both generations): ARGV token; deletes the token's in-progress record."""
    rec = data.get(name)
    if rec is None or rec[4] != argv[0].encode() or rec[1] != b"i":
        return 0
    del data[name]
    return 1


#: The emulations of each script generation, by script name.
_GENERATIONS = {
    "time": {"CLAIM": _claim_time, "COMPLETE": _complete_time, "RENEW": _renew_time,
             "RELEASE": _release},
    "deadline": {"CLAIM": _claim_deadline, "COMPLETE": _complete_deadline,
                 "RENEW": _renew_deadline, "RELEASE": _release},
}
#: Script SHA-1 -> its emulation, filled by `learn_scripts` (EVALSHA names them by SHA).
_BY_SHA: dict[str, Callable[[dict[bytes, list[Any]], bytes, tuple[Any, ...]], Any]] = {}


def learn_scripts(scripts: Any) -> None:
    """Teach the fake the scripts of one `_redis_scripts` module (ours, or a baseline's):
    each SHA maps to the emulation of its generation, told apart by the text (the
    scripts that read ``TIME`` take durations; the older ones take deadlines)."""
    generation = "time" if "redis.call('TIME')" in scripts.CLAIM else "deadline"
    for script, emulate in _GENERATIONS[generation].items():
        _BY_SHA[hashlib.sha1(getattr(scripts, script).encode()).hexdigest()] = emulate


class FakeScripts(redis.Redis):
    """Answers RedisStore's scripts from a dict, as Redis would, for either generation of
    the scripts (`learn_scripts`): claim, complete, renew and release, on Redis' ``TIME``
    (the process clock, formatted as the scripts format it) or the caller's deadlines;
    fields stored and replied as bytes. Also ``CONFIG GET maxmemory-policy``
    (noeviction) and ``TIME``, what a store asks besides its scripts."""

    def __init__(self) -> None:  # no connection pool: nothing leaves the process
        self.data: dict[bytes, list[Any]] = {}

    def get_encoder(self) -> Any:
        return _Encoder

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] == "EVALSHA":
            emulate = _BY_SHA.get(args[1])
            if emulate is None or args[2] != 1:
                raise NotImplementedError(f"the fake does not run script {args[1]}")
            return emulate(self.data, args[3], args[4:])
        if args[0] == "CONFIG GET" and args[1:] == ("maxmemory-policy",):
            return {b"maxmemory-policy": b"noeviction"}  # as redis-py parses the reply
        if args[0] == "TIME":
            return divmod(time.time_ns() // 1000, 1_000_000)
        raise NotImplementedError(f"the fake does not answer {args[0]!r}")


learn_scripts(lua)


class FakeCache:
    """Answers powertools' CacheClientProtocol (set/get/delete) from a dict."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, name: str) -> str | None:
        return self.data.get(name)

    def set(self, name: str, value: str, ex: Any = None, px: Any = None,
            nx: bool = False) -> bool | None:
        if nx and name in self.data:
            return None
        self.data[name] = value
        return True

    def delete(self, *names: str) -> int:
        return sum(self.data.pop(n, None) is not None for n in names)


# -- the benchmark ------------------------------------------------------------------------------
class Bench:
    def __init__(self, url: str, baseline: Any = None) -> None:
        self.url = url
        self.counter = itertools.count()
        self.store = RedisStore(url)
        self.store.load_scripts()
        self.ours = ours(self.store)
        self.theirs_client = redis.Redis.from_url(url, decode_responses=True)
        self.theirs = powertools(self.theirs_client)
        self.base: Callable[..., Any] | None = None
        if baseline is not None:
            self.base_store = redis_store_class(baseline)(url)
            self.base = ours(self.base_store, baseline)
        self.dups = self.messages(1000)
        for m in self.dups:
            self.ours(m)
            self.theirs(msg=m)
            if self.base is not None:
                self.base(m)

    def messages(self, n: int) -> list[dict[str, Any]]:
        return [{"id": f"m-{next(self.counter)}", "account": "acct-0042", "cents": 1234}
                for _ in range(n)]

    def run(self, fn: Callable[..., Any], msgs: list[dict[str, Any]], keyword: bool
            ) -> tuple[float, float]:
        out: list[Any] = []

        def loop() -> None:
            if keyword:
                for m in msgs:
                    out.append(fn(msg=m))
            else:
                for m in msgs:
                    out.append(fn(m))

        t = C.timed(loop)
        if out[-1] != {"status": "ok", "id": msgs[-1]["id"]}:
            raise AssertionError(f"got {out[-1]!r}")
        return t

    def _fn(self, which: str) -> tuple[Callable[..., Any], bool]:
        if which == "theirs":
            return self.theirs, True
        fn = self.base if which == "baseline" else self.ours
        assert fn is not None
        return fn, False

    def first(self, which: str) -> C.Variant:
        fn, keyword = self._fn(which)
        return lambda n: self.run(fn, self.messages(n), keyword)

    def duplicate(self, which: str) -> C.Variant:
        fn, keyword = self._fn(which)
        return lambda n: self.run(fn, [self.dups[i % len(self.dups)] for i in range(n)],
                                  keyword)

    def batch(self, n: int) -> tuple[float, float]:
        keys = [[m["id"] for m in self.messages(BATCH)] for _ in range(n)]
        store = self.store

        def loop() -> None:
            for ks in keys:
                store.claim_many("bench.batch", ks)

        return C.timed(loop)

    def sequential(self, n: int) -> tuple[float, float]:
        keys = [[m["id"] for m in self.messages(BATCH)] for _ in range(n)]
        store = self.store

        def loop() -> None:
            for ks in keys:
                for k in ks:
                    store.claim("bench.batch", k, fingerprint=None)

        return C.timed(loop)


def command_counts(client: redis.Redis, call: Callable[[], object], n: int) -> dict[str, float]:
    """Commands per call by name (INFO commandstats), over ``n`` calls."""
    client.config_resetstat()
    for _ in range(n):
        call()
    stats = client.info("commandstats")
    skip = {"cmdstat_info", "cmdstat_config|resetstat"}
    return {k.removeprefix("cmdstat_"): v["calls"] / n for k, v in stats.items()
            if k not in skip}


def commands(bench: Bench) -> dict[str, dict[str, float]]:
    admin = redis.Redis.from_url(bench.url)
    fresh_o, fresh_t = iter(bench.messages(200)), iter(bench.messages(200))
    out = {
        "ours, first-time key": command_counts(admin, lambda: bench.ours(next(fresh_o)), 200),
        "ours, duplicate": command_counts(admin, lambda: bench.ours(bench.dups[0]), 200),
        "powertools, first-time key": command_counts(
            admin, lambda: bench.theirs(msg=next(fresh_t)), 200),
        "powertools, duplicate": command_counts(
            admin, lambda: bench.theirs(msg=bench.dups[0]), 200),
    }
    admin.close()
    return out


def overhead(args: Any, n: int, baseline: Any = None) -> dict[str, C.Result]:
    counter = itertools.count()

    def msgs(k: int) -> list[dict[str, Any]]:
        return [{"id": f"f-{next(counter)}", "account": "acct-0042", "cents": 1234}
                for _ in range(k)]

    ours_dup = ours(RedisStore(FakeScripts()))
    theirs_dup = powertools(FakeCache())
    base_dup = (None if baseline is None
                else ours(redis_store_class(baseline)(FakeScripts()), baseline))
    dups = msgs(1000)
    for m in dups:
        ours_dup(m)
        theirs_dup(msg=m)
        if base_dup is not None:
            base_dup(m)

    def variant(make: Callable[[], Callable[..., Any]] | None, keyword: bool,
                dup: Callable[..., Any] | None = None) -> C.Variant:
        def run(k: int) -> tuple[float, float]:
            batch = [dups[i % len(dups)] for i in range(k)] if dup else msgs(k)
            fn = dup or (make() if make else (theirs_handler if keyword else ours_handler))

            def loop() -> None:
                if keyword:
                    for m in batch:
                        fn(msg=m)
                else:
                    for m in batch:
                        fn(m)

            return C.timed(loop)

        return run

    variants = {
        "bare handler": variant(None, False),
        "ours, first-time key": variant(lambda: ours(RedisStore(FakeScripts())), False),
        # the same decorator on MemoryStore: what of the overhead is not RedisStore's
        "ours on MemoryStore, first-time key": variant(lambda: ours(MemoryStore()), False),
        "ours, duplicate": variant(None, False, ours_dup),
        "powertools, first-time key": variant(lambda: powertools(FakeCache()), True),
        "powertools, duplicate": variant(None, True, theirs_dup),
    }
    if baseline is not None:
        base_cls = redis_store_class(baseline)
        variants["baseline: ours, first-time key"] = variant(
            lambda: ours(base_cls(FakeScripts()), baseline), False)
        variants["baseline: ours, duplicate"] = variant(None, False, base_dup)
    return C.interleave(variants, rounds=args.rounds, n=n, baseline="bare handler",
                        args=args, label="fake client: ")


# -- record layout: one hash (ours) against one packed string, server CPU per script call --
STRING_CLAIM = """
local k = KEYS[1]
local now = tonumber(ARGV[1])
local raw = redis.call('GET', k)
if raw then
  local v, s, l, e, t = string.match(raw, '^(%d+)|(%a)|([^|]*)|([^|]*)|([^|]*)|')
  if v ~= '1' then return {-1, v or ''} end
  if tonumber(e) > now then
    if s ~= 'i' then return {3, raw} end
    if t == ARGV[2] then return {1} end
    if tonumber(l) > now then return {4, raw} end
  end
end
redis.call('SET', k, '1|i|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[2] .. '|' .. ARGV[1]
           .. '|' .. (ARGV[6] or ''), 'PX', ARGV[5])
return {1}
"""
STRING_COMPLETE = """
local k = KEYS[1]
local raw = redis.call('GET', k)
if not raw then return 0 end
local v, s, l, e, t, c, f = string.match(raw, '^(%d+)|(%a)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)')
if t ~= ARGV[1] then return 0 end
redis.call('SET', k, '1|' .. ARGV[2] .. '||' .. ARGV[4] .. '|' .. t .. '|' .. c .. '|' .. f
           .. '|' .. ARGV[3] .. '|' .. (ARGV[6] or ''), 'PX', ARGV[5])
return 1
"""


def layouts(url: str, n: int = 20_000) -> dict[str, dict[str, float]]:
    """Server µs per call (``INFO commandstats`` usec_per_call) of the claim script on new
    keys, the complete script, and the claim script on completed keys: RedisStore's hash
    against a minimal packed-string twin (``v|s|lease|expires|token|created|fp``, parsed
    with ``string.match``), pipelined so the client does not matter."""
    c = redis.Redis.from_url(url)
    out: dict[str, dict[str, float]] = {}
    fp = "ab" * 32
    for layout, claim, complete in (("hash", lua.CLAIM, lua.COMPLETE),
                                    ("packed string", STRING_CLAIM, STRING_COMPLETE)):
        sha_claim, sha_complete = c.script_load(claim), c.script_load(complete)
        out[layout] = {}
        for phase in ("claim, new key", "complete", "claim, duplicate"):
            c.config_resetstat()
            pipe = c.pipeline(transaction=False)
            for i in range(n):
                name = f"layout:{layout}:{i}".encode()
                # both layouts get the same now (1000.0, an injected clock: neither reads
                # TIME) and the same deadlines: ours takes them as durations (lease 30 s,
                # ttl 8000 s), the string twin as deadlines (1030, 9000)
                if phase == "complete":
                    args = ((f"t{i:031d}", "c", 1001.0, 7999.0, 8_000_000, b'{"charged":500}')
                            if layout == "hash" else
                            (f"t{i:031d}", "c", 1001.0, 9000.0, 8_000_000, b'{"charged":500}'))
                    pipe.execute_command("EVALSHA", sha_complete, 1, name, *args)
                else:
                    args = ((1000.0, f"t{i:031d}", 30.0, 8000.0, 31_000, fp)
                            if layout == "hash" else
                            (1000.0, f"t{i:031d}", 1030.0, 9000.0, 31_000, fp))
                    pipe.execute_command("EVALSHA", sha_claim, 1, name, *args)
                if i % 1000 == 999:
                    pipe.execute()
                    pipe = c.pipeline(transaction=False)
            out[layout][phase] = c.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    c.close()
    return out


def main() -> None:
    # powertools warns on every call made outside a Lambda (no remaining-time context)
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")
    # many short rounds: on a shared 2-core machine the load moves within seconds, and a
    # per-round ratio of two variants that ran a second apart cancels it best
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--baseline", metavar="REV", default=None,
                        help="also run the package of git revision REV, interleaved")

    args = C.parse_args(__doc__.split("\n")[0], rounds=15, n=1000, quick_n=300, extra=extra)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if baseline is not None:  # the fake client answers the baseline's scripts too
        learn_scripts(importlib.import_module(f"{baseline.__name__}.stores._redis_scripts"))
    with RedisServer() as server:
        bench = Bench(server.url, baseline)
        info = server.command("INFO", "server").decode()
        version = info.split("redis_version:")[1].split("\r")[0]
        C.log(args, f"redis-server {version} on {server.url}")
        variants = {
            "powertools, first-time key": bench.first("theirs"),
            "ours, first-time key": bench.first("ours"),
            "powertools, duplicate": bench.duplicate("theirs"),
            "ours, duplicate": bench.duplicate("ours"),
        }
        against = {"ours, first-time key": "powertools, first-time key",
                   "ours, duplicate": "powertools, duplicate",
                   "powertools, first-time key": "powertools, first-time key",
                   "powertools, duplicate": "powertools, duplicate"}
        if baseline is not None:
            variants["baseline: ours, first-time key"] = bench.first("baseline")
            variants["baseline: ours, duplicate"] = bench.duplicate("baseline")
            against["baseline: ours, first-time key"] = "powertools, first-time key"
            against["baseline: ours, duplicate"] = "powertools, duplicate"
        res = C.interleave(variants, rounds=args.rounds, n=args.n, args=args,
                           baseline=against)
        batch_n = max(2, args.n // BATCH)
        bres = C.interleave({"100 sequential claims": bench.sequential,
                             "claim_many(100)": bench.batch},
                            rounds=args.rounds, n=batch_n, baseline="100 sequential claims",
                            unit_per_op=BATCH, args=args, label="batch: ")
        cmds = commands(bench)
        lay = layouts(server.url)
        bench.store.close()
        bench.theirs_client.close()
        if baseline is not None:
            bench.base_store.close()
    ores = overhead(args, 5000 if args.quick else 20_000, baseline)
    bare = ores["bare handler"]
    over = {k: statistics.median((v - b) / r.n * 1e6
                                 for v, b in zip(r.seconds, bare.seconds, strict=True))
            for k, r in ores.items()}

    lines = [f"bench_redis ({C.git_describe()}): loopback redis-server, one client each, "
             f"{args.n:,} calls per variant per round, {args.rounds} interleaved rounds, "
             "medians"]
    h, rows = C.result_rows(res, rate_label="calls/s")
    lines += [C.table(h, rows), ""]
    h, rows = C.result_rows(bres, rate_label="claims/s")
    lines += [C.table(h, rows), ""]
    lines.append("Redis commands per call (INFO commandstats, 200 calls each):")
    crow = []
    for name, counts in cmds.items():
        sent = {k: v for k, v in counts.items()
                if not name.startswith("ours") or k in ("eval", "evalsha")}
        inside = {k: v for k, v in counts.items() if k not in sent}
        crow.append([name, f"{sum(sent.values()):g}",
                     " ".join(f"{k}={v:g}" for k, v in sorted(sent.items())),
                     " ".join(f"{k}={v:g}" for k, v in sorted(inside.items())) or "-"])
    lines += [C.table(["variant", "sent", "sent by name", "run inside our scripts"], crow), ""]
    lines.append("Record layout, server µs per script call (INFO commandstats, 20,000 pipelined):")
    phases = list(next(iter(lay.values())))
    lines += [C.table(["layout", *phases],
                      [[k, *(f"{v[p]:.2f}" for p in phases)] for k, v in lay.items()]), ""]
    lines.append("Python overhead per call, in-process fake clients (decorated - bare):")
    orow = [[k, f"{r.per_op_us:.1f}", f"{over[k]:.1f}" if k != "bare handler" else "-",
             f"{r.gc_per_op_us:.2f}"] for k, r in ores.items()]
    lines += [C.table(["variant", "µs/call", "overhead µs", "of which GC µs"], orow), ""]
    targets = []
    for what, measured, target, hib in (
        ("first-time keys, ours/powertools calls/s", res["ours, first-time key"].ratio,
         TARGET_FIRST, True),
        ("duplicate keys, ours/powertools calls/s", res["ours, duplicate"].ratio,
         TARGET_DUP, True),
        ("Python overhead µs/call, ours, first-time key", over["ours, first-time key"],
         TARGET_OVERHEAD_US, False),
        ("Python overhead µs/call, ours, duplicate", over["ours, duplicate"],
         TARGET_OVERHEAD_US, False),
    ):
        line, t = C.target_line(what, measured, target, higher_is_better=hib,
                                fmt="{:.1f}" if not hib else "{:.2f}")
        lines.append(line)
        targets.append(t)
    doc = {
        "benchmark": "redis", "rounds": args.rounds, "calls_per_round": args.n,
        "results": [r.as_dict() for r in res.values()],
        "batch": [r.as_dict() for r in bres.values()],
        "commands_per_call": cmds, "layout_server_us": lay,
        "overhead_us": over, "overhead": [r.as_dict() for r in ores.values()],
        "targets": targets,
    }
    C.report(args, doc, "\n".join(lines))


if __name__ == "__main__":
    main()
