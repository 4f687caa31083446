"""Shared helpers for the benchmarks in this directory.

* ``setup_paths()`` puts the repository root (for ``idempotent``) and ``tests/`` (for the
  ``_servers`` harness) on ``sys.path``, so a script runs from a checkout as
  ``.venv/bin/python benchmarks/<name>.py``.
* ``parse_args()``: the common ``--quick`` / ``--json`` / ``--rounds`` / ``--n`` options.
* ``interleave()``: run every variant once per round, in a rotated order, for several
  rounds; each variant's figure is the median over rounds, and its ratio against the
  baseline is the median of the per-round ratios (the baseline and the variant of one
  round ran seconds apart, so slow drifts of a noisy 2-core machine cancel out).
* ``postgres()``: a private PostgreSQL (fsync on) on loopback, via ``tests/_servers.py``.
* ``report()``: print the table, or the JSON document with ``--json``.

No thresholds here: targets are printed next to the measured figure, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def setup_paths() -> None:
    for p in (ROOT / "tests", ROOT):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


setup_paths()


# -- options -------------------------------------------------------------------------------
def parse_args(
    description: str, *, rounds: int, n: int, quick_rounds: int = 3, quick_n: int | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="a short run (smoke test; noisy)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results only")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"interleaved rounds (default {rounds}, --quick {quick_rounds})")
    ap.add_argument("--n", type=int, default=None,
                    help=f"operations per variant per round (default {n})")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = quick_rounds if args.quick else rounds
    if args.n is None:
        args.n = (quick_n or max(1, n // 5)) if args.quick else n
    return args


def log(args: argparse.Namespace, *msg: Any) -> None:
    """Progress lines go to stderr, so ``--json`` output stays clean."""
    print(*msg, file=sys.stderr, flush=True)


# -- measuring -----------------------------------------------------------------------------
#: A variant runs ``n`` operations and returns ``timed(...)`` of its timed part: (wall
#: seconds, CPU seconds of this process). Setup such as building the messages stays outside.
Variant = Callable[[int], "tuple[float, float]"]


class _GcClock:
    """Seconds spent in the cyclic garbage collector (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        self.last = 0.0  # GC seconds inside the last ``timed`` region
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


GC = _GcClock()


def timed(loop: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds ``loop()`` took, after a garbage collection so earlier
    garbage is not billed to it. ``GC.last`` is set to the GC time inside the loop."""
    gc.collect()
    g0 = GC.total
    c0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    loop()
    t1 = time.perf_counter_ns()
    c1 = time.process_time_ns()
    GC.last = GC.total - g0
    return (t1 - t0) / 1e9, (c1 - c0) / 1e9


@dataclass
class Result:
    name: str
    unit_per_op: int  # how many "messages" one operation carries (100 for a batch)
    seconds: list[float] = field(default_factory=list)  # per round, for n operations
    cpu_seconds: list[float] = field(default_factory=list)  # client CPU, per round
    gc_seconds: list[float] = field(default_factory=list)  # cyclic GC inside, per round
    n: int = 0
    baseline: str | None = None
    ratios: list[float] = field(default_factory=list)  # throughput ratio vs baseline, per round
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_op_us(self) -> float:
        return self.median_s / self.n * 1e6

    @property
    def cpu_per_op_us(self) -> float:
        return statistics.median(self.cpu_seconds) / self.n * 1e6

    @property
    def gc_per_op_us(self) -> float:
        return statistics.median(self.gc_seconds) / self.n * 1e6 if self.gc_seconds else 0.0

    @property
    def per_s(self) -> float:
        """Messages per second (operations per second times messages per operation)."""
        return self.n * self.unit_per_op / self.median_s

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def ratio_range(self) -> tuple[float, float] | None:
        return (min(self.ratios), max(self.ratios)) if self.ratios else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_per_round": self.n,
            "messages_per_op": self.unit_per_op,
            "median_seconds": self.median_s,
            "per_op_us": self.per_op_us,
            "client_cpu_per_op_us": self.cpu_per_op_us,
            "gc_per_op_us": self.gc_per_op_us,
            "messages_per_s": self.per_s,
            "baseline": self.baseline,
            "ratio_vs_baseline": self.ratio,
            "ratio_min": self.ratio_range[0] if self.ratios else None,
            "ratio_max": self.ratio_range[1] if self.ratios else None,
            "round_seconds": self.seconds,
            "round_cpu_seconds": self.cpu_seconds,
            "round_ratios": self.ratios,
            "note": self.note,
        }


def interleave(
    variants: dict[str, Variant],
    *,
    rounds: int,
    n: int,
    baseline: dict[str, str] | str,
    warmup: int | None = None,
    unit_per_op: dict[str, int] | int = 1,
    args: argparse.Namespace | None = None,
    label: str = "",
) -> dict[str, Result]:
    """Run each variant ``n`` operations per round, ``rounds`` rounds, rotating the order.

    ``baseline`` names the variant every other is compared to (or maps a variant to its
    own baseline). One untimed warm-up pass of ``warmup`` operations (default ``n // 5``)
    runs first for every variant: caches, prepared statements, pool, JIT of nothing.
    """
    names = list(variants)
    base_of = baseline if isinstance(baseline, dict) else {k: baseline for k in names}
    units = unit_per_op if isinstance(unit_per_op, dict) else {k: unit_per_op for k in names}
    results = {k: Result(k, units.get(k, 1), n=n, baseline=base_of.get(k)) for k in names}
    for k in names:
        variants[k](warmup if warmup is not None else max(1, n // 5))
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            wall, cpu = variants[k](n)
            results[k].seconds.append(wall)
            results[k].cpu_seconds.append(cpu)
            results[k].gc_seconds.append(GC.last)
        if args is not None:
            parts = ", ".join(f"{k} {n * results[k].unit_per_op / results[k].seconds[-1]:,.0f}/s"
                              for k in names)
            log(args, f"  {label}round {r + 1}/{rounds}: {parts}")
    for k in names:
        b = base_of.get(k)
        if b is None or b == k:
            results[k].baseline = None if b is None else k
            continue
        bs, vs = results[b].seconds, results[k].seconds
        results[k].ratios = [bt / vt for bt, vt in zip(bs, vs, strict=True)]  # throughput ratio
    return results


# -- servers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def postgres(**settings: Any) -> Iterator[Any]:
    """A private PostgreSQL on 127.0.0.1 (fsync on), stopped and deleted on exit."""
    from _servers import PostgresServer

    with PostgresServer(settings or None) as pg:
        yield pg


def pg_version(engine: Any) -> str:
    import sqlalchemy as sa

    with engine.connect() as c:
        return str(c.execute(sa.text("SHOW server_version")).scalar())


def git_describe() -> str:
    """The commit the library was measured at, and whether idempotent/ had local edits."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "idempotent"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}{' + local edits in idempotent/' if dirty else ''}"


def environment() -> dict[str, Any]:
    import sqlalchemy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "library": git_describe(),
        "loadavg_1m": os.getloadavg()[0],
    }
    try:
        import psycopg

        env["psycopg"] = f"{psycopg.__version__} ({psycopg.pq.__impl__})"
    except ImportError:
        pass
    import sqlite3

    env["sqlite"] = sqlite3.sqlite_version
    return env


# -- profiling -------------------------------------------------------------------------------
def profile_calls(fn: Callable[[], object], n: int, *, top: int = 10,
                  title: str = "") -> tuple[str, list[dict[str, Any]]]:
    """cProfile ``fn`` (which makes ``n`` calls of the code under study); a table of the
    top functions inside ``idempotent/`` by own time, per call, then pstats' top overall."""
    import cProfile
    import io
    import pstats

    import idempotent

    pkg_dir = str(Path(idempotent.__file__).parent) + os.sep
    gc.collect()
    g0 = GC.total
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    gc_us = (GC.total - g0) / n * 1e6
    st = pstats.Stats(prof)
    rows, total, inside = [], 0.0, 0.0
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        total += tt
        if file.startswith(pkg_dir):
            inside += tt
            rows.append({"function": f"{file[len(pkg_dir):]}:{line}({func})", "calls": nc / n,
                         "own_us": tt / n * 1e6, "cum_us": ct / n * 1e6})
    rows.sort(key=lambda r: r["own_us"], reverse=True)
    lines = [
        f"{title}cProfile over {n} calls, µs per call under the profiler (inflated, compare "
        f"within the table): total {total / n * 1e6:.1f}, own time inside idempotent/ "
        f"{inside / n * 1e6:.1f}, cyclic GC {gc_us:.1f}",
        "top inside idempotent/ by own time:",
        table(["function", "calls/call", "own µs", "cum µs"],
              [[r["function"], f"{r['calls']:g}", f"{r['own_us']:.2f}", f"{r['cum_us']:.2f}"]
               for r in rows[:top]]),
    ]
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    body = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(body) if ln.lstrip().startswith("ncalls")), 0)
    lines.append(f"top overall by own time (seconds for all {n} calls):")
    lines.extend(body[start:])
    return "\n".join(lines), rows[:top]


