"""`idempotent demo`: the payment stream ends with every payment applied exactly once."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from idempotent import demo
from idempotent.cli import main


def _table(text: str) -> dict[str, str]:
    """The demo's summary table as {label: value}."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([a-z][a-z /()]+?)\s{2,}(\S.*?)\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def _int(value: str) -> int:
    return int(value.replace(",", ""))


def test_demo_applies_every_payment_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--payments", "300", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    t = _table(out)
    assert _int(t["ledger rows"]) == 300
    assert _int(t["unique payments"]) == 300
    assert t["amount applied"] == t["amount expected"]
    assert _int(t["crashes that left a record"]) == 0
    deliveries = _int(t["deliveries"])
    assert deliveries > 300  # 1-3 deliveries each: some were duplicates
    assert deliveries == (_int(t["applied (handler committed)"]) + _int(t["duplicates skipped"])
                          + _int(t["crashes (rolled back)"]))
    assert _int(t["applied (handler committed)"]) == 300
    assert _int(t["crashes recovered"]) == _int(t["crashes (rolled back)"])
    assert "OK: every payment applied exactly once" in out


def test_console_script_runs_the_demo(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("idempotent")
    assert script.exists(), f"console script missing next to {sys.executable}"
    proc = subprocess.run(
        [str(script), "demo", "--payments", "120", "--crash-rate", "0.3", "--progress", "text"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = _table(proc.stdout)
    assert _int(t["ledger rows"]) == _int(t["unique payments"]) == 120
    assert t["amount applied"] == t["amount expected"]
    assert _int(t["crashes (rolled back)"]) > 0
    assert "deliveries (100%)" in proc.stderr  # the textual progress line
    assert list(tmp_path.iterdir()) == []  # the temporary database went elsewhere


def test_a_duplicate_committed_behind_the_decorators_back_fails_the_demo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(payments=50, seed=3, progress="none", sabotage=True) == 1
    captured = capsys.readouterr()
    assert _int(_table(captured.out)["ledger rows"]) == 51
    assert "FAILED: exactly-once broken" in captured.err
    assert "ledger rows (51) != unique payments (50)" in captured.err
    assert "amount applied" in captured.err
    assert "OK:" not in captured.out


def test_sabotage_flag_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--payments", "20", "--progress", "none", "--sabotage"]) == 1
    assert "extra ledger row" in capsys.readouterr().err


def test_db_file_is_kept_and_restarted_clean(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"
    for seed in (1, 2):  # the second run must not count the first run's rows or keys
        report = demo.run_demo(payments=40, seed=seed, db=str(path), progress="none")
        assert report.ok, report.problems()
        assert report.ledger_rows == 40
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT count(*) FROM {demo.RECORDS_TABLE}")).scalar()
    finally:
        engine.dispose()
    assert rows == 40


def test_no_crashes_when_the_rate_is_zero() -> None:
    report = demo.run_demo(payments=30, seed=5, crash_rate=0.0, progress="none")
    assert report.ok
    assert report.crashes == report.crashes_recovered == 0
    assert report.deliveries == report.applied + report.duplicates


def test_same_seed_same_run() -> None:
    a = demo.run_demo(payments=60, seed=11, progress="none")
    b = demo.run_demo(payments=60, seed=11, progress="none")
    assert (a.deliveries, a.duplicates, a.crashes, a.expected_cents) == (
        b.deliveries, b.duplicates, b.crashes, b.expected_cents)


def test_report_problems_name_each_failure() -> None:
    report = demo.DemoReport(
        unique_payments=10, ledger_rows=10, ledger_distinct=9, expected_cents=500,
        applied_cents=400, crashes=2, crashes_recovered=1, crashes_left_record=1,
    )
    problems = "\n".join(report.problems())
    assert "1 payment(s) missing" in problems
    assert "1 extra ledger row(s)" in problems
    assert "amount applied (4.00) != amount expected (5.00)" in problems
    assert "1 crash(es) left a record" in problems
    assert "1 crash(es) never recovered" in problems
    assert not report.ok


@pytest.mark.parametrize("mode", ["bar", "text"])
def test_progress_follows_a_growing_stream(mode: str) -> None:
    if mode == "bar":
        pytest.importorskip("tqdm")
    stream = io.StringIO()
    progress = demo._Progress(10, stream, mode)
    for i in range(12):
        if i < 2:
            progress.grow()  # two redeliveries joined the stream
        progress.step()
    progress.close()
    assert progress.total == progress.done == 12
    if mode == "text":
        lines = stream.getvalue().splitlines()
        assert len(lines) == 10
        assert lines[-1] == "demo: 12/12 deliveries (100%)"


@pytest.mark.parametrize("argv", [
    ["demo", "--crash-rate", "1"],
    ["demo", "--payments", "0"],
    ["demo", "--db", "x.db", "--url", "sqlite://"],
    [],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: idempotent" in capsys.readouterr().err


def test_an_unreachable_database_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    missing_dir = tmp_path / "no" / "such" / "dir" / "demo.db"
    assert main(["demo", "--payments", "5", "--db", str(missing_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idempotent demo: error: OperationalError")
    assert "Traceback" not in err


@pytest.mark.postgres
def test_demo_on_postgresql(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--payments", "200", "--url", pg_url, "--progress", "none"]) == 0
    out = capsys.readouterr().out
    t = _table(out)
    assert _int(t["ledger rows"]) == 200
    assert t["amount applied"] == t["amount expected"]
    assert "password" not in out
