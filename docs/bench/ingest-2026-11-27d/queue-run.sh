#!/bin/bash
# One daemon bench binary (`./new`), librdkafka's prefetch queue at 64 MB (default), 8 MB and 4 MB
# (the last two with fetch.queue.backoff.ms = 1), alternated. Summarise with ab-summary.py.
#   ARMD_BENCH_BROKERS=<broker> [ALTS=4] bash queue-run.sh > abq.txt
set -eu
: "${ARMD_BENCH_BROKERS:?set ARMD_BENCH_BROKERS to the broker address}"
for i in $(seq 1 "${ALTS:-4}"); do
  for v in q64 q8 q4; do
    case $v in
      q64) S="";;
      q8) S="queued.max.messages.kbytes=8192,fetch.queue.backoff.ms=1";;
      q4) S="queued.max.messages.kbytes=4096,fetch.queue.backoff.ms=1";;
    esac
    echo "=== $v alternation $i $(date +%T)"
    ARMD_BENCH_KAFKA_SETTINGS="$S" ARMD_BENCH_INGEST_MB=1000 ARMD_BENCH_REPEATS=3 \
      ARMD_BENCH_INGEST_CASES=768-base64,2048-base64 ARMD_BENCH_INGEST_CONFIGS=no-rounds ./new --bench ingest 2>&1 \
      | grep -E "^\| (768|2048) |threads busy"
  done
done
echo done
