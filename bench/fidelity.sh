#!/usr/bin/env bash
# Fidelity benchmark: for each recipe, a sweep through a coordinator and two CPU workers against
# bench/torch_reference.py (PyTorch eager, written from the papers' code), over the same seeds on
# the same real dataset (the UCI handwritten digits from scikit-learn, scripts/digits.sh, made
# into the CIFAR layout by `worker make-dataset digits`). bench/compare_dists.py then compares
# the two distributions of final test accuracy (means within 3 combined standard errors, Welch's
# t-test, Mann-Whitney U) and prints the per-epoch mean curves. Exits 1 if any recipe differs.
#
#   bench/fidelity.sh [SEEDS] [WIDTH] [EPOCHS]     (defaults: 12, 0.25, each recipe's own)
#   RECIPES="dawnbench paper-short airbench94"     which recipes (default: the first two)
#   BATCH=N                                        batch_size for both sides (default: the recipe's;
#                                                  airbench94's 1024 is one step an epoch here)
#   KEEP=DIR                                       keep the per-seed curves in DIR
#
# Two processes at a time, one thread each (2 cores): the workers, then the reference runs.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-12}
width=${2:-0.25}
epochs=${3:-}
source bench/torch_env.sh

"$bin/worker" make-dataset digits --source "$(scripts/digits.sh)" --out "$work/data/digits"
"$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/addr" \
  --database-url "sqlite://$work/fidelity.db" 2>"$work/coordinator.log" &
for _ in $(seq 300); do [ -f "$work/addr" ] && break; sleep 0.1; done
url="http://$(cat "$work/addr")"

status=0
for recipe in ${RECIPES:-dawnbench paper-short}; do
  cat >"$work/$recipe.toml" <<TOML
name = "fidelity-$recipe"
task = "resnet9"
dataset = "digits"
recipe = "$recipe"
seeds = "0..$seeds"
[train]
width = $width
${epochs:+epochs = $epochs}
${BATCH:+batch_size = $BATCH}
TOML
  started=$(date +%s)
  id=$("$bin/coordinator" sweep submit "$work/$recipe.toml" --coordinator "$url")
  for w in 1 2; do
    "$bin/worker" --cpu --threads 1 --exit-when-idle --coordinator "$url" --worker-id "fidelity-$w" \
      --data-dir "$work/data" 2>>"$work/worker.log" &
  done
  wait $(jobs -p | tail -2)
  worker_s=$(( $(date +%s) - started ))
  sqlite3 -separator ' ' "$work/fidelity.db" "SELECT e.seed, e.epoch, e.test_accuracy FROM epoch_metrics e
    JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND r.fence = e.fence
    WHERE e.sweep_id = '$id' AND e.test_accuracy IS NOT NULL ORDER BY e.seed, e.epoch" >"$work/$recipe.worker"

  started=$(date +%s)
  run_reference() {
    "$python" -W ignore::UserWarning bench/torch_reference.py --data "$work/data/digits" \
      --recipe "$recipe" --width "$width" ${epochs:+--epochs "$epochs"} ${BATCH:+--batch-size "$BATCH"} \
      --threads 1 --seed "$1" |
      "$python" -c 'import json, sys
for l in sys.stdin:
    e = json.loads(l)
    print(sys.argv[1], e["epoch"], e["test_accuracy"])' "$1"
  }
  : >"$work/$recipe.reference"
  for s in $(seq 0 2 $((seeds - 1))); do
    run_reference "$s" >"$work/ref.a" &
    if [ $((s + 1)) -lt "$seeds" ]; then run_reference $((s + 1)) >"$work/ref.b" & else : >"$work/ref.b"; fi
    wait $(jobs -p | tail -2)
    cat "$work/ref.a" "$work/ref.b" >>"$work/$recipe.reference"
  done
  reference_s=$(( $(date +%s) - started ))
  echo "# $recipe: $seeds seeds, width $width${BATCH:+, batch $BATCH}; worker sweep ${worker_s}s, reference ${reference_s}s (two at a time)"
  "$python" bench/compare_dists.py "$work/$recipe.worker" "$work/$recipe.reference" --label "$recipe" || status=1
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$work/$recipe.worker" "$work/$recipe.reference" "$KEEP/"; fi
done
exit $status
