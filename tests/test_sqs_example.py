"""examples/sqs_payments/README.md runs as written: its commands, against a moto SQS server
and a PostgreSQL database this test starts, print what the page says they print."""

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
from _moto import MotoServer, queue_counts, wait_until
from _servers import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sqs_payments"


def blocks() -> list[tuple[str, str]]:
    """The README's fenced code blocks, as (info string, text), in order."""
    text = (EXAMPLE / "README.md").read_text()
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture
def servers(pg_server: PostgresServer) -> Iterator[tuple[MotoServer, dict[str, str]]]:
    db = f"example_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(db)
    try:
        with MotoServer() as moto:
            yield moto, {**moto.env(), "DATABASE_URL": pg_server.url_for(db)}
    finally:
        pg_server.drop_database(db)


def test_readme_commands(servers: tuple[MotoServer, dict[str, str]]) -> None:
    """Exports, setup, the consumer, then send/check: check prints the README's output,
    the consumer printed 100 processed and 200 duplicate, and the queue is empty."""
    moto, values = servers
    (_, exports), (_, setup_cmd), (_, consumer_cmd), (_, producer_cmds), (_, expected), \
        *_ = blocks()
    assert set(re.findall(r"export (\w+)=", exports)) == set(values)  # what we provide
    env = {**os.environ, **values,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(line: str) -> str:
        return subprocess.run(line, shell=True, cwd=EXAMPLE, env=env, capture_output=True,
                              text=True, timeout=120, check=True).stdout

    assert run(setup_cmd.strip()).startswith("tables ready, queue ")
    log = Path(tempfile.mkdtemp(prefix="idem-sqs-example-")) / "consumer.log"
    with open(log, "wb") as out:
        consumer = subprocess.Popen(consumer_cmd.strip(), shell=True, cwd=EXAMPLE, env=env,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        wait_until(lambda: b"ready: consuming" in log.read_bytes(), 60, "consumer ready",
                   describe=lambda: log.read_text()[-2000:])
        outputs = [run(line) for line in producer_cmds.strip().splitlines()]
        assert outputs[0] == "sent 300 messages for 100 payments\n"
        assert outputs[-1] == expected
        wait_until(lambda: len(log.read_text().splitlines()) >= 301, 60, "every outcome",
                   describe=lambda: log.read_text()[-2000:])
        lines = log.read_text().splitlines()[1:]
        assert sum(line.startswith("processed ") for line in lines) == 100
        assert sum(line.startswith("duplicate ") for line in lines) == 200
        client = moto.client()
        try:
            url = client.get_queue_url(QueueName="payments")["QueueUrl"]
            wait_until(lambda: queue_counts(client, url) == (0, 0), 30, "every message deleted")
        finally:
            client.close()
    finally:
        os.killpg(consumer.pid, signal.SIGTERM)  # the shell and the consumer it started
        try:
            consumer.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait(10)
        log.unlink(missing_ok=True)
        log.parent.rmdir()
