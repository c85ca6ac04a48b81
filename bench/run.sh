#!/usr/bin/env bash
# Lease-cycle benchmark: loadgen (simulated workers over gRPC against a real coordinator) on SQLite
# and PostgreSQL (a fresh database and coordinator per measurement), and pgbench running the bare claim + fenced completion SQL against the same
# schema, side by side in one run. Each configuration runs REPS times; the table shows medians.
#
#   bench/run.sh [SECONDS_PER_RUN] [REPS]      (defaults: 5 and 3; the paced rows need >= 5 s)
#
# Needs PostgreSQL's server binaries and pgbench; run as root it runs them as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
reps=${2:-3}
source bench/pg.sh
"$pgbin/psql" -q "$pg/postgres" -c "CREATE DATABASE bare"

# One measurement: a coordinator on a fresh database, loadgen against it. Prints loadgen's JSON.
measure() { # BACKEND WORKERS [THINK_MS]
  local tag=$1-$2-$RANDOM url
  if [ "$1" = sqlite ]; then url="sqlite://$work/$tag.db"; else
    "$pgbin/psql" -q "$pg/postgres" -c "CREATE DATABASE \"$tag\""; url="$pg/$tag"; fi
  "$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/$tag.addr" --database-url "$url" \
    >/dev/null 2>>"$work/coordinator.log" &
  local pid=$!
  for _ in $(seq 300); do [ -f "$work/$tag.addr" ] && break; sleep 0.1; done
  "$bin/loadgen" --coordinator "http://$(cat "$work/$tag.addr")" --workers "$2" --seconds "$secs" \
    --think-ms "${3:-0}" ||
    echo '{"cycles_per_second": 0, "claim_p50_ms": "nan", "claim_p99_ms": "nan"}'
  kill $pid; wait $pid 2>/dev/null || true
}

# The bare-SQL baseline: the same schema and claim, one sweep of plenty of seeds.
"$bin/coordinator" migrate --database-url "$pg/bare" 2>/dev/null
"$pgbin/psql" -q "$pg/bare" -c "INSERT INTO sweeps (id, name, task, dataset, config, max_attempts, total_seeds)
  VALUES (gen_random_uuid(), 'bare', 'resnet9', 'd', '{}', 3, 3000000);
  INSERT INTO seeds (sweep_id, seed, init_seed, order_seed, augment_seed, split_seed)
    SELECT id, s, s, s, s, s FROM sweeps, generate_series(0, 2999999) AS s;"

printf '%-10s %8s %14s %14s %14s\n' backend workers cycles/s claim_p50_ms claim_p99_ms
for n in 1 16 256; do
  for backend in sqlite postgres; do
    rates=(); p50s=(); p99s=()
    for _ in $(seq "$reps"); do
      out=$(measure $backend "$n")
      rates+=("$(field cycles_per_second <<<"$out")"); p50s+=("$(field claim_p50_ms <<<"$out")"); p99s+=("$(field claim_p99_ms <<<"$out")")
    done
    printf '%-10s %8s %14.0f %14.2f %14.2f\n' $backend "$n" \
      "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%s\n' "${p50s[@]}" | median)" "$(printf '%s\n' "${p99s[@]}" | median)"
  done
  tps=()
  for _ in $(seq "$reps"); do
    tps+=("$("$pgbin/pgbench" -n -f bench/claim.sql -c "$n" -j 2 -T "$secs" "$pg/bare" 2>/dev/null |
      awk '/^tps/ {print $3; exit}')")
  done
  printf '%-10s %8s %14.0f %14s %14s\n' bare-sql "$n" "$(printf '%s\n' "${tps[@]}" | median)" - -
done

# A fleet at a realistic load: 256 workers that each train about a second (0.5 to 1.5 s) per
# lease, far less than real seeds take. The closed loops above measure capacity; this measures the
# claim latency such a fleet sees.
for backend in sqlite postgres; do
  rates=(); p50s=(); p99s=()
  for _ in $(seq "$reps"); do
    out=$(measure $backend 256 1000)
    rates+=("$(field cycles_per_second <<<"$out")"); p50s+=("$(field claim_p50_ms <<<"$out")"); p99s+=("$(field claim_p99_ms <<<"$out")")
  done
  printf '%-10s %8s %14.0f %14.2f %14.2f\n' $backend "256/1s" \
    "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%s\n' "${p50s[@]}" | median)" "$(printf '%s\n' "${p99s[@]}" | median)"
done
