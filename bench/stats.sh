#!/usr/bin/env bash
# Statistics benchmark on PostgreSQL: `coordinator sweep stats` over sweeps of 10^4 and 10^6
# results (EPOCHS epochs of metrics each, a correctness bitmap of 10,000 examples each, as real
# workers send for CIFAR-10), `sweep report` over 10^4, and the cost of recording a
# result (lease, epochs, completion with its live-aggregate update) when the sweep already holds
# 10 results against 10^6, measured side by side with loadgen. Results are made in SQL (no training); every table
# row is a median of REPS runs.
#
#   bench/stats.sh [REPS] [EPOCHS] [SECONDS_PER_LOADGEN_RUN]     (defaults: 3, 4, 5)
#
# Needs PostgreSQL's server binaries; run as root it runs them as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
epochs=${2:-4}
secs=${3:-5}
PG_MAX_CONNECTIONS=200 source bench/pg.sh
psql() { "$pgbin/psql" -qAt "$@"; }

serve() { serve_at "$pg/$1" "$1"; } # DB -> sets coord and cpid

source bench/populate.sh

echo "populating (10^4 and 10^6 results, $epochs epochs each) ..." >&2
small=$(populate small 10 100000)
medium=$(populate medium 10000 0)
large=$(populate large 1000000 100000)

printf '%-30s %12s %12s\n' measurement median min
for db in medium large; do
  serve $db
  id=$([ $db = medium ] && echo "$medium" || echo "$large")
  ts=()
  for _ in $(seq "$reps"); do
    start=$(date +%s%N)
    "$bin/coordinator" sweep --coordinator "$coord" stats "$id" --json >"$work/stats.json"
    ts+=("$(( ($(date +%s%N) - start) / 1000000 ))")
  done
  n=$(field n <"$work/stats.json")
  if [ $db = medium ]; then
    rs=()
    for _ in $(seq "$reps"); do
      start=$(date +%s%N)
      "$bin/coordinator" sweep --coordinator "$coord" report "$id" --out "$work/report" >/dev/null
      rs+=("$(( ($(date +%s%N) - start) / 1000000 ))")
    done
    printf '%-30s %12s %12s\n' "report n=$n (ms)" "$(printf '%s\n' "${rs[@]}" | median)" \
      "$(printf '%s\n' "${rs[@]}" | sort -g | head -1)"
  fi
  printf '%-30s %12s %12s\n' "stats n=$n (ms)" "$(printf '%s\n' "${ts[@]}" | median)" \
    "$(printf '%s\n' "${ts[@]}" | sort -g | head -1)"
  if [ $db = large ]; then
    # Peak memory (max RSS, MiB) of the clients reading every result and epoch row, and of the
    # coordinator serving them.
    rss() { /usr/bin/time -f %M -o "$work/rss" "$@" >/dev/null; echo $(( $(cat "$work/rss") / 1024 )); }
    printf '%-30s %12s\n' "sweep results n=$n (MiB)" "$(rss "$bin/coordinator" sweep --coordinator "$coord" results "$id")"
    for table in results epochs; do
      printf '%-30s %12s\n' "export $table n=$n (MiB)" \
        "$(rss "$bin/coordinator" sweep --coordinator "$coord" export "$id" --table $table --format parquet --out "$work/x.parquet")"
    done
    printf '%-30s %12s\n' "coordinator peak (MiB)" "$(( $(awk '/VmHWM/ {print $2}' /proc/$cpid/status) / 1024 ))"
  fi
  kill $cpid; wait $cpid 2>/dev/null || true
done

# Recording results into a sweep of 10 against one of 10^6: loadgen (16 workers, EPOCHS epoch
# reports and a completion per lease; its own sweep is newer, so it leases the bench sweep's
# pending seeds) against each in turn, alternating, REPS times.
declare -A rate
for db in small large; do rate[$db]=""; done
for _ in $(seq "$reps"); do
  for db in small large; do
    serve $db
    out=$("$bin/loadgen" --coordinator "$coord" --workers 16 --seconds "$secs" --epochs "$epochs")
    rate[$db]+="$(field cycles_per_second <<<"$out") "
    kill $cpid; wait $cpid 2>/dev/null || true
  done
done
# Where the time of the stats calls went (the coordinator's log).
grep -h "statistics computed" "$work/coordinator.log" | sed 's/^.*INFO //' >&2
for db in small large; do
  label=$([ $db = small ] && echo "10 results" || echo "10^6 results")
  printf '%-30s %12.0f\n' "cycles/s into $label" "$(tr ' ' '\n' <<<"${rate[$db]}" | grep . | median)"
done
