"""Every Python block of README.md and of the docs site (docs/*.md) runs as written.

Each block runs in a process of its own (so a block that registers a global listener or
configures logging touches nothing else), in a fresh directory, with the suite's servers
in the environment variables the blocks read with a local default: ``REDIS_URL``,
``DATABASE_URL`` (a fresh PostgreSQL database) and ``CELERY_BROKER_URL``. A block fails the
test when it raises, including its own ``assert`` lines, which state what it promises.

Pages of the consumer and HTTP integrations run their blocks in their own tests, against
the brokers those tests start; `RUN_ELSEWHERE` names the test file of each, and this module
checks that the file exists and reads the page.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)

#: page -> the test module that runs its blocks (against the servers it starts)
RUN_ELSEWHERE: dict[str, str] = {}
for _page, _test in (
    ("docs/kafka.md", "tests/test_kafka_docs.py"),
    ("docs/sqs.md", "tests/test_sqs_docs.py"),
    ("docs/rabbitmq.md", "tests/test_amqp_docs.py"),
    ("docs/http.md", "tests/test_http_docs.py"),
):
    if (ROOT / _page).exists():
        RUN_ELSEWHERE[_page] = _test


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in pages():
        rel = str(page.relative_to(ROOT))
        if rel in RUN_ELSEWHERE:
            continue
        text = page.read_text()
        for m in _BLOCK.finditer(text):
            found.append((rel, text[:m.start()].count("\n") + 1, m["code"]))
    return found


def test_every_block_is_run() -> None:
    """No block is excused: the pages this module runs have no `fragment` markers, and the
    README and the getting-started page each have a runnable block."""
    for page in pages():
        rel = str(page.relative_to(ROOT))
        if rel not in RUN_ELSEWHERE:
            assert "<!-- fragment" not in page.read_text(), f"{rel} excuses a block from running"
    assert {p for p, _, _ in blocks()} >= {"README.md", "docs/index.md"}


@pytest.mark.parametrize("page", sorted(RUN_ELSEWHERE))
def test_integration_pages_are_run_by_their_tests(page: str) -> None:
    test = ROOT / RUN_ELSEWHERE[page]
    assert test.exists(), f"{page} has Python blocks for {test.name} to run, and it is missing"
    assert Path(page).name in test.read_text(), f"{test.name} does not read {page}"


@pytest.mark.parametrize(("page", "line", "code"), blocks(),
                         ids=[f"{p}:{n}" for p, n, _ in blocks()])
def test_block_runs(page: str, line: int, code: str, tmp_path: Path,
                    request: pytest.FixtureRequest) -> None:
    """The block at this line runs as written and exits 0."""
    env = dict(os.environ)
    if "REDIS_URL" in code or "CELERY_BROKER_URL" in code:
        env["REDIS_URL"] = env["CELERY_BROKER_URL"] = request.getfixturevalue("redis_url")
    if "DATABASE_URL" in code:
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
    script = tmp_path / "block.py"
    # line numbers in a traceback are the page's own
    script.write_text("\n" * line + code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{page}:{line} failed:\n{proc.stdout}\n{proc.stderr}"
    if "send_once(apply_payment" in code:  # the Celery block: two sends, one task id
        _two_messages_one_task_id(env["CELERY_BROKER_URL"])


def _two_messages_one_task_id(url: str) -> None:
    import json

    import redis

    client = redis.Redis.from_url(url)
    try:
        raw = client.lrange("celery", 0, -1)
    finally:
        client.close()
    ids = [json.loads(m)["headers"]["id"] for m in raw]
    assert len(ids) == 2 and len(set(ids)) == 1, ids


def test_performance_charts_match_the_figures() -> None:
    """docs/img/*.svg are drawn from benchmarks/figures.json as it stands."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_figures.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
