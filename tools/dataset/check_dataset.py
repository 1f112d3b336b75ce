#!/usr/bin/env python3
"""Sanity and learnability check for a dataset written by build_dataset.py.

Checks shapes, dtypes, finiteness and >= 2 responses per prompt, then fits a ridge regression
of reward on embeddings using a random 80% of the prompts and reports, on the other 20%:
test R^2 and mean per-prompt Spearman correlation (prompts with constant reward are skipped).
Exits non-zero if a sanity check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--update-meta", action="store_true",
                    help="record the result in DIR/meta.json under check.seed<SEED> (arrays untouched)")
    args = ap.parse_args()

    emb = np.load(args.dir / "embeddings.npy")
    reward = np.load(args.dir / "reward.npy")
    prompt = np.load(args.dir / "prompt.npy")
    meta = json.loads((args.dir / "meta.json").read_text())
    n, d = emb.shape
    counts = np.bincount(prompt)
    problems = []
    if emb.dtype != np.float32:
        problems.append(f"embeddings dtype {emb.dtype}")
    if reward.dtype not in (np.float64, np.float32):
        problems.append(f"reward dtype {reward.dtype}")
    if prompt.dtype != np.int64:
        problems.append(f"prompt dtype {prompt.dtype}")
    if reward.shape != (n,) or prompt.shape != (n,):
        problems.append(f"shapes {emb.shape} {reward.shape} {prompt.shape}")
    if not (np.isfinite(emb).all() and np.isfinite(reward).all()):
        problems.append("NaN/inf present")
    if prompt.min() != 0 or (counts < 2).any():
        problems.append("prompt ids not 0..P-1 with >= 2 responses each")
    if meta.get("n") != n or meta.get("d") != d or meta.get("n_prompts") != len(counts):
        problems.append("meta.json n/d/n_prompts disagree with the arrays")

    print(f"embeddings {emb.shape} {emb.dtype} ({(args.dir / 'embeddings.npy').stat().st_size / 1e6:.1f} MB)")
    print(f"reward     {reward.shape} {reward.dtype} mean={reward.mean():.3f} std={reward.std():.3f}")
    print(f"prompt     {prompt.shape} {prompt.dtype} prompts={len(counts)} "
          f"responses/prompt min={counts.min()} max={counts.max()} mean={counts.mean():.2f}")
    print(f"model      {meta['sources']['embedding_model']['name']} d={d}")
    if problems:
        print("SANITY FAILED: " + "; ".join(problems))
        return 1
    print("sanity     ok (dtypes, shapes, finite, >= 2 responses per prompt)")

    from scipy.stats import spearmanr
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(args.seed)
    P = len(counts)
    test_p = rng.permutation(P)[: int(round(args.test_frac * P))]
    is_test = np.isin(prompt, test_p)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 25)))
    model.fit(emb[~is_test], reward[~is_test])
    pred = model.predict(emb[is_test])
    y = reward[is_test]
    r2 = 1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    rhos = []
    for p in test_p:
        m = prompt[is_test] == p
        if np.ptp(y[m]) > 0:
            rhos.append(spearmanr(pred[m], y[m]).statistic)
    train_r2 = model.score(emb[~is_test], reward[~is_test])
    alpha = model[-1].alpha_
    print(f"ridge      alpha={alpha:.3g} train R2={train_r2:.3f} | held-out {len(test_p)} prompts "
          f"({is_test.sum()} responses): test R2={r2:.3f}, mean per-prompt Spearman="
          f"{np.nanmean(rhos):.3f} (over {len(rhos)} prompts)")
    if args.update_meta:
        import sklearn

        meta.setdefault("check", {})[f"seed{args.seed}"] = {
            "tool": f"tools/dataset/check_dataset.py --seed {args.seed} --test-frac {args.test_frac} "
                    f"(StandardScaler + RidgeCV, scikit-learn {sklearn.__version__})",
            "alpha": float(alpha), "train_r2": round(float(train_r2), 4),
            "test_r2": round(float(r2), 4), "mean_per_prompt_spearman": round(float(np.nanmean(rhos)), 4),
            "test_prompts": int(len(test_p)), "spearman_prompts": len(rhos),
        }
        (args.dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
