#!/usr/bin/env bash
# Runs the fair strategy comparison of docs/strategies.md on one dataset and prints its Markdown section.
#
#   bash tools/report/run_strategy_report.sh data/realtext out/report/realtext > section.md
#
# Protocol (the same for every dataset): 5 paired seeds, cross-prompt candidates (20,000 per round), k = 100
# pairs per round, 12 rounds after 50 random seed labels (1,250 labels), 100 prompts per round, each
# response compared at most once (the daemon's default pool.max_uses), a refit every 100 labels, β = 1.
# The strategies run with the `auto` prior; `random` also runs at every fixed λ₀ of the grid, and the
# best grid value in hindsight is the baseline. Set ARMD (binary), SEEDS, STRATEGIES, GRID to change them.
set -euo pipefail
DATA=${1:?dataset directory}
OUT=${2:?output directory}
ARMD=${ARMD:-target/release/armd}
SEEDS=${SEEDS:-0..5}
STRATEGIES=${STRATEGIES:-random,greedy-dopt,targeted,targeted-info}
GRID=${GRID:-256 512 1024 2048 4096 8192 16384 65536}
COMMON=(--dataset "$DATA" --seeds "$SEEDS" --rounds 12 -k 100 --candidates cross --refit-every 100
  --set protocol.seed_labels=50 --set protocol.max_uses=1 --set output.plots=false --no-progress)
mkdir -p "$OUT"
"$ARMD" simulate "${COMMON[@]}" --strategies "$STRATEGIES" --prior-precision auto -o "$OUT/auto" >&2
grid_dirs=()
for l in $GRID; do
  "$ARMD" simulate "${COMMON[@]}" --strategies random --prior-precision "$l" -o "$OUT/random-$l" >&2
  grid_dirs+=("$OUT/random-$l")
done
python3 "$(dirname "$0")/strategy_report.py" --name "$(basename "$DATA")" --runs "$OUT/auto" \
  --random-grid "${grid_dirs[@]}"
