"""Every Python block of docs/kafka.md runs as written, each in a process of its own, in a
fresh directory, against a mock Kafka cluster this module holds (``KAFKA_BOOTSTRAP``) and
a fresh PostgreSQL database (``DATABASE_URL``). A block fails the test when it raises,
its own ``assert`` lines included. A block marked ``<!-- fragment: why -->`` would only
be compiled; this page has none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _kafka import MockKafka

pytestmark = [pytest.mark.postgres]

PAGE = Path(__file__).resolve().parent.parent / "docs" / "kafka.md"
_BLOCK = re.compile(r"(<!-- fragment: (?P<why>[^>]*) -->\n)?^```python\n(?P<code>.*?)^```",
                    re.DOTALL | re.MULTILINE)


def blocks() -> list[tuple[int, str, str | None]]:
    text = PAGE.read_text()
    return [(text[:m.start()].count("\n") + 1, m["code"], m["why"])
            for m in _BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def kafka() -> Iterator[MockKafka]:
    with MockKafka() as cluster:
        yield cluster


def test_the_page_has_runnable_blocks() -> None:
    """The quick start and the lease-mode block: both run, none excused."""
    found = blocks()
    assert len(found) == 2 and all(why is None for _, _, why in found)


@pytest.mark.parametrize(("line", "code", "why"), blocks(), ids=lambda v: str(v)[:12])
def test_block_runs(line: int, code: str, why: str | None, kafka: MockKafka, pg_url: str,
                    tmp_path: Path) -> None:
    """The block at this line of docs/kafka.md runs as written and exits 0."""
    compile(code, f"docs/kafka.md:{line}", "exec")
    if why is not None:
        return
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "KAFKA_BOOTSTRAP": kafka.bootstrap, "DATABASE_URL": pg_url,
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"docs/kafka.md:{line}\n{done.stdout}\n{done.stderr}"
