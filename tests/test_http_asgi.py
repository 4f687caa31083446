"""The ASGI ``Idempotency-Key`` middleware under uvicorn (a real process on loopback),
driven by httpx, against a real Redis (lease mode) and PostgreSQL (ledger; transactional
mode)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from _servers import HOST
from _uvicorn import HttpServer

from idempotent import SqlStore

DEADLINE = 30.0
PROBLEM = "application/problem+json"


def until(cond: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


class Env:
    """One server (its mode) with its ledger database and gate directory."""

    def __init__(self, server: HttpServer, dsn: str, gates: Path) -> None:
        self.server, self.dsn, self.gates = server, dsn, gates

    def client(self, api: str | None = "client-a") -> httpx.Client:
        headers = {"x-api-key": api} if api else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=DEADLINE)

    def rows(self, key: str) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM ledger WHERE key = %s", (key,)).fetchone()
            assert row is not None
            return int(row[0])

    def cents(self, key: str) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT coalesce(sum(cents), 0) FROM ledger WHERE key = %s",
                               (key,)).fetchone()
            assert row is not None
            return int(row[0])

    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()

    def entered(self, name: str) -> None:
        until(lambda: (self.gates / f"{name}.entered").exists(), f"gate {name} entered")


def _database(pg_server: Any, name: str) -> str:
    pg_server.create_database(name)
    url = pg_server.url_for(name)
    store = SqlStore(url)
    try:
        store.create_schema()
    finally:
        store.engine.dispose()
    with psycopg.connect(pg_server.dsn_for(name)) as conn:
        conn.execute("CREATE TABLE ledger (id serial PRIMARY KEY, key text NOT NULL, "
                     "account text NOT NULL, cents int NOT NULL)")
    return url


def _start(mode: str, pg_server: Any, redis_server: Any, tmp: Path, db: str,
           lease: str = "30") -> Iterator[Env]:
    url = _database(pg_server, db)
    gates = tmp / db
    gates.mkdir()
    import redis

    rurl = redis_server.url_for(10 if mode == "lease" else 11)
    with redis.Redis.from_url(rurl) as r:
        r.flushdb()
    env = {"IDEM_MODE": mode, "IDEM_PG": url, "IDEM_REDIS": rurl, "IDEM_GATES": str(gates),
           "IDEM_LEASE": lease}
    server = HttpServer("_http_asgi_app:app", env).start()
    try:
        yield Env(server, pg_server.dsn_for(db), gates)
    finally:
        server.stop()
        pg_server.drop_database(db)


@pytest.fixture(scope="module")
def lease(pg_server: Any, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Env]:
    yield from _start("lease", pg_server, redis_server, tmp_path_factory.mktemp("g"),
                      "http_lease", lease="2")


@pytest.fixture(scope="module")
def tx(pg_server: Any, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[Env]:
    yield from _start("tx", pg_server, redis_server, tmp_path_factory.mktemp("g"), "http_tx")


def _key() -> str:
    return uuid.uuid4().hex


def _pay(client: httpx.Client, key: str | None, cents: int = 100, path: str = "/pay",
         **headers: str) -> httpx.Response:
    h = dict(headers)
    if key is not None:
        h["idempotency-key"] = key
    return client.post(path, json={"account": "acct-1", "cents": cents}, headers=h)


def _problem(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status
    assert body["type"].endswith("#" + kind)


# -- the replay -------------------------------------------------------------------------------
def test_replay_is_byte_for_byte_with_allow_listed_headers(lease: Env) -> None:
    """The retry gets the first status and body byte for byte, the allow-listed headers
    (Location, ETag, Cache-Control, Content-Type, the user's X-Custom), never Set-Cookie,
    Date or rate-limit headers, and ``Idempotent-Replayed: true``; the endpoint ran once."""
    key = _key()
    with lease.client() as c:
        first = _pay(c, key)
        again = _pay(c, key)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert "set-cookie" in first.headers and "x-ratelimit-remaining" in first.headers
    assert again.status_code == 201
    assert again.content == first.content
    for name in ("location", "etag", "cache-control", "content-type", "x-custom"):
        assert again.headers[name] == first.headers[name], name
    assert again.headers["idempotent-replayed"] == "true"
    assert "set-cookie" not in again.headers
    assert "x-ratelimit-remaining" not in again.headers
    assert again.headers.get("date") != "stored"  # the server's own, never the stored one
    assert lease.rows(key) == 1


def test_quoted_and_bare_key_are_one_key(lease: Env) -> None:
    """``"abc"`` (structured-field string) and ``abc`` (bare token) name the same key."""
    key = _key()
    with lease.client() as c:
        first = _pay(c, f'"{key}"')
        again = _pay(c, key)
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert lease.rows(f'"{key}"') == 1 and lease.rows(key) == 0


@pytest.mark.parametrize("value", ["", '""', "x" * 256, '"' + "x" * 256 + '"', "a, b",
                                   '"a", "b"', '"unterminated', "sp ace", '"bad\\escape"'])
def test_bad_key_is_400_and_runs_nothing(lease: Env, value: str) -> None:
    """Empty, over 255 characters, a list, or malformed → 400 invalid-key; no run."""
    with lease.client() as c:
        r = c.post("/pay", json={"account": "a", "cents": 1},
                   headers={"idempotency-key": value})
    _problem(r, 400, "invalid-key")
    assert lease.rows(value) == 0


def test_repeated_header_is_400(lease: Env) -> None:
    """Two Idempotency-Key header lines → 400, nothing run."""
    key = _key()
    with lease.client() as c:
        r = c.post("/pay", json={"account": "a", "cents": 1},
                   headers=[("idempotency-key", key), ("idempotency-key", key)])
    _problem(r, 400, "invalid-key")
    assert lease.rows(key) == 0


def test_missing_key_is_400(lease: Env) -> None:
    """A POST without the header → 400 missing-key; GET passes through untouched."""
    with lease.client() as c:
        _problem(_pay(c, None), 400, "missing-key")
        assert c.get("/status", params={"code": 200}).status_code == 200


def test_same_key_other_payload_is_422(lease: Env) -> None:
    """Another body, another query or another path with the key → 422; nothing run."""
    key = _key()
    with lease.client() as c:
        assert _pay(c, key, cents=100).status_code == 201
        _problem(_pay(c, key, cents=101), 422, "key-reused")
        r = c.post("/pay?x=1", json={"account": "acct-1", "cents": 100},
                   headers={"idempotency-key": key})
        _problem(r, 422, "key-reused")
        assert _pay(c, key).headers["idempotent-replayed"] == "true"
    assert lease.rows(key) == 1 and lease.cents(key) == 100


def test_per_route_form(lease: Env) -> None:
    """``idempotent_app`` on one Starlette route: that route replays, its sibling route
    takes no key."""
    key = _key()
    with lease.client() as c:
        first = _pay(c, key, path="/route/pay")
        again = _pay(c, key, path="/route/pay")
        _problem(_pay(c, None, path="/route/pay"), 400, "missing-key")
        open_ = c.post("/route/open", params={"code": 200})
    assert first.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert open_.status_code == 200
    assert lease.rows(key) == 1


# -- scoping ----------------------------------------------------------------------------------
def test_identity_required(lease: Env) -> None:
    """With identity scoping, a request without an identity → 401, nothing run."""
    key = _key()
    with lease.client(api=None) as c:
        _problem(_pay(c, key), 401, "identity-required")
    assert lease.rows(key) == 0


def test_two_clients_same_key_never_share(lease: Env) -> None:
    """Clients A and B send the same key and body: each runs once and each replay is its
    own client's response."""
    key = _key()
    with lease.client("client-a") as a, lease.client("client-b") as b:
        ra, rb = _pay(a, key), _pay(b, key)
        ra2, rb2 = _pay(a, key), _pay(b, key)
    assert ra.status_code == rb.status_code == 201
    assert ra.json()["run"] != rb.json()["run"]
    assert ra2.content == ra.content and rb2.content == rb.content
    assert lease.rows(key) == 2


# -- the storage policy ---------------------------------------------------------------------
def test_endpoint_raises_500_then_retry_succeeds_tx(tx: Env) -> None:
    """The endpoint raises (500, its writes rolled back, nothing stored); the retry runs,
    succeeds and is stored; a third gets that 2xx, never the 500."""
    key = _key()
    with tx.client() as c:
        failed = _pay(c, key, **{"x-fail": "1"})
        ok = _pay(c, key)
        again = _pay(c, key)
    assert failed.status_code == 500
    assert ok.status_code == 201 and "idempotent-replayed" not in ok.headers
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == ok.content
    assert tx.rows(key) == 1 and tx.cents(key) == 100


def test_endpoint_raises_500_then_retry_succeeds_lease(lease: Env) -> None:
    """Lease mode: the 500 released the key; the retry runs and its 2xx is what a third
    request gets."""
    key = _key()
    with lease.client() as c:
        assert _pay(c, key, **{"x-fail": "1"}).status_code == 500
        ok = _pay(c, key)
        again = _pay(c, key)
    assert ok.status_code == 201 and again.content == ok.content
    assert again.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(("code", "stored"), [(200, True), (404, True), (409, True),
                                              (429, False), (500, False), (503, False)])
def test_storage_policy(lease: Env, code: int, stored: bool) -> None:
    """2xx and 4xx are stored (replayed); 429 and 5xx are not (the retry runs again)."""
    key = _key()
    with lease.client() as c:
        first = c.post("/status", params={"code": code}, headers={"idempotency-key": key})
        again = c.post("/status", params={"code": code}, headers={"idempotency-key": key})
    assert first.status_code == again.status_code == code
    if stored:
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert lease.rows(key) == 1
    else:
        assert "idempotent-replayed" not in again.headers
        assert again.json()["run"] != first.json()["run"]
        assert lease.rows(key) == 2


def test_body_over_limit_is_413_and_stores_nothing(lease: Env) -> None:
    """A body over max_body (declared, or chunked without a length) → 413; the same key
    with a small body then runs."""
    key = _key()
    big = b"x" * (64 * 1024 + 1)
    with lease.client() as c:
        _problem(c.post("/binary", content=big, headers={"idempotency-key": key}), 413,
                 "body-too-large")
        chunked = c.post("/binary", content=iter([big[:40_000], big[40_000:]]),
                         headers={"idempotency-key": key})
        _problem(chunked, 413, "body-too-large")
        ok = c.post("/binary", content=b"small", headers={"idempotency-key": key})
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers
    assert lease.rows(key) == 1


def test_chunked_body_is_read_to_the_end(lease: Env) -> None:
    """The fingerprint covers the whole chunked body: a retry differing only in its last
    chunk → 422; the same chunks → the replay."""
    key = _key()
    with lease.client() as c:
        first = c.post("/binary", content=iter([b"a" * 1000, b"b" * 1000, b"c"]),
                       headers={"idempotency-key": key})
        other = c.post("/binary", content=iter([b"a" * 1000, b"b" * 1000, b"d"]),
                       headers={"idempotency-key": key})
        same = c.post("/binary", content=iter([b"a" * 1000, b"b" * 1000, b"c"]),
                      headers={"idempotency-key": key})
    assert first.status_code == 200
    assert first.content[:2001] == (b"a" * 1000 + b"b" * 1000 + b"c")[::-1]
    _problem(other, 422, "key-reused")
    assert same.content == first.content and same.headers["idempotent-replayed"] == "true"


def test_binary_request_and_response(lease: Env) -> None:
    """Every byte value in the request and the response survives the store."""
    key = _key()
    payload = bytes(range(256)) * 4
    with lease.client() as c:
        first = c.post("/binary", content=payload, headers={"idempotency-key": key})
        again = c.post("/binary", content=payload, headers={"idempotency-key": key})
    assert first.content[:1024] == payload[::-1]
    assert again.content == first.content
    assert again.headers["content-type"] == "application/octet-stream"
    assert again.headers["idempotent-replayed"] == "true"


def test_streaming_response_passes_through_and_releases(lease: Env) -> None:
    """An event stream passes through, whole, and is not stored: the retry runs again."""
    key = _key()
    with lease.client() as c:
        first = c.post("/stream", headers={"idempotency-key": key})
        again = c.post("/stream", headers={"idempotency-key": key})
    for r in (first, again):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.count("data: ") == 3
        assert "idempotent-replayed" not in r.headers
    assert first.text != again.text
    assert lease.rows(key) == 2


def test_large_response_streams_unstored_lease_500_tx(lease: Env, tx: Env) -> None:
    """A response over max_response: lease mode streams it whole and releases the key;
    transactional mode cannot send it before its commit: 500, writes rolled back."""
    key = _key()
    with lease.client() as c:
        first = c.post("/big", headers={"idempotency-key": key})
        again = c.post("/big", headers={"idempotency-key": key})
    assert len(first.content) == len(again.content) == 200_000
    assert first.content != again.content and lease.rows(key) == 2
    with tx.client() as c:
        _problem(c.post("/big", headers={"idempotency-key": key}), 500, "response-too-large")
    assert tx.rows(key) == 0


# -- concurrency --------------------------------------------------------------------------------
def _concurrent(env: Env, path: str, key: str, n: int,
                waiting: Callable[[], None] | None = None) -> list[httpx.Response]:
    """``n`` concurrent requests with ``key``, the first held at its gate until the others
    were answered (no ``waiting``) or until ``waiting()`` returned."""
    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=env.server.url, timeout=DEADLINE,
                                     headers={"x-api-key": "client-a"}, limits=limits) as c:
            def post(**extra: str) -> Any:
                return asyncio.create_task(c.post(path, json={"account": "a", "cents": 7},
                                                  headers={"idempotency-key": key, **extra}))
            first = post(**{"x-gate": key})
            await asyncio.to_thread(env.entered, key)
            rest = [post() for _ in range(n - 1)]
            if waiting is None:
                others = await asyncio.gather(*rest)
                env.open_gate(key)
            else:
                await asyncio.to_thread(waiting)
                env.open_gate(key)
                others = await asyncio.gather(*rest)
            return [await first, *others]

    return asyncio.run(main())


