"""examples/celery_payments/README.md runs as written: its commands, against a redis-server
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
from _celery_harness import wait_until
from _servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "celery_payments"


def blocks() -> list[tuple[str, str]]:
    """The README's fenced code blocks, as (info string, text), in order."""
    text = (EXAMPLE / "README.md").read_text()
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture
def servers(pg_server: PostgresServer) -> Iterator[dict[str, str]]:
    db = f"example_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(db)
    broker = RedisServer().start()
    try:
        yield {"BROKER_URL": broker.url, "DATABASE_URL": pg_server.url_for(db)}
    finally:
        broker.stop()
        pg_server.drop_database(db)


def test_readme_commands(servers: dict[str, str]) -> None:
    """Exports, the worker, then setup/send/check: the check prints the README's output."""
    (_, exports), (_, worker_cmd), (_, producer_cmds), (_, expected), *_ = blocks()
    assert set(re.findall(r"export (\w+)=", exports)) == set(servers)  # what we provide
    env = {**os.environ, **servers,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = Path(tempfile.mkdtemp(prefix="idem-example-")) / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(worker_cmd.strip(), shell=True, cwd=EXAMPLE, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b" ready." in log.read_bytes(), 60, "example worker ready",
                   describe=lambda: log.read_text()[-2000:])
        outputs = [subprocess.run(line, shell=True, cwd=EXAMPLE, env=env, capture_output=True,
                                  text=True, timeout=120, check=True).stdout
                   for line in producer_cmds.strip().splitlines()]
        assert outputs[-1] == expected
        assert wait_until(lambda: log.read_text().count(" succeeded in ") >= 600, 60,
                          "every message acked")
        text = log.read_text()
        assert text.count("] received") == 600
        assert text.count("{'status': 'applied'") == 600
    finally:
        os.killpg(worker.pid, signal.SIGTERM)  # the shell and the worker it started
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        log.unlink(missing_ok=True)
        log.parent.rmdir()
