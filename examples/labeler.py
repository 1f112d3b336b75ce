#!/usr/bin/env python3
"""Example armd labeler: reads comparison requests, writes labels (confluent-kafka + numpy).

Two modes:

* interactive (default): prints each request's two responses (ids and metadata) and asks
  "a", "b" or "tie" on stdin;
* simulated annotator (--oracle-weights golden.npy): a linear "golden" reward r(x) = x @ w on the raw
  embeddings the request carries, and a Bernoulli answer with P(a wins) = sigmoid(beta * (r(a) - r(b))),
  as in the paper's evaluation protocol. Useful for demos and tests.

Messages (see the armd README):
  request (in)  {"schema": "armd.request.v1", "request_id": ..., "a": {"prompt_id", "response_id",
                 "metadata", "embedding_b64"}, "b": {...}, "expires_at_ms": ..., ...}
  label  (out)  {"schema": "armd.label.v1", "request_id": ..., "outcome": "a" | "b" | "tie" | p,
                 "annotator_id": ...}

Example:
  python3 examples/labeler.py --brokers 127.0.0.1:9092 --oracle-weights golden.npy --max-labels 100
"""

import argparse
import base64
import json
import math
import sys
import time

import numpy as np
from confluent_kafka import Consumer, KafkaError, Producer


def embedding(side):
    """Raw embedding of one side of a request (base64 of little-endian float32)."""
    return np.frombuffer(base64.b64decode(side["embedding_b64"]), dtype="<f4").astype(np.float64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", required=True, help="bootstrap servers, host:port[,host:port]")
    ap.add_argument("--requests-topic", default="armd.requests")
    ap.add_argument("--labels-topic", default="armd.labels")
    ap.add_argument("--group", default="armd-labeler", help="consumer group of this labeler")
    ap.add_argument("--annotator-id", default=None, help="sent with every label (optional)")
    ap.add_argument("--oracle-weights", default=None,
                    help=".npy golden reward weights: answer automatically (simulated annotator)")
    ap.add_argument("--beta", type=float, default=1.0, help="oracle noise: P(a) = sigmoid(beta * gap)")
    ap.add_argument("--seed", type=int, default=0, help="oracle random seed")
    ap.add_argument("--max-labels", type=int, default=0, help="stop after this many labels (0: never)")
    ap.add_argument("--idle-exit", type=float, default=0.0,
                    help="stop after this many seconds without a request (0: never)")
    args = ap.parse_args(argv)

    weights = np.load(args.oracle_weights) if args.oracle_weights else None
    rng = np.random.default_rng(args.seed)
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
    })
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
    consumer.subscribe([args.requests_topic])
    sent = 0
    last_request = time.monotonic()
    try:
        while args.max_labels <= 0 or sent < args.max_labels:
            msg = consumer.poll(0.5)
            if msg is None:
                if args.idle_exit > 0 and time.monotonic() - last_request > args.idle_exit:
                    break
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    print(f"consumer error: {msg.error()}", file=sys.stderr)
                continue
            last_request = time.monotonic()
            try:
                req = json.loads(msg.value())
                if req.get("schema") != "armd.request.v1":
                    continue
            except (ValueError, TypeError):
                continue
            if weights is not None:
                gap = float(embedding(req["a"]) @ weights - embedding(req["b"]) @ weights)
                p_a = 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, args.beta * gap))))
                outcome = "a" if rng.random() < p_a else "b"
            else:
                print(f"\nrequest {req['request_id']} (predicted P(a) = {req['predicted_p']:.2f})")
                for name in ("a", "b"):
                    side = req[name]
                    print(f"  {name}: prompt {side['prompt_id']} response {side['response_id']} "
                          f"{json.dumps(side.get('metadata') or {})}")
                outcome = ""
                while outcome not in ("a", "b", "tie"):
                    outcome = input("which is better? [a/b/tie] ").strip().lower()
            label = {"schema": "armd.label.v1", "request_id": req["request_id"], "outcome": outcome}
            if args.annotator_id:
                label["annotator_id"] = args.annotator_id
            producer.produce(args.labels_topic, key=req["request_id"], value=json.dumps(label))
            producer.poll(0)
            sent += 1
    finally:
        producer.flush(30)
        consumer.close()
    print(json.dumps({"labels_sent": sent}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
