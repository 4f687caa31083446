"""The docs site builds with ``mkdocs build --strict``: a broken link or anchor, a page
missing from the navigation, or an API reference whose object cannot be found fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # the reference is generated from the docstrings, not empty headings
    assert "Make a handler run once per idempotency key" in api
    assert "idempotent.integrations.celery" in api
