#!/usr/bin/env python3
"""Summarise an interleaved run of the ingest bench (ab-run.sh / queue-run.sh output).

Per build (the name after '===') and case, medians over the repeats whose steal is at most MAX_STEAL %:
raw msgs/s; for each armd configuration that ran, its msgs/s, ratio to raw and CPU us/msg; and the
per-thread CPU us/msg of the last armd configuration of the row (busy share x its span / N, from the
'threads busy' line printed just before the row).
Usage: ab-summary.py FILE [MAX_STEAL]
"""
import math
import re
import statistics as st
import sys

path = sys.argv[1]
max_steal = float(sys.argv[2]) if len(sys.argv) > 2 else 100.0
rows, build, threads = {}, None, None
for line in open(path):
    m = re.match(r"=== (\S+) alternation", line)
    if m:
        build = m.group(1)
        continue
    if "threads busy" in line:
        threads = {t: float(p) / 100 for t, p in re.findall(r"(\S+) (\d+)% \(", line)}
        continue
    if line.startswith("| ") and build:
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        n, raw, steal = int(c[2]), float(c[5]), float(c[13])
        cpu = [float(x) for x in c[11].split("/")]
        # The per-thread line belongs to the armd configuration that ran last (no-rounds, or default
        # when only that one ran).
        spans = [float(x) for x in c[12].split("/")]
        span_nr = spans[2] if not math.isnan(spans[2]) else spans[1]
        if steal <= max_steal:
            per = {t: b * span_nr * 1e6 / n for t, b in (threads or {}).items()}
            rows.setdefault((int(c[0]), build), []).append(
                dict(raw=raw, cpu_raw=cpu[0], d_rate=float(c[7]), d_ratio=float(c[8]), d_cpu=cpu[1],
                     nr_rate=float(c[9]), nr_ratio=float(c[10]), nr_cpu=cpu[2], per=per))
        threads = None


def med(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return st.median(xs) if xs else float("nan")


for (d, b), rs in sorted(rows.items()):
    out = f"d={d:>4} {b:>4} n={len(rs):2d} raw {med([r['raw'] for r in rs]):7.0f} ({med([r['cpu_raw'] for r in rs]):.1f} us/msg)"
    for cfg, key in (("default", "d"), ("no-rounds", "nr")):
        ratio = med([r[key + "_ratio"] for r in rs])
        if not math.isnan(ratio):
            out += (f" | {cfg} {med([r[key + '_rate'] for r in rs]):7.0f} ratio {ratio:.2f}"
                    f" ({med([r[key + '_cpu'] for r in rs]):.1f} us/msg)")
    names = sorted({t for r in rs for t in r["per"]})
    if names:
        out += " | threads us/msg: " + ", ".join(
            f"{t} {med([r['per'][t] for r in rs if t in r['per']]):.2f}" for t in names)
    print(out)