def test_50_concurrent_one_execution_409(lease: Env) -> None:
    """50 concurrent requests, one key, the first held in the endpoint: it runs once and
    the 49 others get 409 with Retry-After."""
    key = _key()
    responses = _concurrent(lease, "/pay", key, 50)
    assert responses[0].status_code == 201
    for r in responses[1:]:
        _problem(r, 409, "in-progress")
        assert int(r.headers["retry-after"]) >= 1
    assert lease.rows(key) == 1


def test_50_concurrent_with_wait_all_get_the_replay(lease: Env) -> None:
    """With ``wait=``: the 49 duplicates wait and all get the first response."""
    key = _key()
    import redis
    from idempotent.integrations._http import header_identity

    from idempotent import RedisStore
    from idempotent.keys import scoped

    url = lease.server.env["IDEM_REDIS"]
    store = RedisStore(url)
    ident = header_identity("x-api-key")(_fake_request("client-a"))
    name = store.key_name("http-wait", scoped(key, ident))
    store.close()

    def a_duplicate_waits() -> None:
        with redis.Redis.from_url(url) as r:
            until(lambda: r.pubsub_numsub(name)[0][1] >= 1, "a duplicate to wait")

    responses = _concurrent(lease, "/wait/pay", key, 50, a_duplicate_waits)
    assert [r.status_code for r in responses] == [201] * 50
    assert {r.content for r in responses} == {responses[0].content}
    assert sum("idempotent-replayed" in r.headers for r in responses) == 49
    assert lease.rows(key) == 1


