#!/usr/bin/env bash
# The main job, on this machine: a coordinator on the embedded SQLite default, two CPU workers and
# a small sweep (examples/demo.toml) on generated data. Prints per-seed results, their
# mean/std/min/max and where the database is. Sets up what it needs (libtorch, the build, the
# dataset) and is quick the second time. Results accumulate in demo-run/seedsweep.db.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p seedsweep-coordinator -p seedsweep-worker --bins

run=demo-run
mkdir -p "$run"
bin=target/release
[ -f "$run/data/synthetic/cifar-10-batches-bin/test_batch.bin" ] ||
  "$bin/worker" make-dataset synthetic --out "$run/data/synthetic" --train 2000 --test 500

rm -f "$run/addr"
"$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$run/addr" \
  --database-url "sqlite://$run/seedsweep.db" 2>"$run/coordinator.log" &
coordinator=$!
trap 'kill $coordinator 2>/dev/null; wait $coordinator 2>/dev/null' EXIT
for _ in $(seq 300); do [ -f "$run/addr" ] && break; kill -0 $coordinator || { cat "$run/coordinator.log"; exit 1; }; sleep 0.1; done
url="http://$(cat "$run/addr")"

id=$("$bin/coordinator" sweep submit --coordinator "$url" examples/demo.toml)
echo "submitted sweep $id (examples/demo.toml: 6 seeds); training with two CPU workers, logs in $run/ ..."
for w in 1 2; do
  "$bin/worker" --cpu --threads 1 --exit-when-idle --coordinator "$url" --data-dir "$run/data" \
    --worker-id "demo-worker-$w" 2>"$run/worker-$w.log" &
done
failed=0
for job in $(jobs -p); do [ "$job" = "$coordinator" ] || wait "$job" || failed=1; done
[ $failed = 0 ] || { echo "a worker failed; see $run/worker-*.log" >&2; exit 1; }

echo
"$bin/coordinator" sweep results --coordinator "$url" "$id"
echo
"$bin/coordinator" sweep status --coordinator "$url" "$id"
echo
echo "database: $(cd "$run" && pwd)/seedsweep.db"
echo "query it: sqlite3 $run/seedsweep.db \"SELECT seed, test_accuracy FROM results WHERE sweep_id = '$id' ORDER BY test_accuracy DESC\""
