#!/usr/bin/env python3
"""Scale-out label-efficiency tables of docs/scale-out.md: one instance vs three shared vs three independent.

Reads <root>/<dataset>/{one,shared,independent}/points.csv, written by run_scale_out_report.sh (three
`armd simulate` runs per dataset, identical but for --instances/--learners), and prints per dataset the
held-out 1 − Spearman at 150/450/850/1,250 labels (seed mean ± sd), the paired differences to one instance,
and the same differences averaged over all 13 evaluated budgets. Standard library only.

  python3 tools/report/scale_out_report.py out/scale-out [dataset ...] > tables.md
"""
import csv, statistics as st, sys
root = sys.argv[1]; budgets = [150, 450, 850, 1250]; paid = {}
rnd = lambda b: (b - 50) // 100
def load(path, metric):
    d = {}
    for r in csv.DictReader(open(path)):
        if r["metric"] == metric:
            d[(r["strategy"], int(r["seed"]), int(r["round"]))] = float(r["value"])
            paid[(path, r["strategy"], int(r["seed"]), int(r["round"]))] = int(r["labels"])
    return d
def ms(v): return f"{st.mean(v):.3f} ± {st.stdev(v):.3f}"
def dms(v): return f"{st.mean(v):+.3f} ± {st.stdev(v):.3f}"
for ds in sys.argv[2:] or ["realtext", "sentences-minilm", "qa-smollm2"]:
    one = load(f"{root}/{ds}/one/points.csv", "one_minus_spearman")
    sh = load(f"{root}/{ds}/shared/points.csv", "one_minus_spearman")
    ind = load(f"{root}/{ds}/independent/points.csv", "one_minus_spearman")
    indm = load(f"{root}/{ds}/independent/points.csv", "instance_mean_one_minus_spearman")
    seeds = sorted({k[1] for k in one})
    present = {k[0] for k in one}
    strategies = [s for s in ["greedy-dopt", "targeted-info", "random"] if s in present] + sorted(
        present - {"greedy-dopt", "targeted-info", "random"})
    short = sorted((p[0].split("/")[-2], p[1], p[2], v) for p, v in paid.items()
                   if p[0].startswith(f"{root}/{ds}/") and p[3] == 12 and v != 1250)
    print(f"\n#### {ds}\n\nseeds {seeds}; held-out 1 − Spearman, mean ± sd over seeds (lower is better); "
          "paired differences per seed, then mean ± sd\n")
    print("| strategy | labels | one instance | 3 shared | 3 independent (instance 0) | 3 independent (mean of 3 models) | shared − one | independent − one | independent (mean) − one |")
    print("|---|---:|---|---|---|---|---|---|---|")
    for s in strategies:
        for b in budgets:
            R = rnd(b)
            o = [one[(s, x, R)] for x in seeds]; h = [sh[(s, x, R)] for x in seeds]
            i = [ind[(s, x, R)] for x in seeds]; im = [indm[(s, x, R)] for x in seeds]
            print(f"| {s} | {b} | {ms(o)} | {ms(h)} | {ms(i)} | {ms(im)} | "
                  f"{dms([a - c for a, c in zip(h, o)])} | {dms([a - c for a, c in zip(i, o)])} | "
                  f"{dms([a - c for a, c in zip(im, o)])} |")
    if short:
        print("\nLabels paid after round 12 where short of 1,250 (arm, strategy, seed, labels): "
              + "; ".join(f"{a} {b} {c}: {d}" for a, b, c, d in short))
    # Mean over all 13 evaluated budgets (area under the curve), paired.
    print("\nMean over all 13 budgets (50 … 1,250 labels), paired difference to one instance:\n")
    print("| strategy | one | shared − one | independent − one | shared − one > 0 in how many seeds |")
    print("|---|---|---|---|---|")
    for s in strategies:
        bs = sorted({k[2] for k in one if k[0] == s})  # rounds 0..12
        auc = lambda d, x: st.mean(d[(s, x, b)] for b in bs)
        o = [auc(one, x) for x in seeds]; h = [auc(sh, x) for x in seeds]; i = [auc(ind, x) for x in seeds]
        dh = [a - c for a, c in zip(h, o)]
        print(f"| {s} | {ms(o)} | {dms(dh)} | {dms([a - c for a, c in zip(i, o)])} | {sum(v > 0 for v in dh)}/{len(dh)} |")
