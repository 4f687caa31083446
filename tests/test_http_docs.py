"""Every Python block of docs/http.md runs as written, each in a process of its own
(warnings as errors), in a fresh directory, against the suite's redis-server
(``REDIS_URL``) and a fresh PostgreSQL database (``DATABASE_URL``, async psycopg). A block
fails the test when it raises, its own ``assert`` lines included. A block marked
``<!-- fragment: why -->`` would only be compiled; this page has none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "http.md"
_BLOCK = re.compile(r"(<!-- fragment: (?P<why>[^>]*) -->\n)?^```python\n(?P<code>.*?)^```",
                    re.DOTALL | re.MULTILINE)


def blocks() -> list[tuple[int, str, str | None]]:
    text = PAGE.read_text()
    return [(text[:m.start()].count("\n") + 1, m["code"], m["why"])
            for m in _BLOCK.finditer(text)]


def test_the_page_has_runnable_blocks() -> None:
    """Quick start, Flask, transactional, per-route and wait= blocks: none excused."""
    found = blocks()
    assert len(found) >= 5 and all(why is None for _, _, why in found)


@pytest.mark.parametrize(("line", "code", "why"), blocks(), ids=lambda v: str(v)[:12])
def test_block_runs(line: int, code: str, why: str | None, redis_url: str, pg_url: str,
                    tmp_path: Path) -> None:
    """The block at this line of docs/http.md runs as written and exits 0."""
    compile(code, f"docs/http.md:{line}", "exec")
    if why is not None:
        return
    env = {**os.environ, "REDIS_URL": redis_url,
           "DATABASE_URL": pg_url.replace("+psycopg://", "+psycopg_async://"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"docs/http.md:{line}\n{done.stdout}\n{done.stderr}"
