"""Packaging: ``python -m build`` makes an sdist and a wheel; the wheel carries the Alembic
history and the integrations; installed into a fresh venv, its ``idempotent`` command
migrates a SQLite database and runs the demo. Built from a copy of the checkout, so no
build/, dist/ or *.egg-info is left in the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".hypothesis", "*.db", "*.db-wal", "*.db-shm",
)


def sh(*argv: str | Path, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "build", "--outdir", dist, src, cwd=tmp_path)
    wheel = next(dist.glob("idempotent_py-*.whl"))
    sdist = next(dist.glob("idempotent_py-*.tar.gz"))

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "idempotent/py.typed",
        "idempotent/cli.py",
        "idempotent/integrations/__init__.py",
        "idempotent/integrations/opentelemetry.py",
        "idempotent/migrations/__init__.py",
        "idempotent/migrations/env.py",
        "idempotent/migrations/script.py.mako",
        "idempotent/migrations/versions/__init__.py",
        "idempotent/migrations/versions/0001_records_table.py",
    } <= names, sorted(names)
    versions = {n for n in names if n.startswith("idempotent/migrations/versions/")}
    assert versions == {f"idempotent/migrations/versions/{p.name}"
                        for p in (ROOT / "migrations" / "versions").glob("*.py")}
    assert not any(n.startswith(("tests/", "migrations/", "integrations/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert "migrations/versions/0001_records_table.py" in members

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    sh(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)
    where = sh(venv / "bin" / "python", "-c", "import idempotent; print(idempotent.__file__)",
               cwd=tmp_path)
    assert where.startswith(str(venv)), where

    # the fresh venv has the core dependencies only: the optional extra names itself
    hint = subprocess.run(
        [venv / "bin" / "python", "-c", "import idempotent.integrations.opentelemetry"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert hint.returncode == 1 and "pip install 'idempotent-py[otel]'" in hint.stderr, hint.stderr

    cli = venv / "bin" / "idempotent"
    url = f"sqlite:///{tmp_path}/installed.db"
    out = sh(cli, "db", "upgrade", "--url", url, cwd=tmp_path)
    assert out.endswith("upgraded (none) -> idempotent_0003\n"), out
    assert sh(cli, "db", "current", "--url", url, cwd=tmp_path).endswith(
        "idempotent_0003 (at head)\n")
    assert sh(cli, "stats", "--url", url, cwd=tmp_path) == "no records\n"
    demo = sh(cli, "demo", "--payments", "200", "--progress", "none", cwd=tmp_path)
    assert "OK: every payment applied exactly once" in demo, demo
    assert re.search(r"^unique payments +200$", demo, re.MULTILINE), demo
    assert re.search(r"^ledger rows +200$", demo, re.MULTILINE), demo
