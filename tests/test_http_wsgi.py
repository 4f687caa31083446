"""The WSGI ``Idempotency-Key`` middleware: a Flask app on a real threaded WSGI server
(wsgiref, a subprocess on loopback), driven by httpx, against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_http_asgi as h
from _uvicorn import HttpServer


def _start(mode: str, pg_server: Any, redis_server: Any, tmp: Path, db: str
           ) -> Iterator[h.Env]:
    url = h._database(pg_server, db)
    gates = tmp / db
    gates.mkdir()
    import redis

    rurl = redis_server.url_for(12 if mode == "lease" else 13)
    with redis.Redis.from_url(rurl) as r:
        r.flushdb()
    env = {"IDEM_MODE": mode, "IDEM_PG": url, "IDEM_REDIS": rurl, "IDEM_GATES": str(gates),
           "IDEM_LEASE": "2"}
    server = HttpServer("_http_flask_app:app", env, kind="wsgi").start()
    try:
        yield h.Env(server, pg_server.dsn_for(db), gates)
    finally:
        server.stop()
        pg_server.drop_database(db)


@pytest.fixture(scope="module")
def lease(pg_server: Any, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[h.Env]:
    yield from _start("lease", pg_server, redis_server, tmp_path_factory.mktemp("w"),
                      "wsgi_lease")


@pytest.fixture(scope="module")
def tx(pg_server: Any, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[h.Env]:
    yield from _start("tx", pg_server, redis_server, tmp_path_factory.mktemp("w"), "wsgi_tx")


@pytest.fixture(params=["lease", "tx"])
def env(request: pytest.FixtureRequest) -> h.Env:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def test_replay_with_allow_listed_headers(env: h.Env) -> None:
    """Both modes: the retry gets the first status, body and allow-listed headers, no
    Set-Cookie, and the replay marker; one run."""
    key = h._key()
    with env.client() as c:
        first = h._pay(c, key)
        again = h._pay(c, key)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    for name in ("location", "etag", "content-type", "x-custom"):
        assert again.headers[name] == first.headers[name]
    assert "set-cookie" in first.headers and "set-cookie" not in again.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert env.rows(key) == 1


def test_errors_400_401_413_422(env: h.Env) -> None:
    """The layer's own errors, problem+json, nothing run."""
    key = h._key()
    with env.client() as c:
        h._problem(h._pay(c, None), 400, "missing-key")
        h._problem(h._pay(c, "a, b"), 400, "invalid-key")
        h._problem(c.post("/binary", content=b"x" * (64 * 1024 + 1),
                          headers={"idempotency-key": key}), 413, "body-too-large")
        assert h._pay(c, key).status_code == 201
        h._problem(h._pay(c, key, cents=1), 422, "key-reused")
    with env.client(api=None) as c:
        h._problem(h._pay(c, key), 401, "identity-required")
    assert env.rows(key) == 1


def test_binary_body_and_chunked_refused_by_wsgiref(lease: h.Env) -> None:
    """Every byte survives the replay; a chunked body on a server that does not decode
    it (wsgiref: no ``wsgi.input_terminated``) → 411, nothing run."""
    key = h._key()
    payload = bytes(range(256)) * 8
    with lease.client() as c:
        first = c.post("/binary", content=payload, headers={"idempotency-key": key})
        again = c.post("/binary", content=payload, headers={"idempotency-key": key})
        chunked = c.post("/binary", content=iter([payload[:1000], payload[1000:]]),
                         headers={"idempotency-key": h._key()})
    assert first.content[:2048] == payload[::-1]
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    h._problem(chunked, 411, "length-required")
    assert lease.rows(key) == 1


def test_500_then_success_stores_the_2xx(tx: h.Env) -> None:
    """The view raises (500, rolled back, not stored); the retry runs and is stored."""
    key = h._key()
    with tx.client() as c:
        assert h._pay(c, key, **{"x-fail": "1"}).status_code == 500
        ok = h._pay(c, key)
        again = h._pay(c, key)
    assert ok.status_code == 201 and again.content == ok.content
    assert again.headers["idempotent-replayed"] == "true"
    assert tx.rows(key) == 1


