#!/usr/bin/env python3
"""Fair strategy report from `armd simulate` runs: every strategy against random at its best fixed prior.

Reads the `points.csv` of
  * one run with the strategies to compare (normally with `--prior-precision auto`), and
  * one run of `random` per fixed prior precision λ₀ of a grid (same dataset, seeds and protocol),
and prints a Markdown section: the tuned baseline (random at the λ₀ whose curve has the lowest mean
1 − Spearman over all evaluated budgets, chosen in hindsight), each strategy's 1 − Spearman at several
budgets (seed mean ± sd), its paired difference to the tuned baseline, the labels it needs to reach the
baseline's value at half and at all of the baseline's budget, the area under the curve and Best-of-10.

Standard library only (csv, statistics), so it runs anywhere Python 3.8+ does.

  python3 tools/report/strategy_report.py --name realtext --runs out/rt-auto \
      --random-grid out/rt-random-256 out/rt-random-1024 ... > section.md
"""
import argparse
import csv
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(run_dir):
    """{(strategy, seed, labels): {metric: value}} and the prior precision per (strategy, seed, labels)."""
    pts = defaultdict(dict)
    with open(Path(run_dir) / "points.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["strategy"], int(row["seed"]), int(row["labels"]))
            pts[key][row["metric"]] = float(row["value"])
    return pts


def curves(pts, metric):
    """{strategy: {labels: {seed: value}}}."""
    out = defaultdict(lambda: defaultdict(dict))
    for (strategy, seed, labels), m in pts.items():
        if metric in m:
            out[strategy][labels][seed] = m[metric]
    return out


def mean_sd(values):
    v = list(values)
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(m, s=None, digits=3):
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def area(curve, budgets):
    """Mean of the seed-mean curve over the budgets (a normalised area under the curve)."""
    return statistics.fmean(mean_sd(curve[b].values())[0] for b in budgets)


def labels_to_reach(curve, budgets, target):
    """First budget whose seed mean is at or below `target` (None: never)."""
    for b in budgets:
        if mean_sd(curve[b].values())[0] <= target + 1e-12:
            return b
    return None


BON = "best_of_10"
COLOURS = ["#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def svg_plot(path, title, ylabel, series, budgets):
    """A plain SVG line chart of seed-mean curves with ±1 sd bands: series = [(label, {labels: {seed: v}})]."""
    w, h, left, right, top, bottom = 760, 420, 70, 230, 40, 50
    pts = [(b, mean_sd(c[b].values())) for _, c in series for b in budgets if b in c]
    lo = min(m - s for _, (m, s) in pts)
    hi = max(m + s for _, (m, s) in pts)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    x0, x1 = budgets[0], budgets[-1]
    sx = lambda b: left + (b - x0) / (x1 - x0 or 1) * (w - left - right)
    sy = lambda v: top + (hi - v) / (hi - lo) * (h - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
           f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">labels</text>',
           f'<text x="16" y="{(top + h - bottom) / 2}" text-anchor="middle" transform="rotate(-90 16 {(top + h - bottom) / 2})">{ylabel}</text>']
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        out.append(f'<line x1="{left - 4}" y1="{sy(v):.1f}" x2="{w - right}" y2="{sy(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    for b in budgets[:: max(1, len(budgets) // 6)] + [budgets[-1]]:
        out.append(f'<text x="{sx(b):.1f}" y="{h - bottom + 16}" text-anchor="middle">{b}</text>')
    for i, (label, c) in enumerate(series):
        col = COLOURS[i % len(COLOURS)]
        ms = [(b, *mean_sd(c[b].values())) for b in budgets if b in c]
        band = [(sx(b), sy(m + s)) for b, m, s in ms] + [(sx(b), sy(m - s)) for b, m, s in reversed(ms)]
        out.append('<polygon points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in band) +
                   f'" fill="{col}" fill-opacity="0.08" stroke="none"/>')
        dash = ' stroke-dasharray="6 4"' if i == 0 else ""
        out.append('<polyline points="' + " ".join(f"{sx(b):.1f},{sy(m):.1f}" for b, m, _ in ms) +
                   f'" fill="none" stroke="{col}" stroke-width="2"{dash}/>')
        y = top + 18 * i + 10
        out.append(f'<line x1="{w - right + 12}" y1="{y}" x2="{w - right + 36}" y2="{y}" stroke="{col}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{w - right + 42}" y="{y + 4}">{label}</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="dataset name for the headings")
    ap.add_argument("--runs", nargs="+", required=True, help="run directories of the compared strategies")
    ap.add_argument("--random-grid", nargs="+", required=True,
                    help="run directories of random at fixed priors (the λ₀ is read from points.csv)")
    ap.add_argument("--budgets", type=int, nargs="*", help="budgets for the table (default: 4 spread out)")
    ap.add_argument("--plot-dir", help="also write <name>-spearman.svg and <name>-best-of-n.svg here")
    args = ap.parse_args()

    metric = "one_minus_spearman"
    # Best-of-10 where prompts have 10 responses, else Best-of-5.
    global BON
    first = load(args.random_grid[0])
    BON = "best_of_10" if any("best_of_10" in v for v in first.values()) else "best_of_5"
    bon_label = BON.replace("best_of_", "Best-of-")
    # The compared strategies (later runs override earlier ones for the same strategy name).
    strategies = {}
    bon = {}
    prior = {}
    for r in args.runs:
        pts = load(r)
        for s, c in curves(pts, metric).items():
            strategies[s] = c
        for s, c in curves(pts, BON).items():
            bon[s] = c
        for s, c in curves(pts, "prior_precision").items():
            prior[s] = c
    # The grid: random's curve per λ₀.
    grid = {}
    grid_bon = {}
    for r in args.random_grid:
        pts = load(r)
        lam = {v["prior_precision"] for v in pts.values() if "prior_precision" in v}
        if len(lam) != 1:
            sys.exit(f"{r}: expected one fixed prior precision, found {sorted(lam)}")
        lam = lam.pop()
        grid[lam] = curves(pts, metric)["random"]
        grid_bon[lam] = curves(pts, BON)["random"]

    budgets = sorted(next(iter(grid.values())).keys())
    budgets = [b for b in budgets if b > budgets[0]]  # after the seed labels
    seeds = sorted(next(iter(grid.values()))[budgets[-1]].keys())
    for s, c in strategies.items():
        if sorted(c.keys())[1:] != budgets:
            sys.exit(f"strategy {s}: budgets {sorted(c.keys())} differ from the grid's")
    best_lam = min(grid, key=lambda l: area(grid[l], budgets))
    base = grid[best_lam]
    full = budgets[-1]
    half = min(budgets, key=lambda b: abs(b - full / 2))
    show = args.budgets or sorted({budgets[0], half, budgets[(len(budgets) * 3) // 4], full})

    print(f"### {args.name}\n")
    print(f"Seeds {seeds}. Tuned baseline: `random` at λ₀ = {best_lam:g}, the grid value with the lowest "
          f"mean 1 − Spearman over all budgets (chosen in hindsight). Grid (area under random's curve):\n")
    print("| λ₀ | " + " | ".join(f"{l:g}" for l in sorted(grid)) + " |")
    print("|---|" + "---|" * len(grid))
    print("| random, mean 1−Spearman over budgets | " + " | ".join(fmt(area(grid[l], budgets)) for l in sorted(grid)) + " |")
    print("| random, final | " + " | ".join(fmt(mean_sd(grid[l][full].values())[0]) for l in sorted(grid)) + " |")
    print()

    rows = [(f"random, tuned λ₀ = {best_lam:g}", base, grid_bon[best_lam], None)]
    for s in sorted(strategies, key=lambda s: (s != "random", s)):
        label = f"{s} (auto prior)" if s in prior else s
        rows.append((label, strategies[s], bon.get(s), prior.get(s)))

    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        all_b = sorted(base.keys())
        svg_plot(Path(args.plot_dir) / f"{args.name}-spearman.svg",
                 f"{args.name}: 1 − Spearman on held-out prompts (mean ± sd over seeds)",
                 "1 − Spearman (lower is better)", [(l, c) for l, c, _, _ in rows], all_b)
        svg_plot(Path(args.plot_dir) / f"{args.name}-best-of-n.svg",
                 f"{args.name}: {bon_label} golden reward (mean ± sd over seeds)",
                 f"{bon_label} (higher is better)", [(l, cb) for l, _, cb, _ in rows if cb], all_b)
        # Links relative to docs/, where the report lives.
        rel = os.path.relpath(args.plot_dir, "docs")
        print(f"![{args.name} 1 − Spearman]({rel}/{args.name}-spearman.svg)\n")
        print(f"![{args.name} {bon_label}]({rel}/{args.name}-best-of-n.svg)\n")

    head = "| strategy | " + " | ".join(f"1−ρ @ {b}" for b in show) + \
        " | mean over budgets | labels to reach tuned random @ " + f"{half} | @ {full}" + \
        f" | {bon_label} @ {full} | final λ₀ |"
    print(head)
    print("|---" * (len(show) + 6) + "|")
    t_half = mean_sd(base[half].values())[0]
    t_full = mean_sd(base[full].values())[0]
    for label, c, cb, pr in rows:
        cells = [fmt(*mean_sd(c[b].values())) for b in show]
        reach = []
        for t, b in [(t_half, half), (t_full, full)]:
            r = labels_to_reach(c, budgets, t)
            reach.append("not reached" if r is None else f"{r} ({100 * r / b:.0f} %)")
        bo = fmt(*mean_sd(cb[full].values()), digits=2) if cb else "–"
        lam = "–"
        if pr and full in pr:
            lam = f"{statistics.fmean(pr[full].values()):.0f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {fmt(area(c, budgets))} | {reach[0]} | {reach[1]} | {bo} | {lam} |")
    print()

    # Paired differences against the tuned baseline, per budget: mean and sd over seeds.
    print(f"Paired difference to tuned random (strategy − baseline, 1 − Spearman; negative is better), "
          f"mean ± sd over seeds, and whether the strategy is ever worse than the baseline by more than "
          f"one sd of the baseline:\n")
    print("| strategy | " + " | ".join(f"@ {b}" for b in show) + " | worst budget | worse by > 1 sd anywhere? |")
    print("|---" * (len(show) + 3) + "|")
    for label, c, _, _ in rows[1:]:
        diffs = {b: [c[b][s] - base[b][s] for s in seeds if s in c[b] and s in base[b]] for b in budgets}
        cells = [fmt(*mean_sd(diffs[b])) for b in show]
        worst = max(budgets, key=lambda b: mean_sd(diffs[b])[0])
        worse = [b for b in budgets
                 if mean_sd(c[b].values())[0] - mean_sd(base[b].values())[0] > mean_sd(base[b].values())[1]]
        print(f"| {label} | " + " | ".join(cells) +
              f" | {worst} ({fmt(mean_sd(diffs[worst])[0])}) | {'yes: ' + ', '.join(map(str, worse)) if worse else 'no'} |")
    print()


if __name__ == "__main__":
    main()