def _fake_request(api: str) -> Any:
    from idempotent.integrations._http import Request

    return Request("POST", "/pay", "", [("x-api-key", api)], None)


# -- disconnects and crashes ----------------------------------------------------------------------
def _raw(env: Env, head: str, body: bytes) -> socket.socket:
    s = socket.create_connection((HOST, env.server.port), timeout=DEADLINE)
    s.sendall(head.encode() + b"\r\n" + body)
    return s


def test_client_disconnects_mid_body(lease: Env) -> None:
    """A client that leaves while sending its body: nothing runs or is stored; the retry
    runs once."""
    key = _key()
    s = _raw(lease, f"POST /binary HTTP/1.1\r\nHost: x\r\nx-api-key: client-a\r\n"
             f"idempotency-key: {key}\r\ncontent-length: 1000\r\n", b"x" * 10)
    s.close()
    with lease.client() as c:
        r = c.post("/binary", content=b"x" * 1000, headers={"idempotency-key": key})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    assert lease.rows(key) == 1


def test_client_disconnects_while_endpoint_runs(tx: Env) -> None:
    """A client that leaves while its request runs: the outcome is still stored (not left
    in flight); the retry gets it."""
    key = _key()
    body = json.dumps({"account": "a", "cents": 5}).encode()
    s = _raw(tx, f"POST /pay HTTP/1.1\r\nHost: x\r\nx-api-key: client-a\r\n"
             f"idempotency-key: {key}\r\nx-gate: {key}\r\ncontent-type: application/json\r\n"
             f"content-length: {len(body)}\r\n", body)
    tx.entered(key)
    s.close()
    tx.open_gate(key)
    until(lambda: tx.rows(key) == 1, "the left request to commit")
    with tx.client() as c:  # the same bytes as the request that was left
        r = c.post("/pay", content=body, headers={"idempotency-key": key,
                                                  "content-type": "application/json"})
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"
    assert tx.rows(key) == 1


