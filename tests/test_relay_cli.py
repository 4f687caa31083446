"""``idempotent relay``: the outbox's long-running relay, as a real process publishing to a
real redis-server broker, and its bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from _celery_harness import wait_until
from celery import Celery
from idempotent.integrations.celery_outbox import stage_task

from idempotent import SqlStore
from idempotent.outbox import Outbox

IDEMPOTENT = [sys.executable, "-m", "idempotent.cli"]


@pytest.fixture
def outbox_db(sqlite_url: str) -> Iterator[tuple[str, Outbox]]:
    store = SqlStore(sqlite_url)
    box = Outbox(store, [], grace=0)
    store.create_schema()
    yield sqlite_url, box
    box.close()
    store.engine.dispose()


def _stage(box: Outbox, n: int) -> list[str]:
    """n tasks staged and committed by a producer that died before publishing them."""
    app = Celery("producer", set_as_current=False)

    @app.task(name="t.pay")
    def pay(payment: dict) -> None: ...

    box.publishers["celery"] = object()  # type: ignore[assignment]  # staging checks names only
    ids = []
    with box.store.engine.begin() as conn:
        for i in range(n):
            ids.append(stage_task(box, conn, pay, ({"payment_id": f"p{i}"},), key=f"p{i}"))
    return ids


def _broker_ids(url: str) -> list[str]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(m)["headers"]["id"] for m in client.lrange("celery", 0, -1)]
    finally:
        client.close()


def test_relay_once_publishes_to_the_broker(outbox_db: tuple[str, Outbox],
                                            redis_url: str) -> None:
    url, box = outbox_db
    ids = _stage(box, 3)
    proc = subprocess.run([*IDEMPOTENT, "relay", "--url", url, "--celery-broker", redis_url,
                           "--once", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["published"] == 3 and doc["entries"] == {"sent": 3}
    assert sorted(_broker_ids(redis_url)) == sorted(ids)


def test_relay_runs_until_sigterm(outbox_db: tuple[str, Outbox], redis_url: str,
                                  tmp_path: Path) -> None:
    """A long-running relay publishes what is staged while it runs, and stops cleanly on
    SIGTERM with a summary."""
    url, box = outbox_db
    proc = subprocess.Popen([*IDEMPOTENT, "relay", "--url", url, "--celery-broker", redis_url,
                             "--interval", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ids = _stage(box, 5)
        wait_until(lambda: len(_broker_ids(redis_url)) == 5, 60, "the relay published 5")
        assert sorted(_broker_ids(redis_url)) == sorted(ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "published 5," in out and "sent 5" in out


@pytest.mark.parametrize(("extra", "message"), [
    ([], "one of the arguments --celery-broker --publishers is required"),
    (["--publishers", "nosuchmodule:x"], "No module named 'nosuchmodule'"),
    (["--publishers", "json"], "expected MODULE:NAME"),
    (["--publishers", "os:sep"], "gave no publishers"),
    (["--publishers", "json:dumps"], "TypeError"),
])
def test_relay_bad_input(outbox_db: tuple[str, Outbox], extra: list[str], message: str) -> None:
    url, _ = outbox_db
    proc = subprocess.run([*IDEMPOTENT, "relay", "--url", url, "--once", *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_relay_refuses_a_redis_url(redis_url: str) -> None:
    proc = subprocess.run([*IDEMPOTENT, "relay", "--url", redis_url, "--celery-broker",
                           redis_url, "--once"], capture_output=True, text=True, timeout=60,
                          env={**os.environ})
    assert proc.returncode == 2 and "SQL database" in proc.stderr, proc.stderr


def test_stats_and_purge_cover_the_outbox(outbox_db: tuple[str, Outbox]) -> None:
    """`idempotent stats` counts outbox entries per state and names unconfirmed ones;
    `idempotent purge` deletes delivered entries and keeps pending and unconfirmed ones."""
    url, box = outbox_db
    t = box.table
    with box.store.engine.begin() as conn:
        conn.execute(t.insert(), [
            {"id": f"e{i}", "publisher": "celery", "target": "t", "body": b"{}",
             "state": state, "publishes": 1, "failures": 0, "created_at": 1000.0 + i,
             "next_at": None} for i, state in enumerate(
                 ["sent", "sent", "confirmed", "pending", "unconfirmed"])])
    proc = subprocess.run([*IDEMPOTENT, "stats", "--url", url, "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outbox"] == {"sent": 2, "confirmed": 1, "pending": 1,
                                                 "unconfirmed": 1}
    text = subprocess.run([*IDEMPOTENT, "stats", "--url", url], capture_output=True, text=True,
                          timeout=60).stdout
    assert "outbox: confirmed 1, pending 1, sent 2, unconfirmed 1 (1 never confirmed" in text
    proc = subprocess.run([*IDEMPOTENT, "purge", "--url", url, "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outbox_deleted"] == 3  # staged long ago, delivered
    with box.store.engine.connect() as conn:
        left = dict(conn.execute(sa.select(t.c.id, t.c.state)).all())  # type: ignore[arg-type]
    assert left == {"e3": "pending", "e4": "unconfirmed"}
