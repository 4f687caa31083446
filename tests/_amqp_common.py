"""What the AMQP tests and the AMQP worker script share: the ledger, the handlers, and
small pika helpers (declare, publish with confirms, read a queue)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import sqlalchemy as sa
from _celery_harness import wait_until as _wait_until
from idempotent.integrations.amqp import Consumer, Message

TESTS = Path(__file__).resolve().parent

metadata = sa.MetaData()
ledger = sa.Table(
    "amqp_ledger", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("payment_id", sa.String(64), nullable=False),  # not unique: doubles must show
    sa.Column("cents", sa.BigInteger, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


def apply_payment(message: Message, *, connection: sa.Connection) -> dict[str, Any]:
    """Transactional: one ledger row per payment, committed with its key."""
    body = message.body
    connection.execute(ledger.insert(), {"payment_id": body["payment_id"],
                                         "cents": body["cents"], "pid": os.getpid()})
    return {"applied": body["payment_id"], "cents": body["cents"]}


def declare(url: str, queue: str, *, quorum: bool = False, dlx: str | None = None) -> None:
    """A durable queue (classic or quorum) and, with ``dlx``, a fanout dead-letter exchange
    of that name bound to a durable queue of the same name."""
    with connection(url) as conn:
        ch = conn.channel()
        args = {"x-queue-type": "quorum"} if quorum else {}
        ch.queue_declare(queue, durable=True, arguments=args)
        if dlx is not None:
            ch.exchange_declare(dlx, "fanout", durable=True)
            ch.queue_declare(dlx, durable=True)
            ch.queue_bind(dlx, dlx)


@contextmanager
def connection(url: str) -> Iterator[pika.BlockingConnection]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


def publish(url: str, queue: str, messages: Iterable[tuple[bytes | dict[str, Any], dict[str, Any]]]
            ) -> int:
    """Publish (body, properties) pairs persistently, each confirmed by the broker; a dict
    body is sent as JSON. Returns how many."""
    n = 0
    with connection(url) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for body, props in messages:
            raw = json.dumps(body).encode() if isinstance(body, dict) else body
            ch.basic_publish("", queue, raw, pika.BasicProperties(
                delivery_mode=2, content_type="application/json", **props))
            n += 1
    return n


def ready_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (not counting those delivered and unacked)."""
    with connection(url) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)


def drain(url: str, queue: str) -> list[tuple[bytes, Any]]:
    """Take every message of ``queue`` (basic_get, acked): (body, properties) pairs."""
    out = []
    with connection(url) as conn:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((body, props))


@contextmanager
def running(consumer: Consumer, url: str) -> Iterator[Consumer]:
    """``consumer.run(url)`` in a thread until the block ends; fails if it does not stop."""
    ready = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(url, on_ready=ready.set)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30), "consumer did not start"
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive(), "consumer did not stop"
    assert not errors, errors


def wait_until(check: Callable[[], Any], timeout: float, what: str,
               describe: Callable[[], str] | None = None) -> Any:
    """Poll ``check()`` until truthy; fail after ``timeout`` seconds (the suite's
    `_celery_harness.wait_until`, with ``describe`` by position)."""
    return _wait_until(check, timeout, what, poll=0.05, describe=describe)


class Proc:
    """One ``_amqp_worker.py`` consumer process a test started (its own session), by PID;
    ``args`` are the worker's command-line arguments, its output goes to ``logs/<name>.log``."""

    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name, self.args = name, args
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
        with open(self.log, "ab") as out:
            out.write(f"==== start {self.starts + 1}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, str(TESTS / "_amqp_worker.py"), *self.args], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.starts += 1

    def current_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text("utf-8", "replace").rsplit("==== start ", 1)[-1]
        return ""

    def ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and "ready " in self.current_log()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the consumer stops after the message in hand), SIGKILL after a deadline."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait(30)
