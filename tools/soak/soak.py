#!/usr/bin/env python3
"""Soak run: armd under steady load for a fixed time, with its memory and progress sampled over time.

What it does:
  1. starts a fresh Apache Kafka broker with .ci/kafka.sh (or uses --brokers) and creates unique topics;
  2. writes an armd config (the shipped defaults, small changes listed in the config it writes) and starts
     `armd run` (the release binary by default);
  3. produces synthetic responses at a steady rate (base64 embeddings, golden linear reward) and runs the
     example labeler (examples/labeler.py, simulated annotator) against the requests;
  4. every --sample-secs records armd's RSS (VmRSS, /proc/PID/status), its open file descriptors and key
     /metrics series into soak.csv;
  5. at the end stops armd with SIGTERM (must exit 0), writes summary.md and exits non-zero if armd died,
     exited uncleanly, or labels stopped being applied.

Memory is expected to plateau: the candidate pool, the in-flight table, the closed-id history and the label
store (consolidated into the prior beyond model.max_labels) are all bounded by configuration.

Example (the figure in docs/reliability.md):
  cargo build --release --locked
  python3 tools/soak/soak.py --minutes 12 --out soak-out
"""

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """
[daemon]
instance_id = "armd-soak"
[kafka]
brokers = "{brokers}"
group_id = "armd-soak-{stamp}"
[kafka.topics]
responses = "{p}.responses"
requests = "{p}.requests"
labels = "{p}.labels"
models = "{p}.models"
dead_letter = "{p}.dead-letter"
[model]
dim = {dim}
# Small enough that consolidation of the label store into the prior happens several times in the run.
max_labels = {max_labels}
refit_every = {refit_every}
[selection]
round_interval_ms = 500
[checkpoint]
path = "{state}/armd.ckpt"
[export]
dir = "{state}/model"
[http]
listen = "127.0.0.1:{port}"
[log]
level = "armd=info,warn"
"""

SERIES = [
    "armd_responses_received_total",
    "armd_requests_emitted_total",
    "armd_labels_applied_total",
    "armd_model_labels_applied",
    "armd_pool_responses",
    "armd_requests_in_flight",
    "armd_checkpoint_age_seconds",
    "armd_model_labels_stored",
    "armd_consolidations_total",
    "armd_refits_total",
]


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def scrape(base):
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name in SERIES:
            out[name] = float(value)
    return out


