"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_payments_sqlite_example_pays_once() -> None:
    """examples/payments_sqlite.py: two deliveries, one conflict, one ledger row."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "payments_sqlite.py")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out.count("'status': 'applied'") == 2
    assert "refused:" in out and "another payload" in out
    assert out.strip().endswith("ledger rows: 1, total cents: 2500")
