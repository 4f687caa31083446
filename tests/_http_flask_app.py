"""The Flask app the WSGI HTTP tests run on wsgiref's threaded server (configured by
environment, as `_http_asgi_app`): IDEM_MODE lease|tx, IDEM_PG, IDEM_REDIS, IDEM_LEASE,
IDEM_GATES. Every endpoint run inserts one ledger row."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response, jsonify, request
from idempotent.integrations.wsgi import IdempotencyMiddleware, header_identity, session_of

from idempotent import RedisStore, SqlStore

MODE = os.environ["IDEM_MODE"]
GATES = Path(os.environ["IDEM_GATES"])
engine = sa.create_engine(os.environ["IDEM_PG"], pool_size=20, max_overflow=20)
LEDGER = sa.table("ledger", sa.column("key"), sa.column("account"), sa.column("cents"))
app = Flask(__name__)


def _gate() -> None:
    name = request.headers.get("x-gate")
    if not name:
        return
    (GATES / f"{name}.entered").touch()
    while not (GATES / name).exists():
        time.sleep(0.01)


def _write(account: str, cents: int) -> None:
    stmt = sa.insert(LEDGER).values(key=request.headers.get("idempotency-key", ""),
                                    account=account, cents=cents)
    if MODE == "tx":
        session_of(request.environ).execute(stmt)
    else:
        with engine.begin() as conn:
            conn.execute(stmt)


@app.post("/pay")
def pay() -> Any:
    body = request.get_json()
    if MODE == "tx":
        _write(body["account"], int(body["cents"]))
    _gate()
    if MODE != "tx":
        _write(body["account"], int(body["cents"]))
    if request.headers.get("x-fail"):
        raise RuntimeError("the view failed")
    run = uuid.uuid4().hex
    response = jsonify(paid=body["cents"], run=run)
    response.status_code = 201
    response.headers.update({"Location": f"/payments/{run}", "ETag": f'"{run}"',
                             "X-Custom": run})
    response.set_cookie("session", run)
    return response


@app.post("/status")
def status() -> Any:
    code = int(request.args["code"])
    _write("status", code)
    return jsonify(code=code, run=uuid.uuid4().hex), code


@app.post("/binary")
def binary() -> Any:
    data = request.get_data()
    _write("binary", len(data))
    return Response(data[::-1] + uuid.uuid4().bytes, mimetype="application/octet-stream")


@app.post("/big")
def big() -> Any:
    _write("big", 0)

    def chunks() -> Any:
        for _ in range(10):
            yield os.urandom(20_000)

    return Response(chunks(), mimetype="application/octet-stream")


store: Any = SqlStore(engine) if MODE == "tx" else RedisStore(os.environ["IDEM_REDIS"])
app.wsgi_app = IdempotencyMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, store, transactional=MODE == "tx", identity=header_identity("X-Api-Key"),
    lease=float(os.environ.get("IDEM_LEASE", "30")), max_body=64 * 1024,
    max_response=64 * 1024, replay_headers=["X-Custom"])
