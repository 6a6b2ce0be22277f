#!/usr/bin/env python3
"""Draws an SVG bar chart from a wsgate-bench results file (.jsonl).

For every scenario, each target's median over runs is divided by the
baseline's (wsgate by default, drawn as 1.0): bars above 1.0 mean the target
did better than wsgate. The metric is ops/s (or ops per proxy CPU-second with
--metric ops_per_cpu_s); for the idle scenarios it is memory efficiency, the
inverse of proxy RSS per connection.

Standard library only.

    python3 benches/chart.py results/bench-XXXX.jsonl [-o chart.svg]
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from xml.sax.saxutils import escape

SCENARIO_ORDER = [
    "echo64",
    "echo16k",
    "echo1m",
    "handshake",
    "idle",
    "http",
    # The TLS scenarios (--scenario tls, and h2_m10), when the file has them.
    "wss64",
    "wss16k",
    "wss1m",
    "tls_handshake",
    "tls_resume",
    "https",
    "h2",
    "h2_m10",
    "wss16k_tls_backend",
]
TARGET_ORDER = ["wsgate", "nginx", "haproxy", "direct"]
COLORS = {
    "wsgate": "#2f6fd6",
    "nginx": "#2e9e5b",
    "haproxy": "#d9822b",
    "direct": "#8c8c8c",
}
FALLBACK_COLORS = ["#9b59b6", "#c0392b", "#16a085", "#7f8c8d"]


def load(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: skipped: {e}", file=sys.stderr)
    return records


def value_of(record, scenario, metric):
    """Higher is better for every value returned."""
    if scenario in ("idle", "idle_tls", "idle_h2", "idle_tls_backend"):
        rss = record.get("rss_per_conn_bytes")
        return 1.0 / rss if rss and rss > 0 else None
    v = record.get(metric)
    return v if isinstance(v, (int, float)) and v > 0 else None


def medians(records, metric):
    by = defaultdict(list)
    for r in records:
        v = value_of(r, r.get("scenario"), metric)
        if v is not None:
            by[(r.get("scenario"), r.get("target"))].append(v)
    return {k: statistics.median(v) for k, v in by.items()}


def ordered(names, order):
    known = [n for n in order if n in names]
    return known + sorted(n for n in names if n not in order)


def chart(records, metric, baseline, title):
    med = medians(records, metric)
    scenarios = ordered({s for s, _ in med}, SCENARIO_ORDER)
    scenarios = [s for s in scenarios if (s, baseline) in med]
    targets = ordered({t for _, t in med}, TARGET_ORDER)
    if not scenarios:
        raise SystemExit(f"no scenario has a result for the baseline {baseline!r}")

    ratios = {}
    for s in scenarios:
        base = med[(s, baseline)]
        for t in targets:
            if (s, t) in med:
                ratios[(s, t)] = med[(s, t)] / base
    top = max(max(ratios.values()), 1.0) * 1.15

    width_per_group = 40 + 34 * len(targets)
    left, right, top_pad, bottom = 70, 30, 70, 80
    plot_w = width_per_group * len(scenarios)
    plot_h = 320
    w = left + plot_w + right
    h = top_pad + plot_h + bottom

    def y(v):
        return top_pad + plot_h - v / top * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="16">{escape(title)}</text>',
        f'<text x="{w / 2}" y="44" text-anchor="middle" fill="#555">'
        f"{escape(baseline)} = 1.0; higher is better"
        f"{' (idle: 1 / RSS per connection)' if 'idle' in scenarios else ''}</text>",
    ]
    # Grid and axis labels.
    step = 0.25 if top <= 2 else 0.5 if top <= 4 else 1.0 if top <= 8 else 2.0
    v = 0.0
    while v <= top:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'stroke="#e3e3e3"/>'
        )
        out.append(
            f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:.2f}</text>'
        )
        v += step
    out.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y(1.0):.1f}" y2="{y(1.0):.1f}" '
        f'stroke="#333" stroke-dasharray="5,4"/>'
    )
    out.append(
        f'<text x="18" y="{top_pad + plot_h / 2}" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 18 {top_pad + plot_h / 2})">ratio to {escape(baseline)}</text>'
    )

    for gi, s in enumerate(scenarios):
        gx = left + gi * width_per_group + 20
        for ti, t in enumerate(targets):
            r = ratios.get((s, t))
            if r is None:
                continue
            color = COLORS.get(t, FALLBACK_COLORS[ti % len(FALLBACK_COLORS)])
            x = gx + ti * 34
            out.append(
                f'<rect x="{x}" y="{y(r):.1f}" width="28" height="{y(0) - y(r):.1f}" fill="{color}">'
                f"<title>{escape(s)} {escape(t)}: {r:.2f}</title></rect>"
            )
            out.append(
                f'<text x="{x + 14}" y="{y(r) - 4:.1f}" text-anchor="middle" font-size="10">{r:.2f}</text>'
            )
        out.append(
            f'<text x="{gx + 17 * len(targets)}" y="{top_pad + plot_h + 20}" '
            f'text-anchor="middle">{escape(s)}</text>'
        )
    # Legend.
    lx = left
    for ti, t in enumerate(targets):
        color = COLORS.get(t, FALLBACK_COLORS[ti % len(FALLBACK_COLORS)])
        ly = top_pad + plot_h + 48
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly}">{escape(t)}</text>')
        lx += 30 + 8 * len(t) + 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results .jsonl written by wsgate-bench")
    ap.add_argument("-o", "--out", help="SVG to write (default: results path with .svg)")
    ap.add_argument("--metric", default="ops_per_s", choices=["ops_per_s", "ops_per_cpu_s"])
    ap.add_argument("--baseline", default="wsgate")
    ap.add_argument("--title", help="chart title")
    args = ap.parse_args()

    records = load(args.results)
    if not records:
        raise SystemExit(f"{args.results}: no records")
    threads = sorted({r.get("threads") for r in records if r.get("threads") is not None})
    label = "ops/s" if args.metric == "ops_per_s" else "ops per proxy CPU-second"
    title = args.title or (
        f"wsgate-bench: {label}, proxies with {'/'.join(map(str, threads))} thread(s)"
    )
    svg = chart(records, args.metric, args.baseline, title)
    out = args.out or (args.results.rsplit(".", 1)[0] + ".svg")
    with open(out, "w", encoding="utf-8") as f:
        f.write(svg)
    print(out)


if __name__ == "__main__":
    main()
