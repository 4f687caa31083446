"""A payment handler made idempotent, on embedded SQLite: run it twice, pay once.

    python examples/payments_sqlite.py
"""

from __future__ import annotations

import tempfile

import sqlalchemy as sa

from idempotent import IdempotencyKeyConflict, SqlStore, idempotent

store = SqlStore(f"sqlite:///{tempfile.mkdtemp()}/payments.db")
ledger = sa.Table(
    "ledger",
    store.metadata,  # any MetaData works; the store's keeps the example short
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("payment_id", sa.String(64), nullable=False),
    sa.Column("cents", sa.Integer, nullable=False),
)
store.metadata.create_all(store.engine)


@idempotent(store, key="payment_id")
def apply_payment(msg: dict, *, connection: sa.Connection) -> dict:
    """The ledger row and the idempotency key commit in one transaction."""
    connection.execute(ledger.insert().values(payment_id=msg["payment_id"], cents=msg["cents"]))
    return {"status": "applied", "payment_id": msg["payment_id"]}


if __name__ == "__main__":
    msg = {"payment_id": "pay_123", "cents": 2500}
    print(apply_payment(msg))  # runs the handler
    print(apply_payment(msg))  # a redelivery: returns the stored result, writes nothing
    try:
        apply_payment({"payment_id": "pay_123", "cents": 9999})
    except IdempotencyKeyConflict as exc:
        print("refused:", exc)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count(), sa.func.sum(ledger.c.cents))).one()
    print(f"ledger rows: {rows[0]}, total cents: {rows[1]}")
