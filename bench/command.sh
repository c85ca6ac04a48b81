#!/usr/bin/env bash
# Task command's cost per run: a stand-in program (bench/command_program.py: 24 epochs of 50 ms,
# reported through the helper, and a 10,000-example bitmap) run N times alone, one after the
# other, against a sweep of the same N seeds run by one CPU worker (its start included) through
# a coordinator on SQLite. Alternated REPS times; prints the medians and the overhead per run.
#
#   bench/command.sh [N] [REPS]      (defaults: 20 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
reps=${2:-3}
source scripts/env.sh
cargo build --release --bins -q
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
program="$PWD/bench/command_program.py"
now() { date +%s%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

alone=(); swept=()
for rep in $(seq "$reps"); do
  start=$(now)
  for seed in $(seq 0 $((n - 1))); do
    SEEDSWEEP_SEED=$seed SEEDSWEEP_METRICS_FILE="$work/alone.jsonl" python3 "$program"
  done
  alone+=("$(( ($(now) - start) / 1000000 ))")

  db="$work/c$rep.db"
  "$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/addr$rep" \
    --database-url "sqlite://$db" 2>>"$work/coordinator.log" &
  cpid=$!
  for _ in $(seq 300); do [ -s "$work/addr$rep" ] && break; sleep 0.1; done
  coord="http://$(cat "$work/addr$rep")"
  printf 'name = "overhead"\ntask = "command"\nseeds = "0..%s"\n[command]\nargv = ["python3", "%s"]\nepochs = 24\n' \
    "$n" "$program" >"$work/sweep.toml"
  "$bin/coordinator" sweep --coordinator "$coord" submit "$work/sweep.toml" >/dev/null
  start=$(now)
  "$bin/worker" --cpu --threads 1 --exit-when-idle --coordinator "$coord" --allow-command python3 --pass-env PYTHONPATH \
    --data-dir "$work/data" --spool-dir "$work/spool$rep" --log-dir "$work/logs$rep" 2>>"$work/worker.log"
  swept+=("$(( ($(now) - start) / 1000000 ))")
  done_seeds=$(sqlite3 "$db" "SELECT count(*) FROM results")
  [ "$done_seeds" = "$n" ] || { echo "only $done_seeds of $n seeds finished" >&2; exit 1; }
  kill $cpid; wait $cpid 2>/dev/null || true
done
a=$(printf '%s\n' "${alone[@]}" | median)
s=$(printf '%s\n' "${swept[@]}" | median)
printf '%-34s %10s\n' "runs" "$n"
printf '%-34s %10s\n' "alone, all runs (ms, median)" "$a"
printf '%-34s %10s\n' "through seedsweep (ms, median)" "$s"
printf '%-34s %10.3f\n' "overhead per run (s)" "$(echo "($s - $a) / $n / 1000" | bc -l)"
echo "alone: ${alone[*]}; through seedsweep: ${swept[*]}" >&2
