#!/bin/bash
# Interleaved A/B of two daemon bench binaries on one broker (docs/bench/history.md, "Daemon" §1, fourth round; current figures in BENCHMARKS.md "Daemon" §1).
# Build `cargo bench --bench daemon --no-run` at each commit, copy the two binaries into the current
# directory as `old` and `new`, start a broker (`.ci/kafka.sh start /tmp/kb` prints its address) and run
#   ARMD_BENCH_BROKERS=<broker> [ALTS=6] [CONFIGS=no-rounds] bash ab-run.sh > ab.txt
#   python3 ab-summary.py ab.txt [max steal %]
# CONFIGS empty runs both armd configurations (default and no-rounds).
set -eu
: "${ARMD_BENCH_BROKERS:?set ARMD_BENCH_BROKERS to the broker address}"
# The bench reads an empty ARMD_BENCH_INGEST_CONFIGS as "none": set it only when CONFIGS is not empty.
CONFIGS="${CONFIGS-no-rounds}"
if [ -n "$CONFIGS" ]; then export ARMD_BENCH_INGEST_CONFIGS="$CONFIGS"; else unset ARMD_BENCH_INGEST_CONFIGS; fi
for i in $(seq 1 "${ALTS:-6}"); do
  for v in old new; do
    echo "=== $v alternation $i $(date +%T)"
    ARMD_BENCH_INGEST_MB=1000 ARMD_BENCH_REPEATS=3 ARMD_BENCH_INGEST_CASES=768-base64,2048-base64 \
      ./$v --bench ingest 2>&1 | grep -E "^\| (768|2048) |threads busy"
  done
done
echo done
