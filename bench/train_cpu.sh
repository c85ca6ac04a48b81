#!/usr/bin/env bash
# CPU training benchmark: the worker's full epoch (draws, augmentation, training, evaluation, as
# recorded in epoch_metrics.seconds) against bench/torch_reference.py, PyTorch eager doing the same
# recipe on the same data with the same threads, side by side: each repetition runs one worker
# sweep and one reference run, alternately. The first epoch of every run is a warm-up and is not
# counted; the table shows medians of the other epochs and their ratio (worker / PyTorch).
#
#   bench/train_cpu.sh [REPS] [EPOCHS] [THREADS]      (defaults: 3, 3 and 2)
#
# The reference runs on the torch the worker links (the per-user libtorch cache), so both use the
# same kernels. Widths 1.0 (the full DAWNBench ResNet-9) and 0.25 (where overheads show); set
# WIDTHS="0.25" to run one. RECIPE=paper-short or airbench94 times another recipe (default
# dawnbench), BATCH=N another batch size on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
epochs=${2:-3}
threads=${3:-2}
source bench/torch_env.sh

train=2560
"$bin/worker" make-dataset synthetic --train $train --test 1000 --out "$work/data/synthetic" 2>/dev/null
"$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/addr" \
  --database-url "sqlite://$work/bench.db" 2>"$work/coordinator.log" &
for _ in $(seq 300); do [ -f "$work/addr" ] && break; sleep 0.1; done
url="http://$(cat "$work/addr")"

div() { awk -v a="$1" -v b="$2" 'BEGIN { print a / b }'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-6s %6s %16s %16s %8s %14s\n' width epochs worker_s/epoch pytorch_s/epoch ratio worker_img/s
for width in ${WIDTHS:-1.0 0.25}; do
  : >"$work/worker.$width"
  : >"$work/torch.$width"
  for rep in $(seq "$reps"); do
    cat >"$work/sweep.toml" <<TOML
name = "bench-cpu-$width-$rep"
task = "resnet9"
dataset = "synthetic"
recipe = "${RECIPE:-dawnbench}"
seeds = [$rep]
[train]
epochs = $epochs
width = $width
${BATCH:+batch_size = $BATCH}
TOML
    id=$("$bin/coordinator" sweep submit "$work/sweep.toml" --coordinator "$url")
    "$bin/worker" --cpu --threads "$threads" --exit-when-idle --coordinator "$url" \
      --data-dir "$work/data" 2>>"$work/worker.log"
    sqlite3 "$work/bench.db" \
      "SELECT seconds FROM epoch_metrics WHERE sweep_id = '$id' AND epoch > 1" >>"$work/worker.$width"
    "$python" -W ignore::UserWarning bench/torch_reference.py --data "$work/data/synthetic" --recipe "${RECIPE:-dawnbench}" \
      --epochs "$epochs" --width "$width" --threads "$threads" --seed "$rep" \
      ${BATCH:+--batch-size "$BATCH"} 2>>"$work/torch.log" |
      "$python" -c 'import json,sys
for l in sys.stdin:
    e = json.loads(l)
    if e["epoch"] > 1: print(e["seconds"])' >>"$work/torch.$width"
  done
  w=$(median <"$work/worker.$width")
  t=$(median <"$work/torch.$width")
  printf '%-6s %6s %16.3f %16.3f %8.3f %14.1f\n' "$width" "$(wc -l <"$work/worker.$width")" "$w" "$t" \
    "$(div "$w" "$t")" "$(div "$train" "$w")"
done
