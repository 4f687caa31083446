"""examples/rabbitmq_payments/README.md runs as written: its commands, against the session's
RabbitMQ node and a PostgreSQL database this test creates, print what the page says."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _amqp_common import connection, wait_until
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture
from _servers import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rabbitmq_payments"


def blocks() -> list[tuple[str, str]]:
    """The README's fenced code blocks, as (info string, text), in order."""
    text = (EXAMPLE / "README.md").read_text()
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture
def servers(pg_server: PostgresServer, rabbit: RabbitServer) -> Iterator[dict[str, str]]:  # noqa: F811
    db = f"example_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(db)
    try:
        yield {"AMQP_URL": rabbit.url, "DATABASE_URL": pg_server.url_for(db)}
    finally:
        pg_server.drop_database(db)
        with connection(rabbit.url) as conn:  # the example's fixed names: leave none behind
            ch = conn.channel()
            ch.queue_delete("payments")
            ch.queue_delete("payments.dead")
            ch.exchange_delete("payments.dead")


def test_readme_commands(servers: dict[str, str]) -> None:
    """Exports, setup, the consumer, then send/check: check prints the README's output."""
    (_, exports), (_, setup), (_, consumer_cmd), (_, producer_cmds), (_, expected), *_ = blocks()
    assert set(re.findall(r"export (\w+)=", exports)) == set(servers)  # what we provide
    env = {**os.environ, **servers,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def sh(line: str) -> str:
        return subprocess.run(line, shell=True, cwd=EXAMPLE, env=env, capture_output=True,
                              text=True, timeout=120, check=True).stdout

    assert sh(setup.strip()) == "tables and queues ready\n"
    log = Path(tempfile.mkdtemp(prefix="idem-amqp-example-")) / "consumer.log"
    with open(log, "wb") as out:
        consumer = subprocess.Popen(consumer_cmd.strip(), shell=True, cwd=EXAMPLE, env=env,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        wait_until(lambda: b"consuming" in log.read_bytes(), 60, "example consumer ready",
                   describe=lambda: log.read_text()[-2000:])
        outputs = [sh(line) for line in producer_cmds.strip().splitlines()]
        assert outputs[0] == "sent 602 messages for 200 payments and 2 bad ones\n"
        assert outputs[-1] == expected
    finally:
        os.killpg(consumer.pid, signal.SIGTERM)  # the shell and the consumer it started
        try:
            consumer.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait(10)
        log.unlink(missing_ok=True)
        log.parent.rmdir()
