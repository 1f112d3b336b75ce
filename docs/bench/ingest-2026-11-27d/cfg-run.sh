#!/bin/bash
# One daemon bench binary (`./new`); the two armd configurations alternated as separate runs, so each
# follows its own raw measurement (no order effect between them). Summarise with ab-summary.py.
#   ARMD_BENCH_BROKERS=<broker> [ALTS=3] bash cfg-run.sh > cfg.txt
set -eu
: "${ARMD_BENCH_BROKERS:?set ARMD_BENCH_BROKERS to the broker address}"
for i in $(seq 1 "${ALTS:-3}"); do
  for c in default no-rounds; do
    echo "=== $c alternation $i $(date +%T)"
    ARMD_BENCH_INGEST_MB=1000 ARMD_BENCH_REPEATS=3 ARMD_BENCH_INGEST_CASES=768-base64,2048-base64 \
      ARMD_BENCH_INGEST_CONFIGS=$c ./new --bench ingest 2>&1 | grep -E "^\| (768|2048) |threads busy"
  done
done
echo done