# -- output ----------------------------------------------------------------------------------
def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def result_rows(results: dict[str, Result], *, rate_label: str = "ops/s",
                per_op: bool = True, cpu: bool = True) -> tuple[list[str], list[list[str]]]:
    headers = ["variant"]
    if per_op:
        headers.append("µs/op")
    if cpu:
        headers.append("client CPU µs/op")
    headers += [rate_label, "ratio", "ratio range", "vs"]
    rows = []
    for r in results.values():
        row = [r.name]
        if per_op:
            row.append(f"{r.per_op_us:,.1f}")
        if cpu:
            row.append(f"{r.cpu_per_op_us:,.0f}")
        row.append(fmt_rate(r.per_s))
        if r.ratio is None:
            is_base = r.baseline == r.name
            row += ["1.00" if is_base else "-", "-", "(baseline)" if r.baseline else "-"]
        else:
            lo, hi = r.ratio_range  # type: ignore[misc]
            row += [f"{r.ratio:.2f}", f"{lo:.2f}-{hi:.2f}", r.baseline or "-"]
        rows.append(row)
    return headers, rows


def report(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    """``--json``: the document on stdout; otherwise the human table."""
    if args.json:
        doc = {"environment": environment(), **doc}
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(text)


def target_line(what: str, measured: float | None, target: float, *, fmt: str = "{:.2f}",
                higher_is_better: bool = True) -> tuple[str, dict[str, Any]]:
    if measured is None:
        return f"target {what}: not measured", {"what": what, "target": target, "met": None}
    met = measured >= target if higher_is_better else measured <= target
    sign = ">=" if higher_is_better else "<="
    text = (f"target {what} {sign} {fmt.format(target)}: measured {fmt.format(measured)} "
            f"-> {'MET' if met else 'MISSED'}")
    return text, {"what": what, "target": target, "measured": measured, "met": met,
                  "comparison": sign}
