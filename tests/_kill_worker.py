"""A worker process that delivers one payment through ``@idempotent`` and SIGKILLs itself
at one point of the delivery (the SIGKILL column of the fault matrix, issue 9; see
``tests/test_fault_kill.py``).

Run as ``python tests/_kill_worker.py '<json spec>'``; the spec names the store
(``sqlite``, ``postgres``, ``redis``) and its URL, the mode (``lease``, ``own``,
``own-pess``, ``caller``), the payment, the kill point and a marker file. Just before it
kills itself the worker writes the point's name to the marker file (fsynced), so the test
knows the kill came from where it was meant to. With ``hold`` (a path) it first writes
``holding`` to the marker file and waits at the point, holding what it holds there (a
claimed key, an open transaction), until the test creates the ``hold`` file: so a
duplicate can be made to wait on the worker before it dies. A worker that reaches the end without
being killed exits 0 (the test then fails on the return code).

The same module gives the test its schema and its handler (`Payments`), so the killed
run and the redeliveries run the very same code: in transactional modes the handler
inserts a ledger row through its ``connection``; in lease mode it writes a row in a
"provider" table in a transaction of its own (an external effect, committed at once),
keyed by ``current_key()`` and deliberately NOT deduplicated, so a repeated effect shows.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from idempotent import SqlStore, current_key, idempotent

NS = "fault_kill"
LEASE = 1.0  # the minimum: the killed worker's lease runs out quickly

#: Where a worker can die, in delivery order.
POINTS = ("before_claim", "handler_start", "before_effect", "after_effect", "at_complete",
          "after_complete", "at_commit", "after_commit")

meta = sa.MetaData()
ledger = sa.Table(  # transactional modes: the handler's write, in the key's transaction
    "kill_ledger", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(100), nullable=False),  # no unique index: count them
    sa.Column("cents", sa.Integer, nullable=False),
    sa.Column("by", sa.String(40), nullable=False),
)
provider = sa.Table(  # lease mode: the payment provider's charges (no dedup on purpose)
    "kill_provider", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("idem_key", sa.String(200), nullable=False),
    sa.Column("payment_id", sa.String(100), nullable=False),
    sa.Column("cents", sa.Integer, nullable=False),
    sa.Column("by", sa.String(40), nullable=False),
)
rest = sa.Table(  # caller mode: the rest of the caller's (a batch consumer's) transaction
    "kill_batch_rest", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(100), nullable=False),
    sa.Column("by", sa.String(40), nullable=False),
)


def die(marker: str, point: str) -> None:
    """Say where, durably, then SIGKILL this process (no cleanup, no finally, no atexit)."""
    with open(marker, "w") as f:
        f.write(point)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached: the signal is delivered before os.kill returns


class Payments:
    """The payment handler of one store and mode; ``by`` names who runs it (written in
    the effect's row and the result), ``runs`` counts its runs in this process, and
    ``kill(point)`` is called at each point of the handler (a no-op in the test)."""

    def __init__(self, store: Any, mode: str, provider_engine: sa.Engine, by: str,
                 kill: Callable[[str], None] = lambda point: None) -> None:
        self.store, self.mode, self.by, self.kill = store, mode, by, kill
        self.provider_engine = provider_engine
        self.runs = 0
        self.returned: list[Any] = []
        if mode == "lease":
            @idempotent(store, key="payment_id", namespace=NS, lease=LEASE)
            def pay(msg: dict[str, Any]) -> Any:
                return self.body(msg, None)
        else:
            @idempotent(store, key="payment_id", namespace=NS, optimistic=mode != "own-pess")
            def pay(msg: dict[str, Any], *, connection: sa.Connection) -> Any:
                return self.body(msg, connection)
        self.pay = pay

    def body(self, msg: dict[str, Any], conn: sa.Connection | None) -> Any:
        self.runs += 1
        self.kill("handler_start")
        pid, cents = msg["payment_id"], msg["cents"]
        if conn is None:  # look the payment up at the provider (a read, no effect)
            with self.provider_engine.connect() as c:
                c.execute(sa.select(sa.func.count()).select_from(provider)
                          .where(provider.c.payment_id == pid)).scalar_one()
        else:  # read in the transaction first: it is open and has done something
            conn.execute(sa.select(sa.func.count()).select_from(ledger)
                         .where(ledger.c.payment_id == pid)).scalar_one()
        self.kill("before_effect")
        if conn is None:  # the external effect, committed at once, outside any store tx
            with self.provider_engine.begin() as c:
                c.execute(provider.insert().values(idem_key=current_key(), payment_id=pid,
                                                   cents=cents, by=self.by))
        else:
            conn.execute(ledger.insert().values(payment_id=pid, cents=cents, by=self.by))
        self.kill("after_effect")
        value = {"payment_id": pid, "cents": cents, "by": self.by}
        self.returned.append(value)
        return value

    def deliver(self, msg: dict[str, Any], engine: sa.Engine | None = None,
                kill: Callable[[str], None] = lambda point: None) -> Any:
        """One delivery; caller mode opens the caller's transaction on ``engine``, writes
        the rest of its batch in it and passes it as ``connection=``."""
        if self.mode != "caller":
            return self.pay(msg)
        assert engine is not None
        with engine.connect() as c, c.begin():
            c.execute(rest.insert().values(payment_id=msg["payment_id"], by=self.by))
            value = self.pay(msg, connection=c)
            kill("at_commit")  # the handler returned; the caller's COMMIT comes next
        kill("after_commit")
        return value


def main(spec: dict[str, Any]) -> None:
    point, marker, mode = spec["point"], spec["marker"], spec["mode"]

    hold = spec.get("hold")  # a file to wait for at the point, before dying there

    def kill(here: str) -> None:
        if here != point:
            return
        if hold is not None:  # say we hold the key, wait for the test's go, then die
            with open(marker, "w") as f:
                f.write("holding")
            end = time.monotonic() + 30.0
            while not os.path.exists(hold):
                if time.monotonic() > end:
                    sys.exit("no go from the test in 30 s")
                time.sleep(0.01)
        die(marker, here)

    if spec["store"] == "redis":
        from idempotent.stores.redis import RedisStore

        store: Any = RedisStore(spec["url"])
    else:
        store = SqlStore(spec["url"])
    provider_engine = sa.create_engine(spec["provider_url"])
    handler = Payments(store, mode, provider_engine, "worker", kill)

    # the store's operations, wrapped on this instance (the flow looks them up per call)
    claim_op = {"lease": "claim", "own": "transaction", "own-pess": "transaction",
                "caller": "join"}[mode]
    original_claim = getattr(store, claim_op)

    def claim(*args: Any, **kwargs: Any) -> Any:
        kill("before_claim")
        return original_claim(*args, **kwargs)

    setattr(store, claim_op, claim)
    if mode == "lease":
        original_complete = store.complete

        def complete(*args: Any, **kwargs: Any) -> Any:
            kill("at_complete")
            done = original_complete(*args, **kwargs)
            kill("after_complete")
            return done

        store.complete = complete
    else:  # the key's Transaction.commit: stores the result (and commits, in our tx)
        from idempotent.stores import sql

        original_commit = sql.Transaction.commit

        def commit(self: Any, result: bytes | None) -> Any:
            kill("at_complete" if mode == "caller" else "at_commit")
            done = original_commit(self, result)
            if mode != "caller":
                kill("after_commit")
            return done

        sql.Transaction.commit = commit  # type: ignore[method-assign]

    msg = {"payment_id": spec["payment_id"], "cents": spec["cents"]}
    engine = store.engine if mode == "caller" else None
    handler.deliver(msg, engine, kill)
    # not killed: say so on stdout (the test fails on the return code 0)
    print(json.dumps({"not_killed": point, "runs": handler.runs}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
