#!/usr/bin/env bash
# Lease-cycle benchmark: loadgen (simulated workers over gRPC against a real coordinator) on SQLite
# and PostgreSQL (a fresh database and coordinator per measurement), and pgbench running the bare claim + fenced completion SQL against the same
# schema, side by side in one run. Each configuration runs REPS times; the table shows medians.
#
#   bench/run.sh [SECONDS_PER_RUN] [REPS] [FLEET_SECONDS]    (defaults: 5, 3 and 60; the paced
#                                                             rows need >= 5 s)
#
# The last rows are a simulated fleet of 1,000 GPUs at about 3 s per seed with 24 epoch rows each
# (heartbeats every 5 s), sustained for FLEET_SECONDS (0 skips them).
#
# Needs PostgreSQL's server binaries and pgbench; run as root it runs them as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
reps=${2:-3}
fleet_secs=${3:-60}
source bench/pg.sh
bare_setup

printf '%-10s %8s %14s %14s %14s %8s\n' backend workers cycles/s claim_p50_ms claim_p99_ms steal_%
for n in 1 16 256; do
  for backend in sqlite postgres; do
    rates=(); p50s=(); p99s=(); at=$(cpu_times)
    for _ in $(seq "$reps"); do
      out=$(measure $backend "$n")
      rates+=("$(field cycles_per_second <<<"$out")"); p50s+=("$(field claim_p50_ms <<<"$out")"); p99s+=("$(field claim_p99_ms <<<"$out")")
    done
    printf '%-10s %8s %14.0f %14.2f %14.2f %8s\n' $backend "$n" \
      "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%s\n' "${p50s[@]}" | median)" \
      "$(printf '%s\n' "${p99s[@]}" | median)" "$(steal_since "$at")"
  done
  tps=(); at=$(cpu_times)
  for _ in $(seq "$reps"); do
    tps+=("$(bare_tps "$n" "$secs")")
  done
  printf '%-10s %8s %14.0f %14s %14s %8s\n' bare-sql "$n" "$(printf '%s\n' "${tps[@]}" | median)" - - \
    "$(steal_since "$at")"
done

# A fleet at a realistic load: 256 workers that each train about a second (0.5 to 1.5 s) per
# lease, far less than real seeds take. The closed loops above measure capacity; this measures the
# claim latency such a fleet sees.
for backend in sqlite postgres; do
  rates=(); p50s=(); p99s=(); at=$(cpu_times)
  for _ in $(seq "$reps"); do
    out=$(measure $backend 256 1000)
    rates+=("$(field cycles_per_second <<<"$out")"); p50s+=("$(field claim_p50_ms <<<"$out")"); p99s+=("$(field claim_p99_ms <<<"$out")")
  done
  printf '%-10s %8s %14.0f %14.2f %14.2f %8s\n' $backend "256/1s" \
    "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%s\n' "${p50s[@]}" | median)" \
    "$(printf '%s\n' "${p99s[@]}" | median)" "$(steal_since "$at")"
done

# The fleet: 1,000 workers at ~3 s per seed, 24 epochs each, heartbeats every 5 s (~333
# completions and ~8,000 epoch rows a second), for FLEET_SECONDS.
[ "$fleet_secs" -gt 0 ] || exit 0
# Each run's claim p99 is shown with the steal during it: a fleet keeps this machine's cores
# busy, so CPU taken by other guests shows in the tail.
printf '\n%-10s %8s %14s %14s %14s %14s %16s  %s\n' backend workers cycles/s epoch_rows/s \
  claim_p50_ms claim_p99_ms heartbeat_p99_ms 'each run: p99_ms (steal_%)'
for backend in sqlite postgres; do
  rates=(); rows=(); p50s=(); p99s=(); beats=(); runs=""
  for _ in $(seq "$reps"); do
    at=$(cpu_times)
    out=$(measure $backend 1000 3000 24 5000 "$fleet_secs")
    rates+=("$(field cycles_per_second <<<"$out")"); rows+=("$(field epoch_rows_per_second <<<"$out")")
    p50s+=("$(field claim_p50_ms <<<"$out")"); p99s+=("$(field claim_p99_ms <<<"$out")")
    beats+=("$(field heartbeat_p99_ms <<<"$out")")
    runs+="$(printf '%.0f (%s) ' "${p99s[-1]}" "$(steal_since "$at")")"
  done
  # Seeds shorter than the heartbeat interval send none (workers beat first one interval after
  # the grant): then there is no heartbeat latency to show.
  beat=$(printf '%s\n' "${beats[@]}" | { grep -v None || true; } | median)
  printf '%-10s %8s %14.0f %14.0f %14.2f %14.2f %16s  %s\n' $backend "1000/3s" \
    "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%s\n' "${rows[@]}" | median)" \
    "$(printf '%s\n' "${p50s[@]}" | median)" "$(printf '%s\n' "${p99s[@]}" | median)" \
    "${beat:--}" "$runs"
done
