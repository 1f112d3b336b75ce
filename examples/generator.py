#!/usr/bin/env python3
"""Synthetic response generator for trying armd: produces armd.response.v1 messages to the responses topic.

Each prompt gets --per-prompt responses with random embeddings (offset and uneven scales, like an LLM's
hidden states) and a short text in the metadata. The "golden" reward that the simulated annotator
(examples/labeler.py --oracle-weights) answers with is a linear function of the embedding; its weights
are written to --golden (or read from it when the file exists), so a generator and an annotator started
separately agree on it.

Example (the compose stack's "demo" profile runs exactly this):
  python3 examples/generator.py --brokers kafka:9092 --dim 768 --golden /shared/golden.npy --rate 20
"""

import argparse
import base64
import json
import os
import sys
import time

import numpy as np
from confluent_kafka import Producer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--topic", default="armd.responses")
    ap.add_argument("--dim", type=int, default=768, help="embedding dimension (armd's model.dim)")
    ap.add_argument("--per-prompt", type=int, default=4, help="responses per prompt")
    ap.add_argument("--rate", type=float, default=20.0, help="responses per second (0: as fast as possible)")
    ap.add_argument("--max-responses", type=int, default=0, help="stop after this many (0: run forever)")
    ap.add_argument("--golden", default="golden.npy", help="golden reward weights (.npy), created if missing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.dim < 1 or args.per_prompt < 2:
        ap.error("--dim must be >= 1 and --per-prompt >= 2")

    rng = np.random.default_rng(args.seed)
    if os.path.exists(args.golden):
        golden = np.load(args.golden)
        if golden.shape != (args.dim,):
            sys.exit(f"{args.golden} has shape {golden.shape}, expected ({args.dim},)")
    else:
        golden = rng.normal(size=args.dim) / np.sqrt(args.dim)
        os.makedirs(os.path.dirname(os.path.abspath(args.golden)), exist_ok=True)
        tmp = args.golden + ".tmp.npy"
        np.save(tmp, golden)
        os.replace(tmp, args.golden)
    offset = rng.normal(size=args.dim) * 2.0
    scale = np.exp(rng.normal(size=args.dim) * 0.5)

    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
    sent, prompt = 0, 0
    started = time.monotonic()
    while args.max_responses == 0 or sent < args.max_responses:
        prompt += 1
        prompt_id = f"synthetic-{args.seed}-{prompt}"
        for r in range(args.per_prompt):
            x = (offset + scale * rng.normal(size=args.dim)).astype(np.float32)
            msg = {
                "schema": "armd.response.v1",
                "prompt_id": prompt_id,
                "response_id": f"{prompt_id}-r{r}",
                "embedding_b64": base64.b64encode(x.tobytes()).decode(),
                "metadata": {
                    "prompt": f"Synthetic prompt #{prompt}",
                    "text": f"Synthetic response {r} to prompt #{prompt} (golden reward {float(x @ golden):+.2f})",
                },
            }
            producer.produce(args.topic, key=prompt_id, value=json.dumps(msg).encode())
            sent += 1
            producer.poll(0)
            if args.rate > 0:
                delay = started + sent / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if args.max_responses and sent >= args.max_responses:
                break
    producer.flush(30)
    print(json.dumps({"responses_sent": sent, "prompts": prompt}))


if __name__ == "__main__":
    main()
