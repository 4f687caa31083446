"""Per-call overhead of ``@idempotent`` in lease mode, on ``MemoryStore``.

No I/O: what is measured is the decorator's own Python (key extraction, fingerprint,
claim/complete state machine, heartbeat registration, result encoding, context var).
The handler returns a small dict. Variants, interleaved in rounds:

* ``bare``: the undecorated function (baseline)
* ``idem, new key``: ``@idempotent(MemoryStore(), key="id")``, default settings
  (fingerprint of the payload on, heartbeat on), a fresh key every call
* ``idem, duplicate``: the same handler called with keys it has already completed
  (the stored result is decoded and returned; the handler does not run)
* diagnostics (new keys): ``fingerprint=False``; ``heartbeat=False``; both off

Overhead = decorated µs/call minus bare µs/call, per round, median over rounds.
Every fresh-key run gets a new store (so the dict does not grow across rounds).

``--profile`` adds a cProfile of the fresh-key path: the top costs inside ``idempotent/``
(by own time), and the top overall.

``--baseline REV`` also runs the package as it was at git revision ``REV`` (exported with
``git archive`` to a temporary directory and imported as ``idempotent_baseline``), as
``baseline: idem, new key`` and ``baseline: idem, duplicate``, interleaved with the rest
in the same process: an A/B that the machine's load hits alike on both sides.

Run: ``.venv/bin/python benchmarks/bench_overhead.py [--quick] [--json] [--profile]
[--baseline REV]``
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import _common as C  # sets up sys.path first

from idempotent import MemoryStore, idempotent

TARGET_US = 10.0


def handler(msg: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "id": msg["id"]}


def load_baseline(rev: str) -> ModuleType:
    """The ``idempotent`` package at git revision ``rev``, imported as
    ``idempotent_baseline`` (its imports inside the package are relative)."""
    repo = Path(__file__).resolve().parent.parent
    data = subprocess.run(["git", "archive", rev, "idempotent"], cwd=repo, check=True,
                          capture_output=True).stdout
    where = Path(tempfile.mkdtemp(prefix="idempotent-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(where, filter="data")
    (where / "idempotent").rename(where / "idempotent_baseline")
    sys.path.insert(0, str(where))
    return importlib.import_module("idempotent_baseline")


class Bench:
    def __init__(self, lib: Any = None) -> None:
        lib = lib or sys.modules["idempotent"]
        self.lib = lib
        self.counter = itertools.count()
        self.dup_store = lib.MemoryStore()
        self.dup_fn = lib.idempotent(self.dup_store, key="id", namespace="bench.overhead")(
            handler)
        self.dup_msgs = self.messages(1000)
        for m in self.dup_msgs:
            self.dup_fn(m)

    def messages(self, n: int) -> list[dict[str, Any]]:
        return [{"id": f"m-{next(self.counter)}", "account": "acct-0042", "cents": 1234}
                for _ in range(n)]

    def bare(self, n: int) -> tuple[float, float]:
        msgs, fn = self.messages(n), handler

        def loop() -> None:
            for m in msgs:
                fn(m)

        return C.timed(loop)

    def fresh(self, **options: Any) -> C.Variant:
        def run(n: int) -> tuple[float, float]:
            lib = self.lib
            fn = lib.idempotent(lib.MemoryStore(), key="id", namespace="bench.overhead",
                                **options)(handler)
            msgs = self.messages(n)

            def loop() -> None:
                for m in msgs:
                    fn(m)

            return C.timed(loop)

        return run

    def duplicate(self, n: int) -> tuple[float, float]:
        src, fn = self.dup_msgs, self.dup_fn
        msgs = [src[i % len(src)] for i in range(n)]
        out: list[Any] = []

        def loop() -> None:
            for m in msgs:
                out.append(fn(m))

        t = C.timed(loop)
        if out[0] != {"status": "ok", "id": msgs[0]["id"]}:
            raise AssertionError(f"duplicate got {out[0]!r}")
        return t


def profile(bench: Bench, n: int, top: int = 10) -> tuple[str, list[dict[str, Any]]]:
    fn = idempotent(MemoryStore(), key="id", namespace="bench.overhead")(handler)
    msgs = bench.messages(n)

    def loop() -> None:
        for m in msgs:
            fn(m)

    return C.profile_calls(loop, n, top=top, title="fresh keys, default settings: ")


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--profile", action="store_true",
                        help="also print a cProfile of the fresh-key path")
        ap.add_argument("--baseline", metavar="REV", default=None,
                        help="also run the package of git revision REV, interleaved")

    args = C.parse_args(__doc__.split("\n")[0], rounds=7, n=20_000, quick_n=2_000, extra=extra)
    bench = Bench()
    variants: dict[str, Callable[[int], tuple[float, float]]] = {
        "bare": bench.bare,
        "idem, new key": bench.fresh(),
        "idem, duplicate": bench.duplicate,
        "idem, new key, fingerprint=False": bench.fresh(fingerprint=False),
        "idem, new key, heartbeat=False": bench.fresh(heartbeat=False),
        "idem, new key, both off": bench.fresh(fingerprint=False, heartbeat=False),
    }
    if args.baseline:
        old = Bench(load_baseline(args.baseline))
        variants["baseline: idem, new key"] = old.fresh()
        variants["baseline: idem, duplicate"] = old.duplicate
    res = C.interleave(variants, rounds=args.rounds, n=args.n, baseline="bare", args=args)
    bare = res["bare"]
    overhead: dict[str, float] = {}
    rows = []
    for name, r in res.items():
        diffs = [(v - b) / args.n * 1e6 for v, b in zip(r.seconds, bare.seconds, strict=True)]
        overhead[name] = statistics.median(diffs)
        rows.append([
            name, f"{r.per_op_us:.2f}", f"{overhead[name]:.2f}" if name != "bare" else "-",
            f"{r.gc_per_op_us:.2f}",
            C.fmt_rate(r.per_s), f"{r.per_op_us / bare.per_op_us:.1f}x" if name != "bare" else "1x",
        ])
    targets = []
    lines = []
    if args.baseline:
        for name in ("idem, new key", "idem, duplicate"):
            # per round: the baseline's overhead minus ours, both from the same round
            saved = [(b - o) / args.n * 1e6 for o, b in zip(
                res[name].seconds, res[f"baseline: {name}"].seconds, strict=True)]
            lines.append(f"{name}: overhead {overhead[f'baseline: {name}']:.2f} µs at "
                         f"{args.baseline} -> {overhead[name]:.2f} µs; saved per round: median "
                         f"{statistics.median(saved):.2f}, range {min(saved):.2f} to "
                         f"{max(saved):.2f} µs")
    for name in ("idem, new key", "idem, duplicate"):
        line, t = C.target_line(f"overhead µs/call, {name}", overhead[name], TARGET_US,
                                higher_is_better=False)
        lines.append(line)
        targets.append(t)
    text = "\n".join([
        f"bench_overhead ({C.git_describe()}): MemoryStore, lease mode, "
        f"{args.n:,} calls per variant per round, "
        f"{args.rounds} interleaved rounds, medians",
        C.table(["variant", "µs/call", "overhead µs", "of which GC µs", "calls/s",
                 "time vs bare"], rows),
        *lines,
    ])
    prof_rows: list[dict[str, Any]] = []
    if args.profile:
        ptext, prof_rows = profile(bench, min(args.n, 20_000))
        text += "\n\n" + ptext
    doc = {
        "benchmark": "overhead", "rounds": args.rounds, "calls_per_round": args.n,
        "results": [{**r.as_dict(), "overhead_us": overhead[k]} for k, r in res.items()],
        "targets": targets, "profile_idempotent_top": prof_rows,
    }
    C.report(args, doc, text)


if __name__ == "__main__":
    main()
