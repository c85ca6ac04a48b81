#!/usr/bin/env bash
# Task command's cost per run: a stand-in program (bench/command_program.py: 24 epochs of 50 ms,
# reported through the helper, and a 10,000-example bitmap) run N times alone, one after the
# other, against a sweep of the same N seeds run by one CPU worker (its start included) through
# a coordinator on SQLite. Alternated REPS times; prints the medians and the overhead per run.
# With BASELINE set to another build's binaries folder (for example a worktree of an earlier
# commit, built with cargo build --release --bins), each repetition runs the sweep with those
# too, so that the two builds' overheads are measured side by side (a folder with the worker
# built without libtorch, beside this build's coordinator, compares the two workers).
#
#   [BASELINE=DIR] bench/command.sh [N] [REPS]      (defaults: 20 and 3)
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

# One sweep of the N seeds through the coordinator and worker in $1; its wall time (ms) in
# $elapsed.
sweep() {
  local b=$1 tag=$2 db="$work/c$2.db" cpid coord start pass=()
  "$b/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/addr$tag" \
    --database-url "sqlite://$db" 2>>"$work/coordinator.log" &
  cpid=$!
  for _ in $(seq 300); do [ -s "$work/addr$tag" ] && break; sleep 0.1; done
  coord="http://$(cat "$work/addr$tag")"
  printf 'name = "overhead"\ntask = "command"\nseeds = "0..%s"\n[command]\nargv = ["python3", "%s"]\nepochs = 24\n' \
    "$n" "$program" >"$work/sweep.toml"
  "$b/coordinator" sweep --coordinator "$coord" submit "$work/sweep.toml" >/dev/null 2>&1
  # A worker that builds its programs' environment is told to pass PYTHONPATH on; an older one
  # passes its whole environment.
  help=$("$b/worker" --help)
  if grep -q -- --pass-env <<<"$help"; then pass=(--pass-env PYTHONPATH); fi
  # The worker built without libtorch has no threads or data to set.
  if grep -q -- --data-dir <<<"$help"; then pass+=(--threads 1 --data-dir "$work/data"); fi
  start=$(now)
  "$b/worker" --cpu --exit-when-idle --coordinator "$coord" --allow-command python3 "${pass[@]}" \
    --spool-dir "$work/spool$tag" --log-dir "$work/logs$tag" 2>>"$work/worker.log"
  elapsed=$(( ($(now) - start) / 1000000 ))
  done_seeds=$(sqlite3 "$db" "SELECT count(*) FROM results")
  [ "$done_seeds" = "$n" ] || { echo "only $done_seeds of $n seeds finished ($b)" >&2; exit 1; }
  kill $cpid; wait $cpid 2>/dev/null || true
}

alone=(); swept=(); base=()
for rep in $(seq "$reps"); do
  start=$(now)
  for seed in $(seq 0 $((n - 1))); do
    SEEDSWEEP_SEED=$seed SEEDSWEEP_METRICS_FILE="$work/alone.jsonl" python3 "$program"
  done
  alone+=("$(( ($(now) - start) / 1000000 ))")

  sweep "$bin" "$rep"; swept+=("$elapsed")
  if [ -n "${BASELINE:-}" ]; then sweep "$BASELINE" "b$rep"; base+=("$elapsed"); fi
done
a=$(printf '%s\n' "${alone[@]}" | median)
s=$(printf '%s\n' "${swept[@]}" | median)
printf '%-34s %10s\n' "runs" "$n"
printf '%-34s %10s\n' "alone, all runs (ms, median)" "$a"
printf '%-34s %10s\n' "through seedsweep (ms, median)" "$s"
printf '%-34s %10.3f\n' "overhead per run (s)" "$(echo "($s - $a) / $n / 1000" | bc -l)"
echo "alone: ${alone[*]}; through seedsweep: ${swept[*]}" >&2
if [ -n "${BASELINE:-}" ]; then
  b=$(printf '%s\n' "${base[@]}" | median)
  printf '%-34s %10s\n' "baseline build (ms, median)" "$b"
  printf '%-34s %10.3f\n' "baseline overhead per run (s)" "$(echo "($b - $a) / $n / 1000" | bc -l)"
  echo "baseline: ${base[*]}" >&2
fi
