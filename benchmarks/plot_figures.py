"""Draw the measured ratios of benchmarks/figures.json as SVG bar charts into docs/img/.

    .venv/bin/python benchmarks/plot_figures.py           # write docs/img/*.svg
    .venv/bin/python benchmarks/plot_figures.py --check   # exit 1 if a chart is out of date

Plain SVG, no plotting library: one horizontal bar per figure, a line at 1.0 (the baseline
measured in the same run) and a tick at the target where there is one. The figures come from
the benchmark runs named in each bar's ``command``; when a benchmark is re-run, update
figures.json and run this script (tests/test_docs.py checks the charts match the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "benchmarks" / "figures.json"
OUT = ROOT / "docs" / "img"

LABEL_W, BAR_W, ROW_H, TOP, PAD = 390, 360, 26, 54, 12


def _scale(bars: list[dict[str, Any]]) -> float:
    top = max(max(b["value"], b.get("target", 0.0)) for b in bars)
    return max(1.0, top) * 1.08


def render(chart: dict[str, Any], measured: str) -> str:
    bars = chart["bars"]
    scale = _scale(bars)
    width = LABEL_W + BAR_W + 90
    height = TOP + ROW_H * len(bars) + 46

    def x(value: float) -> float:
        return LABEL_W + BAR_W * value / scale

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{PAD}" y="22" font-size="14" font-weight="bold">{escape(chart["title"])}</text>',
        f'<text x="{PAD}" y="40" fill="#555">measured {escape(measured.split(",")[0])}; '
        f'bar = measured ratio, | = target</text>',
    ]
    for i, bar in enumerate(bars):
        y = TOP + i * ROW_H
        value = float(bar["value"])
        target = bar.get("target")
        met = target is None or value >= target
        colour = "#3f51b5" if met else "#e65100"
        out.append(f'<text x="{LABEL_W - 8}" y="{y + 15}" text-anchor="end">'
                   f'{escape(bar["label"])}</text>')
        out.append(f'<rect x="{LABEL_W}" y="{y + 4}" width="{x(value) - LABEL_W:.1f}" '
                   f'height="{ROW_H - 10}" fill="{colour}"><title>{escape(bar["command"])}'
                   f'</title></rect>')
        note = f"{value:.2f}" + ("" if target is None else
                                 f" (target {target:.2f}{'' if met else ', missed'})")
        out.append(f'<text x="{x(value) + 6:.1f}" y="{y + 15}">{escape(note)}</text>')
        if target is not None:
            out.append(f'<line x1="{x(target):.1f}" x2="{x(target):.1f}" y1="{y + 1}" '
                       f'y2="{y + ROW_H - 3}" stroke="black" stroke-width="2"/>')
    base = x(1.0)
    bottom = TOP + ROW_H * len(bars)
    out.append(f'<line x1="{base:.1f}" x2="{base:.1f}" y1="{TOP - 4}" y2="{bottom + 4}" '
               f'stroke="#888" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{base:.1f}" y="{bottom + 18}" text-anchor="middle" fill="#555">'
               f'1.0 = baseline</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with docs/img instead of writing")
    args = parser.parse_args(argv)
    data = json.loads(FIGURES.read_text())
    stale = []
    for chart in data["charts"]:
        svg = render(chart, data["measured"])
        path = OUT / chart["file"]
        if args.check:
            if not path.exists() or path.read_text() != svg:
                stale.append(str(path.relative_to(ROOT)))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(svg)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run benchmarks/plot_figures.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
