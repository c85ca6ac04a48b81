#!/usr/bin/env bash
# Fine-tuning benchmark on a CPU (task finetune-head): head-only seeds per hour with the feature
# cache against without it, and the decode throughput of the image pipeline.
#
#   bench/finetune_cpu.sh [SEEDS] [IMAGES] [SIZE]      (defaults: 4, 2000 and 96)
#
# Data: `worker make-dataset image-folder` (IMAGES training and IMAGES/4 validation images of
# SIZE x SIZE pixels, half PNG, half JPEG). Backbone: a random ResNet-18 (`worker make-backbone`)
# at input 64. Each seed trains the head 200 steps of batch 64. "Cached": one worker runs SEEDS
# seeds, computing the features once. "Uncached": every seed runs in a fresh worker with an empty
# feature cache, so each computes them. Decode: `worker decode-bench` with 1 and 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-4}
images=${2:-2000}
size=${3:-96}
source scripts/env.sh
cargo build --release --bins -q
bin=target/release
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$bin/worker" make-dataset image-folder --train "$images" --test $((images / 4)) --size "$size" \
  --out "$work/data/folder" 2>/dev/null
backbone=$("$bin/worker" make-backbone resnet18 --input-size 64 --out "$work/models/r18.safetensors" 2>/dev/null)
"$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/addr" \
  --database-url "sqlite://$work/bench.db" 2>"$work/coordinator.log" &
for _ in $(seq 300); do [ -f "$work/addr" ] && break; sleep 0.1; done
url="http://$(cat "$work/addr")"
now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n * 3600 / (b - a) }'; }
submit() { # NAME SEEDS
  cat >"$work/$1.toml" <<TOML
name = "$1"
task = "finetune-head"
dataset = "folder"
seeds = $2
$backbone
[finetune]
eval_every_steps = 200
[finetune.head]
steps = 200
batch_size = 64
lr = 0.05
TOML
  "$bin/coordinator" sweep submit "$work/$1.toml" --coordinator "$url" >/dev/null
}
worker() { # FEATURE_CACHE [FLAGS]
  local cache=$1; shift
  "$bin/worker" --cpu --threads 2 --exit-when-idle --coordinator "$url" --data-dir "$work/data" \
    --model-dir "$work/models" --feature-cache "$cache" "$@" 2>>"$work/worker.log"
}

echo "decode ($images images of ${size}x${size} to 64x64):"
for t in 1 2; do
  "$bin/worker" decode-bench "$work/data/folder" --size 64 --threads "$t" --limit "$images"
done

submit cached "\"0..$seeds\""
t0=$(now); worker "$work/cache"; t1=$(now)
echo "cached:   $seeds seeds in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s, $(rate "$seeds" "$t0" "$t1") seeds/hour"

submit uncached "\"100..$((100 + seeds))\""
t0=$(now)
for _ in $(seq "$seeds"); do worker "$(mktemp -d -p "$work")" --max-seeds 1; done
t1=$(now)
echo "uncached: $seeds seeds in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s, $(rate "$seeds" "$t0" "$t1") seeds/hour"