def ready(base):
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def proc_status(pid):
    """VmRSS, RssAnon, RssFile (MB) and the thread count of `pid`."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    mb = lambda k: int(fields[k][0]) / 1024.0 if k in fields else float("nan")
    return [mb("VmRSS"), mb("RssAnon"), mb("RssFile"), int(fields.get("Threads", ["0"])[0])]


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="steady-load duration")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rate", type=float, default=200.0, help="responses per second")
    ap.add_argument("--per-prompt", type=int, default=4, help="responses per prompt")
    ap.add_argument("--max-labels", type=int, default=4000)
    ap.add_argument("--refit-every", type=int, default=500)
    ap.add_argument("--sample-secs", type=float, default=10.0)
    ap.add_argument("--armd", default=None, help="armd binary (default: target/release/armd)")
    ap.add_argument("--brokers", default=None, help="use this broker instead of starting one")
    ap.add_argument("--out", default="soak-out")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    binary = args.armd or os.path.join(target, "release", "armd")
    if not os.path.exists(binary):
        sys.exit(f"soak: {binary} not found (cargo build --release first, or pass --armd)")

    broker_dir = None
    brokers = args.brokers
    if brokers is None:
        broker_dir = tempfile.mkdtemp(prefix="armd-soak-kafka.")
        subprocess.run(["bash", os.path.join(ROOT, ".ci/kafka.sh"), "fetch"], check=True)
        brokers = subprocess.run(["bash", os.path.join(ROOT, ".ci/kafka.sh"), "start", broker_dir],
                                 check=True, capture_output=True, text=True).stdout.strip()
    armd = labeler = None
    try:
        stamp = int(time.time())
        prefix = f"soak-{stamp}"
        admin = AdminClient({"bootstrap.servers": brokers})
        topics = [NewTopic(f"{prefix}.{t}", num_partitions=n, replication_factor=1)
                  for t, n in [("responses", 2), ("requests", 1), ("labels", 1), ("models", 1),
                               ("dead-letter", 1)]]
        for f in admin.create_topics(topics).values():
            f.result(timeout=30)

        state = os.path.abspath(os.path.join(args.out, "state"))
        os.makedirs(state, exist_ok=True)
        port = free_port()
        cfg_path = os.path.join(args.out, "armd.toml")
        with open(cfg_path, "w") as f:
            f.write(CONFIG.format(brokers=brokers, stamp=stamp, p=prefix, dim=args.dim, state=state,
                                  port=port, max_labels=args.max_labels,
                                  refit_every=args.refit_every))
        base = f"http://127.0.0.1:{port}"
        log = open(os.path.join(args.out, "armd.log"), "w")
        armd = subprocess.Popen([binary, "run", "--config", cfg_path], stdout=log, stderr=log)
        deadline = time.time() + 90
        while not ready(base):
            if armd.poll() is not None or time.time() > deadline:
                sys.exit(f"soak: armd did not become ready (see {args.out}/armd.log)")
            time.sleep(0.5)

        rng = np.random.default_rng(0)
        golden = rng.standard_normal(args.dim)
        golden_path = os.path.join(args.out, "golden.npy")
        np.save(golden_path, golden)
        labeler_log = open(os.path.join(args.out, "labeler.log"), "w")
        labeler = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "examples/labeler.py"), "--brokers", brokers,
             "--requests-topic", f"{prefix}.requests", "--labels-topic", f"{prefix}.labels",
             "--group", f"{prefix}-labeler", "--oracle-weights", golden_path],
            stdout=labeler_log, stderr=labeler_log)

        producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20})
        csv = open(os.path.join(args.out, "soak.csv"), "w")
        csv.write("elapsed_s,rss_mb,open_fds,rss_anon_mb,rss_file_mb,threads," + ",".join(SERIES) + "\n")
        start = time.time()
        end = start + args.minutes * 60
        next_sample = start
        sent = 0
        prompt = 0
        centre = None
        rows = []
        while time.time() < end:
            if armd.poll() is not None:
                sys.exit(f"soak: armd exited with {armd.returncode} after {time.time() - start:.0f} s")
            # Keep the send count on the schedule `rate * elapsed`.
            due = int((time.time() - start) * args.rate)
            while sent < due:
                if sent % args.per_prompt == 0:
                    prompt += 1
                    centre = rng.standard_normal(args.dim)
                x = (20.0 + 4.0 * (centre + rng.standard_normal(args.dim))).astype("<f4")
                msg = {"schema": "armd.response.v1", "prompt_id": f"p{prompt}",
                       "response_id": f"p{prompt}-r{sent}",
                       "embedding_b64": base64.b64encode(x.tobytes()).decode()}
                while True:
                    try:
                        producer.produce(f"{prefix}.responses", json.dumps(msg).encode(),
                                         key=f"p{prompt}")
                        break
                    except BufferError:
                        producer.poll(0.05)
                sent += 1
            producer.poll(0)
            if time.time() >= next_sample:
                m = scrape(base)
                st = proc_status(armd.pid)
                row = [time.time() - start, st[0], open_fds(armd.pid)] + st[1:] + \
                      [m.get(s, float("nan")) for s in SERIES]
                rows.append(row)
                csv.write(",".join(f"{v:.3f}" for v in row) + "\n")
                csv.flush()
                print(f"soak: {row[0]:6.0f} s  rss {row[1]:7.1f} MB (anon {st[1]:7.1f})  "
                      f"threads {st[3]:3d}  fds {row[2]:4.0f}  "
                      f"responses {m.get(SERIES[0], 0):8.0f}  labels {m.get(SERIES[3], 0):7.0f}  "
                      f"pool {m.get(SERIES[4], 0):5.0f}", flush=True)
                next_sample += args.sample_secs
            time.sleep(0.01)
        producer.flush(30)

        labeler.terminate()
        labeler.wait(30)
        armd.send_signal(signal.SIGTERM)
        code = armd.wait(120)
        summary = summarize(rows, args, code, binary)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(summary)
        print(summary)
        labels = [r[6 + SERIES.index("armd_model_labels_applied")] for r in rows]
        half = len(labels) // 2
        if code != 0 or len(labels) < 4 or not labels[-1] > labels[half]:
            sys.exit("soak: FAILED (armd exit code %s, labels %s → %s)" % (code, labels[half], labels[-1]))
    finally:
        for p in (labeler, armd):
            if p is not None and p.poll() is None:
                p.kill()
        if broker_dir is not None:
            subprocess.run(["bash", os.path.join(ROOT, ".ci/kafka.sh"), "stop", broker_dir])


def summarize(rows, args, code, binary):
    a = np.array(rows)
    t, rss = a[:, 0], a[:, 1]
    n = len(rows)
    q = max(1, n // 4)
    first_q, last_q = rss[q:2 * q].mean(), rss[-q:].mean()
    second = slice(n // 2, n)
    slope = np.polyfit(t[second], rss[second], 1)[0] * 60.0 if n >= 4 else float("nan")
    col = lambda s: a[:, 6 + SERIES.index(s)]
    lines = [
        "# armd soak summary",
        "",
        f"- binary: `{binary}`; {args.minutes:g} min at {args.rate:g} responses/s, d = {args.dim}, "
        f"max_labels = {args.max_labels}, refit_every = {args.refit_every}; {n} samples every "
        f"{args.sample_secs:g} s",
        f"- armd exit code after SIGTERM: {code}",
        f"- responses received: {col('armd_responses_received_total')[-1]:.0f}; requests emitted: "
        f"{col('armd_requests_emitted_total')[-1]:.0f}; labels applied: "
        f"{col('armd_model_labels_applied')[-1]:.0f}; consolidations: "
        f"{col('armd_consolidations_total')[-1]:.0f}; refits: {col('armd_refits_total')[-1]:.0f}",
        f"- RSS: first sample {rss[0]:.1f} MB, max {rss.max():.1f} MB, mean of 2nd quarter "
        f"{first_q:.1f} MB, mean of last quarter {last_q:.1f} MB; slope over the second half "
        f"{slope:+.2f} MB/min",
        f"- open file descriptors: min {a[:, 2].min():.0f}, max {a[:, 2].max():.0f}; threads: min "
        f"{a[:, 5].min():.0f}, max {a[:, 5].max():.0f}; max anonymous RSS {a[:, 3].max():.1f} MB",
        "",
        "| elapsed (s) | RSS (MB) | labels applied | pool | in flight |",
        "|---:|---:|---:|---:|---:|",
    ]
    step = max(1, n // 15)
    for r in rows[::step] + ([rows[-1]] if (n - 1) % step else []):
        lines.append(f"| {r[0]:.0f} | {r[1]:.1f} | {r[6 + SERIES.index('armd_model_labels_applied')]:.0f} | "
                     f"{r[6 + SERIES.index('armd_pool_responses')]:.0f} | "
                     f"{r[6 + SERIES.index('armd_requests_in_flight')]:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