def _crash_mid_request(env: Env, key: str) -> None:
    """Send a payment held at its gate, SIGKILL the server there, restart it."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with env.client() as c:
                _pay(c, key, **{"x-gate": key})
        except httpx.HTTPError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    env.entered(key)
    env.server.kill()
    t.join(DEADLINE)
    assert errors, "the client should have lost its connection"
    (env.gates / f"{key}.entered").unlink()
    env.open_gate(key)
    env.server.start()


def test_sigkill_mid_transactional_request_applies_once(tx: Env) -> None:
    """uvicorn SIGKILLed while a transactional request's write is uncommitted: nothing is
    left; the retry applies the payment once and is then replayed."""
    key = _key()
    _crash_mid_request(tx, key)
    assert tx.rows(key) == 0
    with tx.client() as c:
        retry = _pay(c, key)
        again = _pay(c, key)
    assert retry.status_code == 201 and "idempotent-replayed" not in retry.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert tx.rows(key) == 1 and tx.cents(key) == 100


def test_sigkill_mid_lease_request_runs_after_the_lease(lease: Env) -> None:
    """Lease mode (lease 2 s): after the crash the key is held (409) until the dead
    process' lease runs out; then the retry runs once."""
    key = _key()
    _crash_mid_request(lease, key)
    with lease.client() as c:
        first = _pay(c, key)
        if first.status_code == 409:  # the lease of the killed process is still live
            _problem(first, 409, "in-progress")
            first = until(lambda: (r := _pay(c, key)).status_code != 409 and r,
                          "the dead lease to run out")
        again = _pay(c, key)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert lease.rows(key) == 1