def test_storage_policy_and_streaming(lease: h.Env) -> None:
    """404 stored, 503 not; a response over max_response streams whole and is not
    stored."""
    key404, key503, keybig = h._key(), h._key(), h._key()
    with lease.client() as c:
        for key, code in ((key404, 404), (key503, 503)):
            for _ in range(2):
                c.post("/status", params={"code": code}, headers={"idempotency-key": key})
        a = c.post("/big", headers={"idempotency-key": keybig})
        b = c.post("/big", headers={"idempotency-key": keybig})
    assert lease.rows(key404) == 1 and lease.rows(key503) == 2
    assert len(a.content) == len(b.content) == 200_000 and lease.rows(keybig) == 2


def test_two_clients_same_key(lease: h.Env) -> None:
    """Two clients' same key: two runs, each replay its own."""
    key = h._key()
    with lease.client("a") as a, lease.client("b") as b:
        ra, rb = h._pay(a, key), h._pay(b, key)
        assert h._pay(a, key).content == ra.content and h._pay(b, key).content == rb.content
    assert ra.content != rb.content and lease.rows(key) == 2


def test_20_concurrent_one_execution(env: h.Env) -> None:
    """20 concurrent requests, one key, the first held: one run; the others 409 (lease)
    or blocked on the key's row lock until the first commits, then the replay (tx)."""
    key = h._key()
    if env.dsn.endswith("wsgi_tx"):
        responses = _tx_concurrent(env, key, 20)
        assert [r.status_code for r in responses] == [201] * 20
        assert sum("idempotent-replayed" in r.headers for r in responses) == 19
    else:
        responses = h._concurrent(env, "/pay", key, 20)
        assert responses[0].status_code == 201
        assert all(r.status_code == 409 for r in responses[1:])
    assert env.rows(key) == 1


def _tx_concurrent(env: h.Env, key: str, n: int) -> list[httpx.Response]:
    """Transactional duplicates wait on the row lock (lock_timeout 5 s): the gate opens
    once the first has entered and the others were sent."""
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=env.server.url, timeout=h.DEADLINE,
                                     headers={"x-api-key": "client-a"}) as c:
            def post(**extra: str) -> Any:
                return asyncio.create_task(c.post("/pay", json={"account": "a", "cents": 7},
                                                  headers={"idempotency-key": key, **extra}))
            first = post(**{"x-gate": key})
            await asyncio.to_thread(env.entered, key)
            rest = [post() for _ in range(n - 1)]
            await asyncio.sleep(0)
            env.open_gate(key)
            return [await first, *await asyncio.gather(*rest)]

    return asyncio.run(main())


def test_sigkill_mid_transactional_request(tx: h.Env) -> None:
    """The WSGI server SIGKILLed while the view's write is uncommitted: nothing left; the
    retry applies once."""
    key = h._key()
    h._crash_mid_request(tx, key)
    assert tx.rows(key) == 0
    with tx.client() as c:
        assert h._pay(c, key).status_code == 201
        assert h._pay(c, key).headers["idempotent-replayed"] == "true"
    assert tx.rows(key) == 1 and tx.cents(key) == 100


def test_client_disconnects_mid_body(lease: h.Env) -> None:
    """A client that leaves before its declared body arrived: nothing runs or is stored
    (the view never sees a truncated body); the retry runs once."""
    key = h._key()
    s = h._raw(lease, f"POST /binary HTTP/1.1\r\nHost: x\r\nx-api-key: client-a\r\n"
               f"idempotency-key: {key}\r\ncontent-length: 1000\r\n", b"x" * 10)
    s.shutdown(socket.SHUT_WR)
    s.recv(65536)  # the server's answer (400 incomplete-body), or nothing: it is gone
    s.close()
    with lease.client() as c:
        r = c.post("/binary", content=b"x" * 1000, headers={"idempotency-key": key})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    assert lease.rows(key) == 1
