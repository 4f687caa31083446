"""The transactional outbox against publishing directly, on PostgreSQL and a Redis broker.

A private PostgreSQL (fsync on) and a private redis-server, both on loopback; Celery's
``send_task`` on the Redis transport publishes (nothing consumes; the queue is emptied
between rounds).

* **Producer**: one transaction per message that inserts an order row.
  ``direct``: the transaction, then ``send_task`` after COMMIT (the baseline: what a
  producer does without an outbox, and how it loses a message when it dies in between).
  ``outbox``: the same transaction also stages the task (`stage_task` of an idempotent
  task), and `Outbox.begin` publishes it right after COMMIT. Its entry needs no mark: the
  relay confirms it by the task's record later, off the producer's path.
* **Relay**: ``direct loop``: ``send_task`` for N messages in a loop (the baseline);
  ``relay``: N committed, unpublished outbox entries drained by `Outbox.relay_once`
  (batches of 100: one ``SELECT … FOR UPDATE SKIP LOCKED``, the publishes, one UPDATE).

Interleaved rounds, medians; ratio = messages/s against the baseline of the same round.

Run: ``.venv/bin/python benchmarks/bench_outbox.py [--quick] [--json]``
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import _common as C  # sets up sys.path first
import redis
import sqlalchemy as sa
from _servers import RedisServer
from celery import Celery
from idempotent.integrations.celery import idempotent_task
from idempotent.integrations.celery_outbox import CeleryPublisher, stage_task

from idempotent import SqlStore
from idempotent.outbox import Outbox

TARGET_PRODUCER = 0.8
TARGET_RELAY = 0.8
TASK = "bench.apply_payment"

ORDERS = sa.Table("bench_orders", sa.MetaData(),
                  sa.Column("id", sa.String(64), primary_key=True),
                  sa.Column("cents", sa.Integer, nullable=False))


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=500, quick_n=100)
    with C.postgres() as pg, RedisServer() as broker:
        engine = sa.create_engine(pg.url, pool_size=3, max_overflow=0)
        store = SqlStore(engine)
        app = Celery("bench", broker=broker.url, set_as_current=False)
        publisher = CeleryPublisher(app)
        outbox = Outbox(store, [publisher], grace=3600)  # the relay rounds pick entries up
        store.create_schema()
        ORDERS.create(engine)

        # an idempotent task, as stage_task is meant for: its entries are confirmed by the
        # task's record (nothing consumes in this benchmark; the relay rounds stage fresh
        # entries that are due at once)
        @idempotent_task(app, store, key="payment_id", name=TASK)
        def apply_payment(payment: dict[str, Any], connection: sa.Connection) -> None:
            raise AssertionError("not consumed here")

        task = apply_payment
        counter = itertools.count()
        rclient = redis.Redis.from_url(broker.url)

        def payments(n: int) -> list[dict[str, Any]]:
            return [{"payment_id": f"p{next(counter)}", "cents": 100} for _ in range(n)]

        def direct_producer(n: int) -> tuple[float, float]:
            batch = payments(n)

            def loop() -> None:
                for p in batch:
                    with engine.begin() as conn:
                        conn.execute(ORDERS.insert().values(id=p["payment_id"], cents=p["cents"]))
                    app.send_task(TASK, args=[p], task_id=str(uuid.uuid4()))
            t = C.timed(loop)
            rclient.delete("celery")
            return t

        def outbox_producer(n: int) -> tuple[float, float]:
            batch = payments(n)

            def loop() -> None:
                for p in batch:
                    with outbox.begin() as conn:
                        conn.execute(ORDERS.insert().values(id=p["payment_id"], cents=p["cents"]))
                        stage_task(outbox, conn, task, (p,))
                outbox.flush()
            t = C.timed(loop)
            rclient.delete("celery")
            return t

        def direct_loop(n: int) -> tuple[float, float]:
            batch = payments(n)
            t = C.timed(lambda: [app.send_task(TASK, args=[p], task_id=str(uuid.uuid4()))
                                 for p in batch])
            rclient.delete("celery")
            return t

        def relay(n: int) -> tuple[float, float]:
            batch = payments(n)
            with engine.begin() as conn:  # committed, never published (grace: 1 h)
                conn.execute(outbox.table.delete())  # the producer rounds' entries
                for p in batch:
                    stage_task(outbox, conn, task, (p,))
                conn.execute(outbox.table.update().where(outbox.table.c.state == "pending")
                             .values(next_at=0))
            done = 0

            def loop() -> None:
                nonlocal done
                while (r := outbox.relay_once(batch=100)).published:
                    done += r.published
            t = C.timed(loop)
            if done != n:
                raise AssertionError(f"the relay published {done} of {n}")
            rclient.delete("celery")
            return t

        version = C.pg_version(engine)
        C.log(args, f"PostgreSQL {version}, redis-server at {broker.url}; {args.n} messages per "
                    f"variant per round")
        producer = C.interleave({"direct": direct_producer, "outbox": outbox_producer},
                                rounds=args.rounds, n=args.n, baseline="direct", args=args,
                                label="producer ")
        relays = C.interleave({"direct loop": direct_loop, "relay": relay}, rounds=args.rounds,
                              n=args.n, baseline="direct loop", args=args, label="relay ")
        outbox.close()
        rclient.close()
        engine.dispose()

    targets = []
    lines = []
    for label, res, name, target in (("producer transactions/s", producer, "outbox",
                                      TARGET_PRODUCER),
                                     ("relay messages/s", relays, "relay", TARGET_RELAY)):
        line, t = C.target_line(f"{label} vs direct", res[name].ratio, target)
        lines.append(line)
        targets.append(t)
    if args.json:
        C.print_json({"producer": producer, "relay": relays}, targets, C.environment())
        return
    for title, res in (("producer (one transaction per message)", producer),
                       ("relay (publishing committed entries)", relays)):
        headers, rows = C.result_rows(res, rate_label="msg/s")
        print(f"\n{title}\n{C.table(headers, rows)}")
    print(f"\nbench_outbox ({C.git_describe()}): PostgreSQL {version} (fsync on, loopback), "
          f"redis-server broker; {args.n} messages per variant per round, {args.rounds} "
          f"interleaved rounds, medians")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
