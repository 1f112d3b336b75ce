#!/bin/bash
# Interleaved A/B of two daemon bench binaries on one broker (docs/bench/history.md, "Daemon" §1, third round).
# Build `cargo bench --bench daemon --no-run` at each commit (here b9cd372 with dce8514's bench change
# applied, and dce8514), copy the two binaries into the current directory as `old` and `new`, start a
# broker (`.ci/kafka.sh start /tmp/kb` prints its address) and run:
#   ARMD_BENCH_BROKERS=<broker> bash ab-run.sh > ab.txt
set -eu
: "${ARMD_BENCH_BROKERS:?set ARMD_BENCH_BROKERS to the broker address}"
for i in 1 2 3 4; do
  for v in old new; do
    echo "=== $v alternation $i $(date +%T)"
    ARMD_BENCH_INGEST_MB=1000 ARMD_BENCH_REPEATS=3 ARMD_BENCH_INGEST_CASES=768-base64,2048-base64 \
      ARMD_BENCH_INGEST_CONFIGS=no-rounds ./$v --bench ingest 2>&1 | grep -E "^\| (768|2048) "
  done
done
echo done
