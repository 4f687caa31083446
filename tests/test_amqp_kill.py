"""SIGKILL of a real pika consumer process at the two points of a delivery that matter:
inside the handler's transaction (after its write, before the commit) and after the commit
but before the ack. Either way the message is redelivered, and the ledger ends with one row:
the first case rolled back and runs again, the second is acked as a duplicate."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from _amqp_common import Proc, declare, ledger, metadata, publish, ready_count, wait_until
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture

from idempotent import SqlStore

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    metadata.create_all(engine)
    SqlStore(engine).create_schema()
    yield engine
    engine.dispose()


@pytest.fixture
def marks() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="idem-amqp-kill-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _ledger(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as c:
        return Counter(r[0] for r in c.execute(sa.select(ledger.c.payment_id)))


def _records(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text("SELECT count(*) FROM idempotency_records")).scalar() or 0)


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_sigkill_mid_delivery_applies_once(point: str, rabbit: RabbitServer,  # noqa: F811
                                           engine: sa.Engine, pg_url: str, marks: Path,
                                           tmp_path: Path) -> None:
    """The consumer is SIGKILLed while it holds the payment at ``point``; a new consumer
    gets the redelivery: one ledger row, the amount exact, the queue empty."""
    q = f"kill-{uuid.uuid4().hex[:8]}"
    declare(rabbit.url, q, dlx=f"{q}.dlx")
    publish(rabbit.url, q, [({"payment_id": "pay_k", "cents": 777, "hang": point},
                             {"message_id": "pay_k"})])
    args = [rabbit.url, pg_url, q, f"{q}.dlx", str(marks)]
    first = Proc("first", args, tmp_path)
    second = Proc("second", args, tmp_path)
    try:
        first.start()
        wait_until(lambda: (marks / "pay_k").exists(), 60, f"the consumer at {point}",
                   first.current_log)
        # what the store says while the consumer hangs there: nothing before the commit,
        # the row and its key after it; the message is unacked either way
        expected = 1 if point == "after_commit" else 0
        assert len(_ledger(engine)) == expected and _records(engine) == expected
        assert ready_count(rabbit.url, q) == 0  # delivered, not acked
        first.kill()
        second.start()
        wait_until(lambda: _ledger(engine) == Counter({"pay_k": 1})
                   and ready_count(rabbit.url, q) == 0, 60, "the redelivery handled",
                   second.current_log)
        second.stop()  # cleanly: whatever it held goes back and is counted below
        assert ready_count(rabbit.url, q) == 0
    finally:
        first.kill()
        second.stop(10)
    with engine.connect() as c:
        assert c.execute(sa.select(ledger.c.cents)).scalars().all() == [777]
    assert _records(engine) == 1
