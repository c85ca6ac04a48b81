# Sourced by the benchmark scripts after bench/pg.sh: `populate`, which makes a sweep of
# finished results in SQL as real workers would have sent them. Needs `epochs` set, and `serve`
# (a function: DB -> starts a coordinator on that database, sets coord and cpid).

# A database holding one sweep of DONE finished seeds (scores spread around 0.93 with a few
# black swans; accuracies are hits out of 10,000 test images, as on CIFAR-10, so they take
# few distinct values) and PENDING more seeds to lease; prints the sweep id. The sweep is submitted
# through the coordinator with one seed (so its configuration is a real one), then grown in SQL.
populate() { # DB DONE PENDING
  psql "$pg/postgres" -c "CREATE DATABASE \"$1\""
  serve "$1"
  printf 'name = "bench"\ntask = "resnet9"\ndataset = "synthetic"\nseeds = "0..1"\n[train]\nepochs = %s\n' \
    "$epochs" >"$work/$1.toml"
  local id
  id=$("$bin/coordinator" sweep --coordinator "$coord" submit "$work/$1.toml")
  kill $cpid; wait $cpid 2>/dev/null || true
  psql "$pg/$1" >/dev/null <<SQL
DELETE FROM seeds;
UPDATE sweeps SET total_seeds = $2 + $3;
INSERT INTO seeds (sweep_id, seed, init_seed, order_seed, augment_seed, split_seed, state, fence)
  SELECT id, s, s, s, s, s, CASE WHEN s < $2 THEN 'done' ELSE 'pending' END, CASE WHEN s < $2 THEN 1 ELSE 0 END
  FROM sweeps, generate_series(0, $2 + $3 - 1) AS s;
INSERT INTO results (sweep_id, seed, fence, test_accuracy, test_loss, train_loss, train_accuracy,
                     epochs, seconds, worker_id, device, data_fingerprint, init_seed, order_seed,
                     augment_seed, split_seed, precision, deterministic)
  SELECT sweep_id, seed, 1,
         round(10000 * least(0.99, greatest(0, 0.93 + 0.007 * sin(seed * 12.9898) - CASE WHEN seed % 9973 = 5 THEN 0.1 ELSE 0 END))) / 10000,
         0.3, 0.2, 0.95, $epochs, 60,
         'gpu-node-' || (seed % 125) || '.cluster.example.org/gpu' || (seed % 8),
         'cuda:0 (NVIDIA H100 80GB HBM3, compute capability 9.0)', 'sha256:' || repeat('3f', 32),
         seed, seed, seed, seed, 'fp32', true
  FROM seeds WHERE state = 'done';
-- The first hits of the 10,000 examples right: real bitmaps' size and count.
INSERT INTO result_bitmaps (sweep_id, seed, test_examples, test_correct)
  SELECT sweep_id, seed, 10000,
         decode(repeat('ff', hits / 8) || lpad(to_hex((1 << (hits % 8)) - 1), 2, '0')
                || repeat('00', 1249 - hits / 8), 'hex')
  FROM (SELECT sweep_id, seed, round(test_accuracy * 10000)::int AS hits FROM results) AS r;
-- Queued for the test-set tally, as recording them queues them; the coordinator folds them in.
INSERT INTO test_sets_unfolded SELECT sweep_id, seed FROM result_bitmaps;
INSERT INTO epoch_metrics (sweep_id, seed, epoch, fence, train_loss, train_accuracy, test_loss,
                           test_accuracy, lr, seconds)
  SELECT r.sweep_id, r.seed, e, 1, 1.0 / e, 0.5, 0.3, round(10000 * (r.test_accuracy - 0.05 * ($epochs - e))) / 10000, 0.1, 1
  FROM results r, generate_series(1, $epochs) AS e;
INSERT INTO epoch_values (sweep_id, metric, epoch, value, n)
  SELECT sweep_id, m, epoch, v, count(*)
  FROM epoch_metrics, LATERAL (VALUES ('test_accuracy', test_accuracy), ('train_accuracy', train_accuracy)) AS x (m, v)
  GROUP BY sweep_id, m, epoch, v;
INSERT INTO aggregates (sweep_id, metric, n, mean, m2, min, min_seed, max, max_seed)
  SELECT sweep_id, 'test_accuracy', count(*), avg(test_accuracy),
         coalesce(var_samp(test_accuracy) * (count(*) - 1), 0),
         min(test_accuracy), (array_agg(seed ORDER BY test_accuracy, seed))[1],
         max(test_accuracy), (array_agg(seed ORDER BY test_accuracy DESC, seed))[1]
  FROM results GROUP BY sweep_id;
ANALYZE;
SQL
  # The first start folds the queued bitmaps into the tally (in the background, or at the
  # first statistics call, which waits for it).
  serve "$1"
  local start=$(date +%s%N)
  "$bin/coordinator" sweep --coordinator "$coord" stats "$id" --json >/dev/null
  echo "folded $2 results' bitmaps in $(( ($(date +%s%N) - start) / 1000000 )) ms" >&2
  kill $cpid; wait $cpid 2>/dev/null || true
  echo "$id"
}