def test_heartbeat_keeps_a_long_request_leased(lease: Env) -> None:
    """A request held for three lease periods (lease 2 s) keeps its key: a duplicate gets
    409 throughout, and the run happens once."""
    key = _key()
    with lease.client() as c:
        t = threading.Thread(target=lambda: _pay(c, key, **{"x-gate": key}))
        t.start()
        lease.entered(key)
        with lease.client() as d:
            end = time.monotonic() + 6.0
            while time.monotonic() < end:
                _problem(_pay(d, key), 409, "in-progress")
                time.sleep(0.5)
        lease.open_gate(key)
        t.join(DEADLINE)
        assert _pay(c, key).headers["idempotent-replayed"] == "true"
    assert lease.rows(key) == 1


def test_store_down_is_503_and_runs_nothing(pg_server: Any, tmp_path: Path) -> None:
    """Lease mode with its Redis unreachable (a port nothing listens on): 503
    store-unavailable with Retry-After, the endpoint never ran."""
    from _servers import free_port

    url = _database(pg_server, "http_store_down")
    try:
        env = {"IDEM_MODE": "lease", "IDEM_PG": url, "IDEM_GATES": str(tmp_path),
               "IDEM_REDIS": f"redis://{HOST}:{free_port()}/0", "IDEM_NO_RETRY": "1"}
        with HttpServer("_http_asgi_app:app", env) as server:
            e = Env(server, pg_server.dsn_for("http_store_down"), tmp_path)
            key = _key()
            with e.client() as c:
                r = _pay(c, key)
            _problem(r, 503, "store-unavailable")
            assert r.headers["retry-after"] == "1"
            assert e.rows(key) == 0
    finally:
        pg_server.drop_database("http_store_down")


