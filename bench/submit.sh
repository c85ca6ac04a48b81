#!/usr/bin/env bash
# Heartbeats while a big sweep goes in: a fleet of simulated workers (loadgen: WORKERS workers,
# each "training" about 1 s per seed and heartbeating every 100 ms, with real-sized results)
# runs against a coordinator while `sweep submit` creates a sweep of 10^6 seeds, and while
# `sweep extend` grows it to 10^7; the same fleet alone, side by side, is the baseline. On
# SQLite and PostgreSQL, a fresh database and coordinator per measurement. Prints heartbeat p50,
# p99 and max and how long the submission took.
#
#   bench/submit.sh [WORKERS]      (default 64)
#
# Needs PostgreSQL's server binaries; run as root it runs them as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-64}
source bench/pg.sh

fresh() { # BACKEND TAG -> prints a database URL
  if [ "$1" = sqlite ]; then echo "sqlite://$work/$2.db"; else
    "$pgbin/psql" -q "$pg/postgres" -c "CREATE DATABASE \"$2\""; echo "$pg/$2"; fi
}
printf 'name = "big: resnet9 on cifar10, a million seeds"\ntask = "resnet9"\ndataset = "cifar10"\nseeds = "0..1000000"\n[train]\nepochs = 24\n' \
  >"$work/big.toml"
sweep() { "$bin/coordinator" sweep --coordinator "$coord" "$@"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# One measurement: the fleet for SECONDS on a fresh database; ACTION (none, submit or extend)
# starts with it. Prints loadgen's JSON and the action's duration in ms.
measure() { # BACKEND ACTION SECONDS
  local tag=$1-$2-$RANDOM
  serve_at "$(fresh "$1" "$tag")" "$tag"
  local big=""
  [ "$2" = extend ] && big=$(sweep submit "$work/big.toml")
  "$bin/loadgen" --coordinator "$coord" --workers "$workers" --seconds "$3" --epochs 24 \
    --think-ms 1000 --heartbeat-ms 100 >"$work/load.json" &
  local lpid=$! start took=0
  sleep 1
  start=$(now_ms)
  case $2 in
    submit) sweep submit "$work/big.toml" >/dev/null; took=$(( $(now_ms) - start )) ;;
    extend) sweep extend "$big" --seeds 1000000..10000000 >/dev/null; took=$(( $(now_ms) - start )) ;;
  esac
  wait $lpid
  kill $cpid; wait $cpid 2>/dev/null || true
  echo "$(cat "$work/load.json") $took"
}

printf '%-10s %-22s %10s %10s %10s %10s %12s\n' backend while cycles/s hb_p50_ms hb_p99_ms hb_max_ms action_ms
for backend in sqlite postgres; do
  # How long each action takes under the fleet sets how long the fleet runs beside it.
  for action in submit extend; do
    first=$(measure $backend $action 5)
    secs=$(( $(awk '{print $NF}' <<<"$first") / 1000 + 2 ))
    for run in "none" "$action"; do
      out=$(measure $backend "$run" "$secs")
      json=${out% *}
      printf '%-10s %-22s %10.0f %10.2f %10.2f %10.2f %12s\n' $backend \
        "$([ "$run" = none ] && echo "nothing (${secs} s)" || echo "$action")" \
        "$(field cycles_per_second <<<"$json")" "$(field heartbeat_p50_ms <<<"$json")" \
        "$(field heartbeat_p99_ms <<<"$json")" "$(field heartbeat_max_ms <<<"$json")" "${out##* }"
    done
  done
done
