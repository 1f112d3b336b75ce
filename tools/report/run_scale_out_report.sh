#!/usr/bin/env bash
# Runs the scale-out label-efficiency comparison of docs/scale-out.md on every real dataset and prints its
# tables: one instance vs three instances with one shared model vs three independent learners.
#
#   bash tools/report/run_scale_out_report.sh out/scale-out > tables.md
#
# Protocol: docs/strategies.md's (5 paired seeds, 20,000 cross-prompt candidates per round and instance,
# k = 100 per round split 34 + 33 + 33 across instances, 12 rounds after 50 random seed labels, each
# response compared once, a refit every 100 labels, β = 1), every strategy with the `auto` prior.
# Set ARMD (binary), SEEDS, STRATEGIES, DATASETS to change them.
set -euo pipefail
OUT=${1:?output directory}
ARMD=${ARMD:-target/release/armd}
SEEDS=${SEEDS:-0..5}
STRATEGIES=${STRATEGIES:-random,greedy-dopt,targeted-info}
DATASETS=${DATASETS:-realtext sentences-minilm qa-smollm2}
COMMON=(--seeds "$SEEDS" --rounds 12 -k 100 --candidates cross --refit-every 100
  --set protocol.seed_labels=50 --set protocol.max_uses=1 --set output.plots=false --no-progress
  --prior-precision auto --strategies "$STRATEGIES")
for ds in $DATASETS; do
  "$ARMD" simulate --dataset "data/$ds" "${COMMON[@]}" -o "$OUT/$ds/one" >&2
  "$ARMD" simulate --dataset "data/$ds" "${COMMON[@]}" --instances 3 --learners shared -o "$OUT/$ds/shared" >&2
  "$ARMD" simulate --dataset "data/$ds" "${COMMON[@]}" --instances 3 --learners independent \
    -o "$OUT/$ds/independent" >&2
done
# shellcheck disable=SC2086
python3 "$(dirname "$0")/scale_out_report.py" "$OUT" $DATASETS