def test_redis_dies_mid_request_the_client_gets_what_happened(pg_server: Any,
                                                              tmp_path: Path) -> None:
    """Lease mode, its redis-server SIGKILLed while the endpoint runs (after the claim):
    the endpoint's effect happened, so the client gets its 201, not an error saying
    nothing ran; the ledger has the one row."""
    import os
    import signal

    from _servers import RedisServer

    url = _database(pg_server, "http_redis_dies")
    redis_server = RedisServer().start()
    try:
        env = {"IDEM_MODE": "lease", "IDEM_PG": url, "IDEM_GATES": str(tmp_path),
               "IDEM_REDIS": redis_server.url_for(0), "IDEM_NO_RETRY": "1"}
        with HttpServer("_http_asgi_app:app", env) as server:
            e = Env(server, pg_server.dsn_for("http_redis_dies"), tmp_path)
            key = _key()
            out: list[httpx.Response] = []

            def send() -> None:
                with e.client() as c:
                    out.append(_pay(c, key, **{"x-gate": key}))

            t = threading.Thread(target=send)
            t.start()
            e.entered(key)
            os.kill(redis_server.pid, signal.SIGKILL)
            until(lambda: not redis_server.running, "redis-server to die")
            e.open_gate(key)
            t.join(DEADLINE)
            assert len(out) == 1 and out[0].status_code == 201
            assert out[0].json()["paid"] == 100
            assert e.rows(key) == 1
    finally:
        redis_server.stop()
        pg_server.drop_database("http_redis_dies")


def test_database_connection_killed_mid_transactional_request(tx: Env, pg_server: Any) -> None:
    """The transaction's PostgreSQL backend terminated while the endpoint runs: the
    attempt rolled back and the core ran it again (a transient fault of the transaction's
    own connection); the client gets one 201 and the ledger one row."""
    key = _key()
    out: list[httpx.Response] = []

    def send() -> None:
        with tx.client() as c:
            out.append(_pay(c, key, **{"x-gate": key}))

    t = threading.Thread(target=send)
    t.start()
    tx.entered(key)
    assert pg_server.terminate_backends(dbname="http_tx")
    tx.open_gate(key)
    t.join(DEADLINE)
    assert len(out) == 1 and out[0].status_code == 201, out
    assert tx.rows(key) == 1 and tx.cents(key) == 100
    with tx.client() as c:
        assert _pay(c, key).headers["idempotent-replayed"] == "true"
