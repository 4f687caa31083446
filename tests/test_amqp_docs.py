"""Every Python block of docs/rabbitmq.md runs as written, each in a process of its own, in
a fresh directory, against the session's RabbitMQ node (``AMQP_URL``) and a fresh
PostgreSQL database (``DATABASE_URL``; ``postgresql+psycopg://``, which serves sync and
async engines). A block fails the test when it raises, its own ``assert`` lines included.
A block marked ``<!-- fragment: why -->`` is only compiled (the page has one: a Celery app,
which needs a worker process; tests/test_celery_rabbitmq.py runs real ones)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _amqp_common import connection
from _rabbitmq import RabbitServer, rabbit  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.postgres]

PAGE = Path(__file__).resolve().parent.parent / "docs" / "rabbitmq.md"
_BLOCK = re.compile(r"(<!-- fragment: (?P<why>[^>]*) -->\n)?^```python\n(?P<code>.*?)^```",
                    re.DOTALL | re.MULTILINE)
#: the queues and exchanges the page's blocks declare, deleted after each block
_NAMES = ("payments", "payments.dead", "aio-payments")


def blocks() -> list[tuple[int, str, str | None]]:
    text = PAGE.read_text()
    return [(text[:m.start()].count("\n") + 1, m["code"], m["why"])
            for m in _BLOCK.finditer(text)]


def test_the_page_has_runnable_blocks() -> None:
    """The pika quick start, the aio-pika block and the Celery configuration all run."""
    found = blocks()
    assert len(found) == 3
    assert [why is None for _, _, why in found] == [True, True, True]  # no fragments


@pytest.mark.parametrize(("line", "code", "why"), blocks(), ids=lambda v: str(v)[:12])
def test_block_runs(line: int, code: str, why: str | None, rabbit: RabbitServer,  # noqa: F811
                    pg_url: str, tmp_path: Path) -> None:
    """The block at this line of docs/rabbitmq.md runs as written and exits 0."""
    compile(code, f"docs/rabbitmq.md:{line}", "exec")
    if why is not None:
        return
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "AMQP_URL": rabbit.url, "DATABASE_URL": pg_url,
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    try:
        done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        with connection(rabbit.url) as conn:
            for name in _NAMES:
                ch = conn.channel()
                ch.queue_delete(name)
                if name.endswith(".dead"):
                    ch.exchange_delete(name)
    assert done.returncode == 0, f"docs/rabbitmq.md:{line}\n{done.stdout}\n{done.stderr}"
