#!/usr/bin/env bash
# GPU benchmark, for a GPU host that has PyTorch but maybe no Rust toolchain: it builds nothing.
# Give it `worker` and `coordinator` binaries built elsewhere against the libtorch of the host's
# PyTorch (BENCHMARKS.md, "Training on a GPU"); the worker finds that libtorch through LD_LIBRARY_PATH.
#
# On CIFAR-shaped generated data (50,000 training and 10,000 test images) it runs the
# `dawnbench`, `paper-short` and `airbench94` recipes for SEEDS seeds through a real coordinator
# and worker, then bench/torch_reference.py (PyTorch eager, each recipe written from its paper's
# code; for airbench94 also under torch.compile) for as many seeds, and reports seconds per seed
# (training and per-epoch evaluation, the model built and the data on the device) and training
# images per second, and the worker's per-seed overhead: seconds from lease (or from the slot
# coming free, for a prefetched lease) to the first step, and from the last step to the result
# acknowledged (medians over seeds). The compiled reference's seconds per seed include
# torch.compile's compilation (once per process, so once per seed here); compare its seconds per
# epoch, which leave out each run's first epoch. First a determinism check: one seed twice with
# `deterministic = true` (2 epochs) must give identical metrics, also with a second seed training
# beside it in another slot. Last, seeds per minute of a small network with one slot and with
# several.
#
#   bench/gpu.sh [SEEDS] [GPU]        (defaults: 2 and 0; GPU `cpu` runs it all on the CPU, a
#                                     smoke test of the script itself)
#
#   SEEDSWEEP_BIN   folder with worker and coordinator (default: target/release)
#   PYTHON          python with torch (default: python3)
#   RESULTS         file to append the report to as it goes (default: stdout only)
#   PARTS           which parts to run (default: "checks recipes slots")
#   RECIPES         which recipes the recipes part runs (default: "airbench94 dawnbench paper-short")
#   SLOTS           slots for the slots part (default: 4)
#   LOGS            folder to copy the worker's and coordinator's logs into at the end
#   TRAIN_IMAGES, TEST_IMAGES, EXTRA_TRAIN, REF_ARGS   smaller data, extra [train] lines and
#                   torch_reference.py flags, for smoke tests
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-2}
gpu=${2:-0}
bin=${SEEDSWEEP_BIN:-target/release}
python=${PYTHON:-python3}
results=${RESULTS:-/dev/null}
say() { echo "$@" | tee -a "$results"; }

torchlib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$gpu" = cpu ]; then worker_device=(--cpu); ref_device=cpu; else
  worker_device=(--gpu "$gpu"); ref_device="cuda:$gpu"
  say "host: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
fi
say "torch $("$python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
# Read whole before searching: a pipe into grep -q can kill ldd with SIGPIPE under pipefail.
links=$(ldd "$bin/worker")
say "worker links: $(grep -Eo 'lib(torch_cuda|torch_cpu|c10_cuda)\.so => [^ ]+' <<<"$links" | tr '\n' ' ')"
if grep -q 'not found' <<<"$links"; then
  grep 'not found' <<<"$links" >&2
  echo "error: the worker cannot find some libraries; build it against this host's torch" >&2
  exit 1
fi

