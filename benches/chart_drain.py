#!/usr/bin/env python3
"""Draws the reconnects per second on the remaining backend after a drain, from wsgate-bench `drain` records.

One run of each spread (the first by default, or --run N), as bars per
second from the drain call, side by side. The y axis is logarithmic, so that
an instant cut (thousands in one second) and a spread drain (tens a second)
both show; each bar's count is written above it.

Standard library only.

    python3 benches/chart_drain.py benches/results-drain.jsonl [-o chart.svg] [--run 1]
"""

import argparse
import json
import math
import sys
from xml.sax.saxutils import escape

COLORS = ["#2f6fd6", "#d9822b", "#2e9e5b", "#9b59b6"]


def load(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: skipped: {e}", file=sys.stderr)
                continue
            if r.get("scenario") == "drain" and r.get("drain"):
                records.append(r)
    return records


def pick(records, run):
    """One record per spread, the widest spread first."""
    by = {}
    for r in records:
        v = r.get("variant")
        if run is not None and r.get("run") != run:
            continue
        by.setdefault(v, r)
    return sorted(by.values(), key=lambda r: -r["drain"]["spread_s"])


def label(r):
    d = r["drain"]
    s = d["spread_s"]
    back = d.get("last_back_s")
    back = f"{back:.2f} s" if back is not None else "never"
    if s == 0:
        return (
            f"instant cut (spread 0 s), run {r['run']}: {d['b_upgrades']:,} reconnects, "
            f"the last client back after {back}"
        )
    return (
        f"spread {s:g} s, run {r['run']}: busiest second {d['peak_per_s']}, "
        f"median {d['median_per_s']:.0f}/s, the last client back after {back}"
    )


def chart(series, title):
    seconds = max(len(r["drain"]["per_s"]) for r in series)
    seconds = max(seconds, max(math.ceil(r["drain"]["spread_s"]) for r in series)) + 1
    top = max(max(r["drain"]["per_s"] or [1]) for r in series)
    decades = max(1, math.ceil(math.log10(max(top, 1) * 1.6)))
    slot = 10 * len(series) + 6
    left, right, top_pad, bottom = 70, 30, 70, 70 + 18 * len(series)
    plot_w = slot * seconds
    plot_h = 320
    w = max(left + plot_w + right, 760)
    h = top_pad + plot_h + bottom

    def y(v):
        v = max(v, 1)
        return top_pad + plot_h - math.log10(v) / decades * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="16">{escape(title)}</text>',
        f'<text x="{w / 2}" y="44" text-anchor="middle" fill="#555">'
        "upgrades (101s) answered by the remaining backend, per second after the drain call; "
        "log scale</text>",
    ]
    for k in range(decades + 1):
        v = 10**k
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e3e3e3"/>'
        )
        out.append(
            f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:,}</text>'
        )
    out.append(
        f'<text x="18" y="{top_pad + plot_h / 2}" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 18 {top_pad + plot_h / 2})">reconnects per second</text>'
    )
    for sec in range(seconds):
        x0 = left + sec * slot + 3
        for i, r in enumerate(series):
            per = r["drain"]["per_s"]
            v = per[sec] if sec < len(per) else 0
            if v <= 0:
                continue
            x = x0 + i * 10
            out.append(
                f'<rect x="{x}" y="{y(v):.1f}" width="9" height="{y(1) - y(v):.1f}" '
                f'fill="{COLORS[i % len(COLORS)]}"><title>second {sec}: {v}</title></rect>'
            )
            if v >= 1000 or i == 0 and (sec % 5 == 0):
                out.append(
                    f'<text x="{x + 4.5}" y="{y(v) - 4:.1f}" text-anchor="middle" font-size="10">{v:,}</text>'
                )
        if sec % 5 == 0:
            out.append(
                f'<text x="{x0 + slot / 2 - 3}" y="{top_pad + plot_h + 18}" text-anchor="middle">{sec}</text>'
            )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{top_pad + plot_h + 38}" text-anchor="middle" '
        f'fill="#333">seconds after the drain call</text>'
    )
    for i, r in enumerate(series):
        ly = top_pad + plot_h + 62 + 18 * i
        out.append(
            f'<rect x="{left}" y="{ly - 10}" width="12" height="12" fill="{COLORS[i % len(COLORS)]}"/>'
        )
        out.append(f'<text x="{left + 18}" y="{ly}">{escape(label(r))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results .jsonl written by wsgate-bench --scenario drain")
    ap.add_argument("-o", "--out", help="SVG to write (default: results path with .svg)")
    ap.add_argument("--run", type=int, help="which run of each spread (default: the first)")
    ap.add_argument("--title", help="chart title")
    args = ap.parse_args()
    series = pick(load(args.results), args.run)
    if not series:
        raise SystemExit(f"{args.results}: no drain records")
    clients = series[0]["drain"]["clients"]
    title = args.title or f"Draining one of two backends holding {clients:,} WebSockets"
    svg = chart(series, title)
    out = args.out or (args.results.rsplit(".", 1)[0] + ".svg")
    with open(out, "w", encoding="utf-8") as f:
        f.write(svg)
    print(out)


if __name__ == "__main__":
    main()
