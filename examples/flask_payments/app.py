"""A payments API whose POST /payments is safe to retry: Flask, SQLite (or any SQL
database), and the ``Idempotency-Key`` header in transactional mode (the ledger row, the
key and the response commit together, or not at all)."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from idempotent.integrations.wsgi import IdempotencyMiddleware, session_of

from idempotent import SqlStore

store = SqlStore(os.environ.get("DATABASE_URL", "sqlite:///payments.db"))
metadata = sa.MetaData()
ledger = sa.Table("ledger", metadata, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("account", sa.String(64), nullable=False),
                  sa.Column("cents", sa.Integer, nullable=False))
store.create_schema()  # development only; production: `idempotent db upgrade`
metadata.create_all(store.engine)

app = Flask(__name__)
app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store, transactional=True)  # type: ignore[method-assign]


@app.post("/payments")
def pay() -> Any:
    p = request.get_json()
    session = session_of(request.environ)  # its writes commit with the key and response
    payment = session.execute(sa.insert(ledger).values(account=p["account"], cents=p["cents"])
                              .returning(ledger.c.id)).scalar_one()
    return {"payment": payment, "account": p["account"], "cents": p["cents"]}, 201


@app.get("/ledger")
def totals() -> Any:
    with store.engine.connect() as conn:
        rows, cents = conn.execute(sa.select(
            sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.cents), 0))).one()
    return {"rows": rows, "cents": cents}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