work=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  [ -n "${LOGS:-}" ] && cp "$work"/*.log "$LOGS"/ 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
train=${TRAIN_IMAGES:-50000}
"$bin/worker" make-dataset synthetic --train "$train" --test "${TEST_IMAGES:-10000}" --out "$work/data/synthetic" 2>/dev/null
"$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/addr" \
  --database-url "sqlite://$work/bench.db" 2>"$work/coordinator.log" &
for _ in $(seq 300); do [ -f "$work/addr" ] && break; sleep 0.1; done
url="http://$(cat "$work/addr")"
div() { awk -v a="$1" -v b="$2" 'BEGIN { print a / b }'; }
query() { "$python" -c 'import sqlite3, sys
for row in sqlite3.connect(sys.argv[1]).execute(sys.argv[2]): print("|".join(map(str, row)))' "$work/bench.db" "$1"; }

submit() { # NAME RECIPE SEEDS [EXTRA TRAIN LINES]
  # The run's own lines win over EXTRA_TRAIN's for the same key.
  local lines
  lines=$(printf '%s\n%s\n' "${4:-}" "${EXTRA_TRAIN:-}" | awk -F= 'NF > 1 && !seen[$1]++')
  printf 'name = "%s"\ntask = "resnet9"\ndataset = "synthetic"\nrecipe = "%s"\nseeds = %s\n[train]\n%s\n' \
    "$1" "$2" "$3" "$lines" >"$work/$1.toml"
  "$bin/coordinator" sweep submit "$work/$1.toml" --coordinator "$url"
}
worker() { # [EXTRA WORKER FLAGS]
  "$bin/worker" "${worker_device[@]}" "$@" --exit-when-idle --coordinator "$url" --data-dir "$work/data" \
    2>>"$work/worker.log" || { tail -20 "$work/worker.log" >&2; exit 1; }
}

parts=${PARTS:-checks recipes slots}
has() { [[ " $parts " == *" $1 "* ]]; }

if has checks; then
# Determinism: the same seed twice with deterministic algorithms gives identical metrics.
a=$(submit det-a dawnbench "[5]" $'epochs = 2\ndeterministic = true')
worker
b=$(submit det-b dawnbench "[5]" $'epochs = 2\ndeterministic = true')
worker
ma=$(query "SELECT epoch, train_loss, test_loss, test_accuracy FROM epoch_metrics WHERE sweep_id = '$a' ORDER BY epoch")
mb=$(query "SELECT epoch, train_loss, test_loss, test_accuracy FROM epoch_metrics WHERE sweep_id = '$b' ORDER BY epoch")
if [ "$ma" = "$mb" ]; then say "deterministic = true: identical metrics in two runs of seed 5 ($(query "SELECT deterministic FROM results WHERE sweep_id = '$a'"))"; else
  say "deterministic = true: metrics DIFFER"; say "$ma"; say "$mb"; fi
# Two slots (each on its own CUDA stream) with seed 6 beside seed 5: seed 5 must not change.
c=$(submit det-c dawnbench "[5, 6]" $'epochs = 2\ndeterministic = true')
worker --slots 2
mc=$(query "SELECT epoch, train_loss, test_loss, test_accuracy FROM epoch_metrics WHERE sweep_id = '$c' AND seed = 5 ORDER BY epoch")
if [ "$ma" = "$mc" ]; then say "--slots 2: seed 5 identical beside seed 6"; else
  say "--slots 2: seed 5 DIFFERS beside seed 6"; say "$mc"; fi

fi

REF_ARGS=${REF_ARGS:-}
if has recipes; then
say "$(printf '%-12s %-8s %6s %12s %12s %14s %9s' recipe who seeds s/seed s/epoch train_img/s test_acc)"
for recipe in ${RECIPES:-airbench94 dawnbench paper-short}; do
  id=$(submit "$recipe" "$recipe" "\"0..$seeds\"")
  touch "$work/worker.log"
  before=$(wc -l <"$work/worker.log")
  worker
  tail -n +$((before + 1)) "$work/worker.log" >"$work/worker.log.$recipe"
  # Median over seeds of the seed's seconds; epoch seconds without the first (autotuning) epoch.
  per_seed=$(query "SELECT seconds FROM results WHERE sweep_id = '$id'" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  per_epoch=$(query "SELECT seconds FROM epoch_metrics WHERE sweep_id = '$id' AND epoch > min(1, (SELECT max(epoch) - 1 FROM epoch_metrics WHERE sweep_id = '$id'))" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  acc=$(query "SELECT avg(test_accuracy) FROM results WHERE sweep_id = '$id'")
  prec=$(query "SELECT DISTINCT precision FROM results WHERE sweep_id = '$id'")
  say "$(printf '%-12s %-8s %6s %12.2f %12.3f %14.0f %9.4f  (%s)' "$recipe" worker "$seeds" "$per_seed" "$per_epoch" "$(div "$train" "$per_epoch")" "$acc" "$prec")"
  overhead() { grep -o "$1=[0-9.e-]*" "$work/worker.log.$recipe" | cut -d= -f2 | sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "nan")}'; }
  say "$(printf '%-12s %-8s lease->first step %.3f s, last step->result %.3f s (medians)' "$recipe" worker "$(overhead lease_to_first_step_s)" "$(overhead last_step_to_result_s)")"
  flavours=(pytorch)
  [ "$recipe" = airbench94 ] && flavours+=(compiled)
  for flavour in "${flavours[@]}"; do
    : >"$work/ref.json"
    extra=()
    [ "$flavour" = compiled ] && extra=(--compile)
    for s in $(seq 0 $((seeds - 1))); do
      "$python" -W ignore::UserWarning bench/torch_reference.py --data "$work/data/synthetic" --recipe "$recipe" \
        --device "$ref_device" --seed "$s" "${extra[@]}" $REF_ARGS >"$work/ref-$s.json"
      "$python" -c 'import json, sys
e = [json.loads(l) for l in open(sys.argv[1])]
rest = e[1:] or e
print(sum(x["seconds"] for x in e), sorted(x["seconds"] for x in rest)[len(rest) // 2], e[-1]["test_accuracy"])' \
        "$work/ref-$s.json" >>"$work/ref.json"
    done
    read -r r_seed r_epoch r_acc < <(sort -g "$work/ref.json" | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}')
    say "$(printf '%-12s %-8s %6s %12.2f %12.3f %14.0f %9.4f' "$recipe" "$flavour" "$seeds" "$r_seed" "$r_epoch" "$(div "$train" "$r_epoch")" "$r_acc")"
  done
done
fi

# Slots: a small network (dawnbench at width 0.25, 4 epochs) on 8 seeds, one at a time and
# SLOTS at a time in one worker; seeds per minute from the wall time of each worker run.
if has slots; then
  say "$(printf '%-28s %6s %10s %12s' 'slots (width 0.25, 4 ep)' seeds wall_s seeds/min)"
  for n in 1 "${SLOTS:-4}"; do
    submit "slots-$n" dawnbench '"0..8"' $'epochs = 4\nwidth = 0.25' >/dev/null
    t0=$(date +%s.%N)
    worker --slots "$n"
    t1=$(date +%s.%N)
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    say "$(printf '%-28s %6s %10.1f %12.1f' "--slots $n" 8 "$wall" "$(div 480 "$wall")")"
  done
fi
