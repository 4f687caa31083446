"""The Starlette app the ASGI HTTP tests run under uvicorn (configured by environment).

IDEM_MODE lease|tx, IDEM_PG (ledger database, and the store in tx mode), IDEM_REDIS (the
store in lease mode), IDEM_WAIT, IDEM_LEASE, IDEM_GATES (a directory: ``X-Gate: name``
makes an endpoint create ``name.entered`` there and wait until ``name`` exists).
Every endpoint run inserts one ledger row (key, account, cents): the count of runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from idempotent.integrations._http import header_identity
from idempotent.integrations.asgi import IdempotencyMiddleware, idempotent_app, session_of
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from idempotent import RedisStore, SqlStore, no_retry

MODE = os.environ["IDEM_MODE"]
PG = os.environ["IDEM_PG"].replace("postgresql+psycopg://", "postgresql+psycopg_async://")
GATES = Path(os.environ["IDEM_GATES"])
engine = create_async_engine(PG, pool_size=20, max_overflow=40)
LEDGER = sa.table("ledger", sa.column("key"), sa.column("account"), sa.column("cents"))


async def _gate(request: Request) -> None:
    name = request.headers.get("x-gate")
    if not name:
        return
    (GATES / f"{name}.entered").touch()
    while not (GATES / name).exists():
        await asyncio.sleep(0.01)


async def _write(request: Request, account: str, cents: int) -> None:
    key = request.headers.get("idempotency-key", "")
    stmt = sa.insert(LEDGER).values(key=key, account=account, cents=cents)
    if MODE == "tx":
        await session_of(request.scope).execute(stmt)
    else:
        async with engine.begin() as conn:
            await conn.execute(stmt)


async def pay(request: Request) -> Response:
    body = await request.json()
    if MODE == "tx":  # the write is not committed while the request waits at the gate
        await _write(request, body["account"], int(body["cents"]))
    await _gate(request)
    if MODE != "tx":  # lease mode: the effect after the gate (a crash there: no effect)
        await _write(request, body["account"], int(body["cents"]))
    if request.headers.get("x-fail"):
        raise RuntimeError("the endpoint failed")
    run = uuid.uuid4().hex
    response = JSONResponse({"paid": body["cents"], "run": run}, status_code=201, headers={
        "location": f"/payments/{run}", "etag": f'"{run}"', "x-custom": run,
        "cache-control": "no-store", "x-ratelimit-remaining": "7"})
    response.set_cookie("session", run)
    return response


async def status(request: Request) -> Response:
    code = int(request.query_params["code"])
    await _write(request, "status", code)
    return JSONResponse({"code": code, "run": uuid.uuid4().hex}, status_code=code)


async def binary(request: Request) -> Response:
    body = await request.body()
    await _write(request, "binary", len(body))
    return Response(bytes(reversed(body)) + uuid.uuid4().bytes,
                    media_type="application/octet-stream")


async def stream(request: Request) -> Response:
    await _write(request, "stream", 0)
    run = uuid.uuid4().hex

    async def events() -> Any:
        for i in range(3):
            yield f"data: {json.dumps({'i': i, 'run': run})}\n\n".encode()

    return StreamingResponse(events(), media_type="text/event-stream")


async def big(request: Request) -> Response:
    await _write(request, "big", 0)
    return Response(os.urandom(200_000), media_type="application/octet-stream")


def _store() -> Any:
    if MODE == "tx":
        return SqlStore(engine)
    return RedisStore(os.environ["IDEM_REDIS"], use_asyncio=True)


store = _store()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> Any:
    yield
    if isinstance(store, RedisStore):
        await store.aclose()
    await engine.dispose()


inner = Starlette(routes=[Route(p, f, methods=["POST", "GET"]) for p, f in [
    ("/pay", pay), ("/status", status), ("/binary", binary), ("/stream", stream),
    ("/big", big)]], lifespan=lifespan)
options: dict[str, Any] = dict(
    transactional=MODE == "tx", identity=header_identity("X-Api-Key"),
    lease=float(os.environ.get("IDEM_LEASE", "30")), max_body=64 * 1024,
    max_response=64 * 1024, replay_headers=["X-Custom"],
    **({"retry": no_retry()} if os.environ.get("IDEM_NO_RETRY") else {}))
plain = IdempotencyMiddleware(inner, store, **options)
waiting = IdempotencyMiddleware(inner, store, **options, namespace="http-wait",
                                wait=None if MODE == "tx" else 30.0)


async def _pay_app(scope: Any, receive: Any, send: Any) -> None:
    response = await pay(Request(scope, receive))
    await response(scope, receive, send)

# the per-route form: one Starlette route behind its own layer, the others unprotected
per_route = Starlette(routes=[
    Route("/pay", idempotent_app(store, namespace="http-route", **{
        k: v for k, v in options.items() if k != "transactional"})(_pay_app),
          methods=["POST"]),
    Route("/open", status, methods=["POST"])])


async def app(scope: Any, receive: Any, send: Any) -> None:
    """``/wait/...``: the same routes behind a middleware with ``wait=30``; ``/route/...``:
    the per-route form."""
    if scope["type"] == "http" and scope["path"].startswith("/wait/"):
        scope = {**scope, "path": scope["path"][5:]}
        await waiting(scope, receive, send)
    elif scope["type"] == "http" and scope["path"].startswith("/route/"):
        scope = {**scope, "path": scope["path"][6:]}
        await per_route(scope, receive, send)
    else:
        await plain(scope, receive, send)
