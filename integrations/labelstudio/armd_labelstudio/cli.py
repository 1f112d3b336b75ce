"""``armd-labelstudio``: the command line of the bridge."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from prometheus_client import start_http_server

from . import __version__
from .bridge import Bridge, Config, FatalError
from .metrics import Metrics

ENV = "ARMD_LABELSTUDIO_"


def _env(name: str, default=None):
    return os.environ.get(ENV + name, default)


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="armd-labelstudio",
        description="Bridge between armd and Label Studio: one pairwise task per armd comparison "
        "request, one armd.label.v1 message per submitted annotation. Every option can also be set "
        f"in the environment as {ENV}<OPTION> (e.g. {ENV}BROKERS); the API key also as "
        "LABEL_STUDIO_API_KEY.")
    k = ap.add_argument_group("Kafka")
    k.add_argument("--brokers", default=_env("BROKERS", "127.0.0.1:9092"),
                   help="bootstrap servers, host:port[,host:port] (default %(default)s)")
    k.add_argument("--requests-topic", default=_env("REQUESTS_TOPIC", "armd.requests"),
                   help="armd's kafka.topics.requests (default %(default)s)")
    k.add_argument("--labels-topic", default=_env("LABELS_TOPIC", "armd.labels"),
                   help="armd's kafka.topics.labels (default %(default)s)")
    k.add_argument("--group", default=_env("GROUP", "armd-labelstudio"),
                   help="consumer group on the requests topic (its committed offsets are the bridge's "
                   "position; default %(default)s)")
    k.add_argument("--kafka-setting", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="extra librdkafka setting for every client (repeatable), e.g. "
                   "security.protocol=SASL_SSL")
    k.add_argument("--instance-id", action="append", default=[],
                   help="only bridge requests of this armd daemon.instance_id (repeatable; default: "
                   "all); others are skipped as foreign_instance")
    s = ap.add_argument_group("Label Studio")
    s.add_argument("--ls-url", default=_env("LS_URL", "http://127.0.0.1:8080"),
                   help="Label Studio base URL (default %(default)s)")
    s.add_argument("--ls-api-key", default=None,
                   help="API key (visible in the process list: prefer the file or the environment)")
    s.add_argument("--ls-api-key-file", default=_env("LS_API_KEY_FILE"),
                   help="file holding the API key (personal access token, or a legacy token where the "
                   "organization enables them); else $LABEL_STUDIO_API_KEY or $" + ENV + "LS_API_KEY")
    s.add_argument("--project-title", default=_env("PROJECT_TITLE", "armd comparisons"),
                   help="project the bridge creates (or adopts, when one has this title) on first start "
                   "(default %(default)r)")
    s.add_argument("--annotator-id", choices=("email", "id"), default=_env("ANNOTATOR_ID", "email"),
                   help="annotator_id sent with each label: the Label Studio user's email (needs an "
                   "API key allowed to read users) or 'ls-user-<id>' (default %(default)s)")
    s.add_argument("--text-field", default=_env("TEXT_FIELD", "text"),
                   help="dotted path of the response text in each response's metadata "
                   "(default %(default)s)")
    s.add_argument("--prompt-field", default=_env("PROMPT_FIELD", "prompt"),
                   help="dotted path of the prompt text in each response's metadata "
                   "(default %(default)s)")
    b = ap.add_argument_group("bridge")
    b.add_argument("--state-dir", default=_env("STATE_DIR", "armd-labelstudio-state"),
                   help="directory of the durable state (request <-> task map, labels sent); keep it "
                   "across restarts (default %(default)s)")
    b.add_argument("--poll-interval", type=float, default=float(_env("POLL_INTERVAL", "2")),
                   help="seconds between reads of new annotations and expiry sweeps (default %(default)s)")
    b.add_argument("--metrics-listen", default=_env("METRICS_LISTEN"),
                   help="HOST:PORT to serve Prometheus metrics on /metrics (default: off)")
    b.add_argument("--stats-interval", type=float, default=float(_env("STATS_INTERVAL", "60")),
                   help="seconds between summary log lines (default %(default)s)")
    b.add_argument("--max-backoff", type=float, default=float(_env("MAX_BACKOFF", "30")),
                   help="longest wait between retries while Label Studio or Kafka is down, seconds "
                   "(default %(default)s)")
    b.add_argument("--state-retention-days", type=float, default=float(_env("STATE_RETENTION_DAYS", "30")),
                   help="forget requests closed this long ago (default %(default)s)")
    b.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    b.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return ap


def api_key(args) -> str:
    if args.ls_api_key:
        return args.ls_api_key.strip()
    if args.ls_api_key_file:
        with open(args.ls_api_key_file, encoding="utf-8") as f:
            return f.read().strip()
    return (os.environ.get("LABEL_STUDIO_API_KEY") or _env("LS_API_KEY") or "").strip()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    key = api_key(args)
    if not key:
        print("armd-labelstudio: no Label Studio API key: set LABEL_STUDIO_API_KEY or --ls-api-key-file",
              file=sys.stderr)
        return 2
    cfg = Config(
        brokers=args.brokers, ls_url=args.ls_url, ls_api_key=key,
        requests_topic=args.requests_topic, labels_topic=args.labels_topic, group_id=args.group,
        project_title=args.project_title, state_dir=args.state_dir, poll_interval=args.poll_interval,
        annotator_id=args.annotator_id, text_field=args.text_field, prompt_field=args.prompt_field,
        instance_ids=tuple(args.instance_id), kafka_settings=dict(args.kafka_setting),
        stats_interval=args.stats_interval, max_backoff=args.max_backoff,
        state_retention_days=args.state_retention_days)
    metrics = Metrics()
    if args.metrics_listen:
        host, _, port = args.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.registry)
        logging.getLogger("armd_labelstudio").info("metrics on http://%s/metrics", args.metrics_listen)
    bridge = Bridge(cfg, metrics)

    def on_signal(signum, _frame):
        logging.getLogger("armd_labelstudio").info("signal %d: stopping", signum)
        bridge.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        bridge.run()
    except FatalError as e:
        logging.getLogger("armd_labelstudio").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
