"""A payments API whose POST /payments is safe to retry: FastAPI, PostgreSQL, and the
``Idempotency-Key`` header in transactional mode (the ledger row, the key and the response
commit together, or not at all)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI
from idempotent.integrations.asgi import IdempotencyMiddleware
from idempotent.integrations.fastapi import idempotency_session
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from idempotent import SqlStore

engine = create_async_engine(os.environ["DATABASE_URL"])
metadata = sa.MetaData()
ledger = sa.Table("ledger", metadata, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("account", sa.String(64), nullable=False),
                  sa.Column("cents", sa.Integer, nullable=False))
store = SqlStore(engine)


class Payment(BaseModel):
    account: str
    cents: int


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await store.create_schema()  # development only; production: `idempotent db upgrade`
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(IdempotencyMiddleware, store=store, transactional=True)


@app.post("/payments", status_code=201)
async def pay(p: Payment,
              session: Annotated[AsyncSession, Depends(idempotency_session)]) -> dict:
    row = await session.execute(
        sa.insert(ledger).values(account=p.account, cents=p.cents).returning(ledger.c.id))
    return {"payment": row.scalar_one(), "account": p.account, "cents": p.cents}


@app.get("/ledger")
async def totals() -> dict:
    async with engine.connect() as conn:
        rows, cents = (await conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.cents), 0)))).one()
    return {"rows": rows, "cents": cents}
