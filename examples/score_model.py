#!/usr/bin/env python3
"""Score raw response embeddings with a reward head exported by armd (no armd code needed).

armd writes into `export.dir`:
  model.json         metadata: version, labels_applied, scaling, bias, scaler statistics, log_det, ...,
                     and `npy_file`, the weights written with it (model.json is replaced atomically after
                     that file exists, so reading model.json first, then the file it names, never mixes
                     two versions)
  model-v<N>.npy     float64 [dim]: raw-space weights w (scalings `none`, `standardize`) or θ (`l2`,
                     `standardize+l2`); the newest three versions are kept
  model.npy          a copy of the newest weights (may be one export ahead of model.json)

Usage:
  python3 examples/score_model.py --model-dir /var/lib/armd/models --embeddings emb.npy [--out rewards.npy]

`emb.npy` is float32/float64 [n, dim] of embeddings exactly as they arrive on the responses topic.
"""
import argparse
import json
import os
import sys

import numpy as np


def load_reward_model(model_dir):
    """Returns (score, meta): score(X [n, dim]) -> rewards [n]."""
    with open(os.path.join(model_dir, "model.json")) as f:
        meta = json.load(f)
    # The weights written with this metadata (older armd versions wrote only model.npy).
    vec = np.load(os.path.join(model_dir, meta.get("npy_file", "model.npy")))
    scaling = meta["scaling"]
    if vec.shape != (meta["dim"],):
        raise ValueError(f"model.npy has shape {vec.shape}, model.json says dim {meta['dim']}")

    if scaling in ("none", "standardize"):
        bias = float(meta.get("bias", 0.0))

        def score(x):
            return np.asarray(x, dtype=np.float64) @ vec + bias

        return score, meta

    if scaling in ("l2", "standardize+l2"):
        # Not linear in x: apply the frozen scaler, then θ.
        mean = np.asarray(meta.get("scaler_mean") or np.zeros(meta["dim"]), dtype=np.float64)
        inv_std = np.asarray(meta.get("scaler_inv_std") or np.ones(meta["dim"]), dtype=np.float64)

        def score(x):
            z = np.asarray(x, dtype=np.float64)
            if scaling == "standardize+l2":
                z = (z - mean) * inv_std
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            z = np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)
            return z @ vec

        return score, meta

    raise ValueError(f"unknown scaling {scaling!r} in model.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--embeddings", required=True, help=".npy [n, dim]")
    ap.add_argument("--out", help="write rewards to this .npy (default: print one per line)")
    args = ap.parse_args()
    score, meta = load_reward_model(args.model_dir)
    x = np.load(args.embeddings)
    if x.ndim != 2 or x.shape[1] != meta["dim"]:
        sys.exit(f"error: {args.embeddings} has shape {x.shape}, the model expects [n, {meta['dim']}]")
    r = score(x)
    if args.out:
        np.save(args.out, r)
    else:
        for v in r:
            print(repr(float(v)))


if __name__ == "__main__":
    main()
